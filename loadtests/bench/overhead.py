"""Serving overhead: pdserve against the bare engine, one request at a time, hop by hop.

Runs vLLM's own OpenAI server (``vllm serve``, the baseline) for the whole run and, one after the other, each
pdserve setup beside it, every engine with the same arguments (one eager engine, one thread, bound to core 0). The
short prompts go one at a time, alternating between the baseline and the setup (streaming completions, greedy,
``ignore_eos``; each engine sees each prompt once): whatever else the machine does in a minute hits both alike,
and each setup's ratio is to the baseline's requests interleaved with its own. Setups:

- ``vllm``: the baseline alone, before any pdserve setup started.
- ``pdserve``: pdserve's colocated app as deployed by default: HTTP → ingress replica → engine replica → engine.
- ``pdserve-handle``: the same engine replica called through a Serve handle from this process (the engine replica
  and the handle's stream, without the HTTP front and the ingress): where the time between the two goes.
- ``pdserve-main-loop`` (``--main-loop``): pdserve's app with each replica's code and each handle's router on the
  replica's main event loop (Serve's default: an event loop of their own thread each): what that choice would gain
  one request at a time (docs/benchmarks.md: it costs goodput under load, so it is not the default).
- ``pdserve-direct-ingress``: pdserve's app with ``http.direct_ingress_port`` set (Ray Serve's direct ingress): the
  ingress replica serves HTTP itself on a port of its own (the proxy keeps 8000), no proxy → ingress hop and no call
  back to the proxy for the request body. Requests go to that port.

    python -m loadtests.bench.overhead --num-requests 30 --main-loop --out docs/benchmarks    (or: make bench-overhead)

Prints and writes (``<out>/overhead.md``, ``overhead.json``) TTFT, TPOT and E2E p50 per setup, the baseline's
p50s over the same stretch, and the ratios. The target: pdserve within 1.1x of vLLM's server on TTFT p50 and TPOT p50.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import requests
import yaml

from ..locust.report import RequestSample
from ..locust.stream import stream_request

ROOT = Path(__file__).resolve().parents[2]
BARE_PORT = 8100
MODEL = "smollm2-135m-instruct"
WORDS = ["river", "stone", "lamp", "orchard", "violet", "harbour", "copper", "meadow", "lantern", "falcon",
         "granite", "willow", "ember", "thistle", "cobalt", "saffron"]


def prompts(num: int, num_words: int, first: int = 0) -> list[str]:
    """Distinct prompts of about ``num_words`` tokens (no prefix shared between them: no prefix-cache hits)."""
    return [f"{i}: " + " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(num_words))
            for i in range(first, first + num)]


def _say(msg: str) -> None:
    print(f"[overhead] {msg}", flush=True)


def _wait_ready(url: str, proc: subprocess.Popen | None = None, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not ready after {timeout_s} s")


def _engine_args(enforce_eager: bool | None = None, dtype: str | None = None) -> tuple[list[str], dict[str, str]]:
    """`vllm serve` arguments and env of the engine pdserve's colocated app runs, built by pdserve's own code
    (``enforce_eager``, ``dtype``: instead of the config's)."""
    from deployments.config import load_serve_config
    from deployments.engine.vllm_engine import EngineSpec
    from deployments.models import resolve_model

    [(_, settings)] = load_serve_config(ROOT / "cluster/local-colocated.yaml")
    engine = settings.engine
    overrides = {"enforce_eager": enforce_eager, "dtype": dtype}
    engine = engine.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    spec = EngineSpec(model=resolve_model(settings.model.source), served_model_name=MODEL, role="colocated",
                      engine=engine, kv_connector=settings.kv_connector, engine_id="bare")
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0", "VLLM_CPU_KVCACHE_SPACE": str(settings.engine.cpu_kv_cache_space_gib),
           "HF_HUB_OFFLINE": "1", "VLLM_PLUGINS": ""}
    return spec.cli_args(), env


def measure(base_url: str, texts: list[str], max_tokens: int, headers: dict | None = None) -> list[RequestSample]:
    one = sample_http(base_url, max_tokens, headers)
    return [one(text) for text in texts]


def handle_sampler(max_tokens: int) -> Callable[[str], RequestSample]:
    """Sends one prompt to pdserve's engine replica through a Serve handle from this process and times its SSE
    chunks here. Connects this process to the running cluster (once per process)."""
    import ray
    from ray import serve

    from deployments.credentials import use_ray_auth
    from deployments.kv import PhaseRequest

    use_ray_auth()
    ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
    handle = serve.get_deployment_handle("ColocatedServer", "pdserve").options(stream=True)

    def one(text: str) -> RequestSample:
        body = {"model": MODEL, "prompt": text, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True}
        sample = RequestSample(category="short", endpoint="completions", sent_at_s=0.0)
        start = last = time.perf_counter()
        for item in handle.generate.remote(PhaseRequest("completions", body)):
            if not isinstance(item, str):
                continue
            now = time.perf_counter()
            for event in item.split("\n\n"):  # an item may hold several chunks (those that queued up)
                if not event.startswith("data: {"):
                    continue
                if any(c.get("text") for c in json.loads(event[len("data: "):]).get("choices", [])):
                    if sample.ttft_s is None:
                        sample.ttft_s = now - start
                    else:
                        sample.itl_s.append(now - last)
                    last = now
                    sample.num_output_tokens += 1
        sample.e2e_s = time.perf_counter() - start
        sample.ok = True
        return sample
    return one


