"""Decode routing policies on an uneven load: round-robin vs least-loaded (a benchmark, not a test).

Every 4th request asks for a long answer (300 tokens), the others for 16. With two decode replicas, round-robin
sends every long request to the same replica; least-loaded sees that replica's running requests and routes
around it. Each policy gets a fresh deployment of the default config with two decode replicas, and the same
request sequence at the same arrival times.

    .venv/bin/python -m loadtests.bench.policy_bench --out bench-results/policies
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import yaml

from .sweep import ROOT, _pdserve

NUM_REQUESTS, INTERVAL_S, LONG_EVERY = 40, 0.75, 4


def _config(policy: str, out: Path) -> Path:
    doc = yaml.safe_load((ROOT / "cluster/local-disaggregated.yaml").read_text())
    args = doc["applications"][0]["args"]
    args["decode"] |= {"num_replicas": 2, "cpu_bind": ["1"]}  # two decode engines sharing core 1
    args["routing"] = {"decode_policy": policy, "prefill_policy": policy}
    path = out / f"{policy}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _one(i: int, start: float, model: str) -> dict:
    time.sleep(max(0.0, start + i * INTERVAL_S - time.monotonic()))
    long = i % LONG_EVERY == 0
    body = {"model": model, "prompt": f"Request {i}: write about the sea.", "temperature": 0,
            "max_tokens": 300 if long else 16, "ignore_eos": True}
    t0 = time.monotonic()
    resp = httpx.post("http://127.0.0.1:8000/v1/completions", json=body, timeout=600)
    return {"i": i, "long": long, "status": resp.status_code, "e2e_s": time.monotonic() - t0,
            "decode_replica": resp.headers.get("x-pdserve-decode-replica")}


def run_policy(policy: str, out: Path, model: str) -> dict:
    _pdserve("down")
    _pdserve("up", "--config", str(_config(policy, out)))
    try:
        start = time.monotonic() + 1
        with ThreadPoolExecutor(NUM_REQUESTS) as pool:
            results = list(pool.map(lambda i: _one(i, start, model), range(NUM_REQUESTS)))
        makespan = time.monotonic() - start
    finally:
        _pdserve("down")
    short = sorted(r["e2e_s"] for r in results if not r["long"] and r["status"] == 200)
    longs = [r for r in results if r["long"]]
    return {"policy": policy, "num_failed": sum(r["status"] != 200 for r in results), "makespan_s": makespan,
            "short_e2e_p50_s": statistics.median(short),
            "short_e2e_p99_s": short[min(len(short) - 1, int(0.99 * len(short)))],
            "long_e2e_mean_s": statistics.mean(r["e2e_s"] for r in longs),
            "num_replicas_given_long": len({r["decode_replica"] for r in longs})}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench-results/policies")
    p.add_argument("--model", default="smollm2-135m-instruct")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [run_policy(policy, out, args.model) for policy in ("round_robin", "least_loaded")]
    (out / "policies.json").write_text(json.dumps(rows, indent=1))
    rr, ll = rows
    print("| policy | failed | short e2e p50 (s) | short e2e p99 (s) | long e2e mean (s) "
          "| replicas given long requests | makespan (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['policy']} | {r['num_failed']} | {r['short_e2e_p50_s']:.2f} | {r['short_e2e_p99_s']:.2f} | "
              f"{r['long_e2e_mean_s']:.2f} | {r['num_replicas_given_long']} | {r['makespan_s']:.1f} |")
    print(f"least_loaded / round_robin: short p99 {ll['short_e2e_p99_s'] / rr['short_e2e_p99_s']:.2f}x, "
          f"long mean {ll['long_e2e_mean_s'] / rr['long_e2e_mean_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
