"""OpenAPI-driven fuzzing of the live API with schemathesis: `make fuzz` (or `python -m loadtests.reliability.fuzz`).

The request schemas are vLLM's own pydantic models (``CompletionRequest``, ``ChatCompletionRequest``), so the
generated requests cover every field a client may send, valid (positive mode) and invalid (negative mode).
Two changes keep a run short and its outcome meaningful: ``max_tokens`` is required and at most
``--max-tokens`` (an unbounded completion on a CPU engine takes minutes), and ``stream`` is fixed per pass, so
that both endpoints are fuzzed streaming and not. Checks: no response is a server error (>= 500). After the
run: the server answers a plain request, and every engine's KV cache is back to idle.

Counts come from the server itself (``pdserve_requests_total`` by HTTP status on the metrics target), so a
request the fuzzer sent but the server never answered would show as missing.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from ..engines import busy_engines

ENDPOINTS = {"/v1/completions": "CompletionRequest", "/v1/chat/completions": "ChatCompletionRequest"}


def request_schemas() -> dict[str, dict]:
    """vLLM's JSON schemas of the two request bodies."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    return {"CompletionRequest": CompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}"),
            "ChatCompletionRequest": ChatCompletionRequest.model_json_schema(
                ref_template="#/components/schemas/{model}")}


def openapi_spec(schemas: dict[str, dict], stream: bool, max_tokens: int, model: str,
                 vocab_size: int = 49152) -> dict:
    """An OpenAPI 3.1 document for the two POST endpoints, with bounded output and a fixed ``stream``."""
    components: dict[str, dict] = {}
    paths = {}
    for path, name in ENDPOINTS.items():
        schema = copy.deepcopy(schemas[name])
        components.update(schema.pop("$defs", {}))
        props = schema["properties"]
        props["max_tokens"] = {"type": "integer", "minimum": 1, "maximum": max_tokens}
        props.pop("max_completion_tokens", None)
        props["stream"] = {"const": stream}
        props["model"] = {"const": model}
        if name == "CompletionRequest":  # a prompt of the model's vocabulary, so that positive cases reach the engine
            token = {"type": "integer", "minimum": 0, "maximum": vocab_size - 1}
            props["prompt"] = {"anyOf": [{"type": "string", "maxLength": 4000},
                                         {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 4},
                                         {"type": "array", "items": token, "minItems": 1, "maxItems": 1000},
                                         {"type": "array", "minItems": 1, "maxItems": 4,
                                          "items": {"type": "array", "items": token, "minItems": 1}}]}
        for field in ("n", "best_of"):
            if field in props:
                props[field] = {"type": "integer", "minimum": 1, "maximum": 2}
        schema["additionalProperties"] = False  # pdserve refuses unknown fields (vLLM's models would allow them)
        schema["required"] = sorted(set(schema.get("required", [])) | {"max_tokens", "stream", "model"}
                                    | ({"prompt"} if name == "CompletionRequest" else set()))
        components[name] = schema
        paths[path] = {"post": {
            "operationId": name,
            "requestBody": {"required": True,
                            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}},
            "responses": {"200": {"description": "completion"}, "400": {"description": "invalid request"},
                          "404": {"description": "unknown model"}, "413": {"description": "body too large"},
                          "429": {"description": "overloaded"}}}}
    return {"openapi": "3.1.0", "info": {"title": "pdserve (fuzzing)", "version": "1"}, "paths": paths,
            "components": {"schemas": components}}


def status_counts(metrics_url: str) -> dict[str, float]:
    """pdserve_requests_total summed by HTTP status, from the metrics target."""
    text = urllib.request.urlopen(metrics_url, timeout=30).read().decode()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("ray_pdserve_requests_total{"):
            status = re.search(r'status="(\d+)"', line).group(1)
            counts[status] = counts.get(status, 0) + float(line.rsplit(" ", 1)[1])
    return counts


def _post(url: str, body: dict, headers: dict) -> int:
    req = urllib.request.Request(url, json.dumps(body).encode(), headers | {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="http://127.0.0.1:8000", help="server base URL (without /v1)")
    p.add_argument("--metrics", default="http://127.0.0.1:8080/metrics", help="the metrics target")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--max-examples", type=int, default=300, help="generated requests per endpoint and pass")
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--mode", default="all", choices=["positive", "negative", "all"])
    p.add_argument("--report", default="docs/fuzz", help="folder for the summary JSON")
    args = p.parse_args(argv)
    key = os.environ.get("PDSERVE_API_KEY")
    headers = {"authorization": f"Bearer {key}"} if key else {}
    schemas = request_schemas()
    before = status_counts(args.metrics)
    t0 = time.monotonic()
    passes = []
    with tempfile.TemporaryDirectory() as tmp:
        for stream in (False, True):
            spec = Path(tmp) / f"openapi-stream-{stream}.json"
            spec.write_text(json.dumps(openapi_spec(schemas, stream, args.max_tokens, args.model)))
            cmd = [str(Path(sys.executable).with_name("schemathesis")), "run", str(spec), "--url", args.base,
                   "--checks", "not_a_server_error", "--max-examples", str(args.max_examples), "--seed",
                   str(args.seed), "--mode", args.mode, "--phases", "examples,coverage,fuzzing", "--workers", "2",
                   "--request-timeout", "600", "--suppress-health-check", "all", "--continue-on-failure"]
            cmd += [a for k, v in headers.items() for a in ("--header", f"{k}: {v}")]
            print(f"[fuzz] stream={stream}: {' '.join(cmd[:3])} ...", flush=True)
            proc = subprocess.run(cmd, text=True, capture_output=True)
            print(proc.stdout[-4000:], proc.stderr[-2000:], flush=True)
            generated = re.search(r"(\d+) generated", proc.stdout)
            passes.append({"stream": stream, "exit_code": proc.returncode,
                           "num_generated": int(generated.group(1)) if generated else None})
    took_s = time.monotonic() - t0
    time.sleep(12)  # the metrics agent exports every few seconds
    after = status_counts(args.metrics)
    delta = {s: int(after.get(s, 0) - before.get(s, 0)) for s in sorted(set(after) | set(before))}
    delta = {s: n for s, n in delta.items() if n}
    plain = _post(args.base + "/v1/completions", {"model": args.model, "prompt": "Hi", "max_tokens": 2}, headers)
    busy = busy_engines()
    summary = {"requests_by_status": delta, "busy_engines_after": busy, "num_requests": sum(delta.values()),
               "num_server_errors": sum(n for s, n in delta.items() if int(s) >= 500), "passes": passes,
               "took_s": round(took_s, 1), "plain_request_after": plain, "max_examples": args.max_examples,
               "max_tokens": args.max_tokens, "seed": args.seed}
    Path(args.report).mkdir(parents=True, exist_ok=True)
    (Path(args.report) / "fuzz-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    # The verdict is the server's own count: schemathesis also exits non-zero for its own generation errors and for
    # client-side read timeouts (a legal request without max_tokens in negative mode may generate for minutes).
    ok = summary["num_server_errors"] == 0 and plain == 200 and not busy
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