def summary(samples: list[RequestSample]) -> dict[str, float]:
    tpot = [(s.e2e_s - s.ttft_s) / (s.num_output_tokens - 1) for s in samples if s.num_output_tokens > 1]
    return {"ttft_p50_ms": 1000 * statistics.median(s.ttft_s for s in samples),
            "tpot_p50_ms": 1000 * statistics.median(tpot),
            "e2e_p50_ms": 1000 * statistics.median(s.e2e_s for s in samples),
            "num_requests": len(samples)}


# Each replica's code and each handle's router on the replica's main event loop (not Serve's default).
MAIN_LOOP_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}
# http.direct_ingress_port of the direct-ingress row: the ingress replica listens itself, on a port of its own.
# Serve's proxy still holds 8000, so a request sent there takes the proxy hop as before (this row once measured that
# by mistake).
DIRECT_INGRESS_PORT = 8200  # BARE_PORT is the baseline's
DIRECT_INGRESS_HTTP = {"direct_ingress_port": DIRECT_INGRESS_PORT}


def setup_url(http) -> str:
    """Where a setup's requests go (``http``: its HttpSettings): the ingress replica's own port with direct ingress,
    else Serve's proxy."""
    return f"http://127.0.0.1:{http.direct_ingress_port or http.port}"


def _pdserve(*args: str, env: dict | None = None) -> None:
    subprocess.run([str(Path(sys.executable).with_name("pdserve")), *args], check=True, timeout=1200,
                   env=os.environ | {"HF_HUB_OFFLINE": "1"} | (env or {}))


@contextmanager
def bare_server(out: Path, enforce_eager: bool | None = None,
                dtype: str | None = None) -> Iterator[tuple[str, float]]:
    """vLLM's own OpenAI server on core 0 with pdserve's engine arguments: (its URL, seconds it took to be ready)."""
    args, env = _engine_args(enforce_eager, dtype)
    # As `vllm serve` runs it (that CLI looks up the distribution "vllm"; this one is vllm-cpu).
    cmd = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", *args, "--port", str(BARE_PORT),
           "--host", "127.0.0.1"]
    log = (out / "vllm-serve.log").open("w")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=os.environ | env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(f"http://127.0.0.1:{BARE_PORT}/health", proc)
        yield f"http://127.0.0.1:{BARE_PORT}", time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)


