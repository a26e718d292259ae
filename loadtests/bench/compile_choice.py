"""Compiled or eager engines: what torch.compile costs at startup and buys in serving speed, per role.

Starts vLLM's own server fresh with pdserve's engine arguments (one engine, one thread, core 0), once eager
(``--enforce-eager``) and once compiled, and measures, one request at a time (streaming, greedy, ``ignore_eos``):
- startup: seconds from launch to a healthy server;
- the prefill role: TTFT of long prompts (~1,000 tokens), i.e. prefill speed;
- the decode role: TPOT of short prompts with a longer answer.

    python -m loadtests.bench.compile_choice --out docs/benchmarks      (or: make bench-compile)

Prints and writes ``<out>/compile-choice.md`` and ``compile-choice.json``, with compiled / eager ratios.

``--dtypes bfloat16,float32`` compares weight dtypes instead (eager engines, the first dtype is the baseline):
on a CPU without bf16 instructions (no ``avx512_bf16``/``amx_bf16``) bf16 matmuls are emulated, which slows
prefill, while fp32 weights are twice the bytes to read per decoded token. Writes ``<out>/dtype-choice.*``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .overhead import bare_server, measure, prompts, summary


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m loadtests.bench.compile_choice", description=__doc__.split("\n\n")[0])
    p.add_argument("--num-requests", type=int, default=10)
    p.add_argument("--out", default="bench-results")
    p.add_argument("--dtypes", default="", help="e.g. bfloat16,float32: compare these dtypes (eager) instead")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    long_prompts, short_prompts = prompts(args.num_requests + 1, 900), prompts(args.num_requests + 1, 60)
    dtypes = [d for d in args.dtypes.split(",") if d]
    variants = ([(d, {"enforce_eager": True, "dtype": d}) for d in dtypes] if dtypes
                else [("eager", {"enforce_eager": True}), ("compiled", {"enforce_eager": False})])
    results: dict[str, dict[str, float]] = {}
    for name, engine_args in variants:
        print(f"[compile-choice] starting the {name} engine", flush=True)
        with bare_server(out, **engine_args) as (url, startup_s):
            measure(url, [long_prompts[0], short_prompts[0]], 8)  # warm-up
            prefill = summary(measure(url, long_prompts[1:], 4))
            decode = summary(measure(url, short_prompts[1:], 64))
        results[name] = {"startup_s": startup_s, "long_prompt_ttft_p50_ms": prefill["ttft_p50_ms"],
                         "tpot_p50_ms": decode["tpot_p50_ms"], "short_prompt_ttft_p50_ms": decode["ttft_p50_ms"]}
    rows = ["| engine | startup (s) | TTFT p50, ~1k-token prompt (ms) | TTFT p50, ~64-token prompt (ms) | "
            "TPOT p50 (ms) |", "|---|---|---|---|---|"]
    for name, r in results.items():
        rows.append(f"| {name} | {r['startup_s']:.0f} | {r['long_prompt_ttft_p50_ms']:.0f} | "
                    f"{r['short_prompt_ttft_p50_ms']:.1f} | {r['tpot_p50_ms']:.1f} |")
    (base, e), *others = results.items()
    for name, c in others:
        rows.append(f"| {name} / {base} | {c['startup_s'] / e['startup_s']:.2f} | "
                    f"{c['long_prompt_ttft_p50_ms'] / e['long_prompt_ttft_p50_ms']:.2f} | "
                    f"{c['short_prompt_ttft_p50_ms'] / e['short_prompt_ttft_p50_ms']:.2f} | "
                    f"{c['tpot_p50_ms'] / e['tpot_p50_ms']:.2f} |")
    md = "\n".join(rows)
    stem = "dtype-choice" if dtypes else "compile-choice"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    (out / f"{stem}.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