def sample_http(base_url: str, max_tokens: int, headers: dict | None = None) -> Callable[[str], RequestSample]:
    """Sends one prompt to an OpenAI server and times it."""
    session = requests.Session()
    session.headers.update(headers or {})

    def one(text: str) -> RequestSample:
        body = {"model": MODEL, "prompt": text, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        sample = RequestSample(category="short", endpoint="completions", sent_at_s=0.0)
        return stream_request(session, f"{base_url}/v1/completions", body, sample, timeout_s=120)
    return one


# Between two interleaved requests: longer than the 1 s vLLM's engine processes keep spinning after their last step
# (SpinCondition.busy_loop_s; pdserve's engines do not spin), so that neither setup's request starts while the other's
# engine still spins on the shared core.
PAUSE_S = 1.5


def interleaved(baseline: Callable[[str], RequestSample], setup: Callable[[str], RequestSample],
                batch: tuple[list[str], list[str]]) -> tuple[list[RequestSample], list[RequestSample]]:
    """(baseline's, setup's) samples of ``batch`` = (warmup, measured): the setup gets the warmup unmeasured (the
    baseline is warm), then each measured text goes to one, then the other."""
    warmup, texts = batch
    for text in warmup:
        setup(text)

    def after_pause(send: Callable[[str], RequestSample], text: str) -> RequestSample:
        time.sleep(PAUSE_S)
        return send(text)
    pairs = [(after_pause(baseline, text), after_pause(setup, text)) for text in texts]
    return [b for b, _ in pairs], [s for _, s in pairs]


@contextmanager
def pdserve_colocated(out: Path, env: dict | None = None, http: dict | None = None,
                      dtype: str | None = None) -> Iterator[str]:
    """pdserve's colocated app (one replica, core 0) with ``env`` added to its nodes' environment, ``http`` to its
    http settings and ``dtype`` (if given) as its engine's: its URL."""
    from deployments.config import load_serve_config

    doc = yaml.safe_load((ROOT / "cluster/local-colocated.yaml").read_text())
    args = doc["applications"][0]["args"]
    args["http"] = args.get("http", {}) | (http or {})
    if dtype:
        args["engine"] = args.get("engine", {}) | {"dtype": dtype}
    config = out / "overhead-colocated.yaml"
    config.write_text(yaml.safe_dump(doc))
    _pdserve("down")
    _pdserve("up", "--config", str(config), env=env)
    try:
        yield setup_url(load_serve_config(config)[0][1].http)
    finally:
        _pdserve("down")


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    rows = ["| setup | TTFT p50 (ms) | vLLM TTFT p50 (ms) | TTFT ratio | TPOT p50 (ms) | vLLM TPOT p50 (ms) "
            "| TPOT ratio | E2E ratio |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        s, b = r["setup"], r["baseline"]
        rows.append(f"| {name} | {s['ttft_p50_ms']:.1f} | {b['ttft_p50_ms']:.1f} | "
                    f"{s['ttft_p50_ms'] / b['ttft_p50_ms']:.2f} | {s['tpot_p50_ms']:.1f} | {b['tpot_p50_ms']:.1f} | "
                    f"{s['tpot_p50_ms'] / b['tpot_p50_ms']:.2f} | {s['e2e_p50_ms'] / b['e2e_p50_ms']:.2f} |")
    return "\n".join(rows)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench.overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--num-requests", type=int, default=30)
    p.add_argument("--prompt-words", type=int, default=60, help="about 64 prompt tokens")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--out", default="bench-results")
    p.add_argument("--direct-ingress", action="store_true", help="also run pdserve with http.direct_ingress_port")
    p.add_argument("--main-loop", action="store_true", help="also run pdserve with replica code on the main loop")
    p.add_argument("--engine-dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="every engine's dtype (baseline's and pdserve's) instead of the config's, e.g. float32 on a "
                   "CPU without bf16 instructions, where a 64-token bf16 prefill takes seconds and hides the overhead")
    return p


def _setups(args: argparse.Namespace) -> list[tuple[str, dict | None, dict | None]]:
    """The pdserve variants to run, as (name, node env, http)."""
    setups: list[tuple[str, dict | None, dict | None]] = [("pdserve", None, None)]
    if args.main_loop:
        setups.append(("pdserve-main-loop", MAIN_LOOP_ENV, None))
    if args.direct_ingress:
        setups.append(("pdserve-direct-ingress", None, DIRECT_INGRESS_HTTP))
    return setups


def _write(out: Path, results: dict[str, dict[str, dict[str, float]]], machine_line: str, dtype: str) -> str:
    """overhead.json and overhead.md; returns the Markdown."""
    md = f"{machine_line}; engine dtype: {dtype}\n\n" + table(results)
    (out / "overhead.json").write_text(json.dumps(results | {"machine": machine_line, "engine_dtype": dtype}, indent=1))
    (out / "overhead.md").write_text(md + "\n")
    return md


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    key = os.environ.get("PDSERVE_API_KEY")
    headers = {"authorization": f"Bearer {key}"} if key else {}
    setups = _setups(args)
    n, first = args.num_requests + 3, 0

    def batch() -> tuple[list[str], list[str]]:  # (warmup, measured): prompts no engine here saw before
        nonlocal first
        texts = prompts(n, args.prompt_words, first=first)
        first += n
        return texts[:3], texts[3:]

    import ray

    results: dict[str, dict[str, dict[str, float]]] = {}
    from .sweep import machine

    machine_line, dtype = machine(), args.engine_dtype or "the config's"  # the machine read once per run
    _say(f"machine: {machine_line}; engine dtype: {dtype}")
    with bare_server(out, dtype=args.engine_dtype) as (bare_url, _):
        _say("vLLM's own server, alone")
        bare = sample_http(bare_url, args.max_tokens)
        warmup, texts = batch()
        for text in warmup:
            bare(text)
        alone = summary([bare(text) for text in texts])
        results["vllm"] = {"setup": alone, "baseline": alone}
        for name, env, http in setups:
            _say(f"{name}, interleaved with vLLM's own server")
            try:
                with pdserve_colocated(out, env, http, args.engine_dtype) as url:
                    base, setup = interleaved(bare, sample_http(url, args.max_tokens, headers), batch())
                    results[name] = {"setup": summary(setup), "baseline": summary(base)}
                    if name == "pdserve":  # once per process: a second Serve connection keeps the first's replicas
                        _say("pdserve's engine replica through a Serve handle, interleaved with vLLM's own server")
                        base, setup = interleaved(bare, handle_sampler(args.max_tokens), batch())
                        results["pdserve-handle"] = {"setup": summary(setup), "baseline": summary(base)}
                        ray.shutdown()
            except Exception as exc:  # Serve's experimental modes: say what failed, keep the other rows
                if env is None and http is None:
                    raise
                _say(f"{name} failed: {exc!r}")
    print(_write(out, results, machine_line, dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
