"""What a frozen prefill or decode replica costs, measured against a running server (`make run`, the default config):
`python -m loadtests.reliability.frozen_replica [--pool decode]`.

Sends long prompts one at a time: first with every replica of the pool healthy, then with their process trees
stopped (SIGSTOP: a hung node looks like this), then again after SIGCONT. Prints each request's time, status,
route, reason and fallbacks; writes them to `--out` (JSON). With the default config (one replica per pool):
- prefill: a frozen prefill costs its deadline (derived from the prompt size and the measured prefill speed) plus
  the probe, once per replica, until the breaker holds it out; then requests prefill locally at once;
- decode: a request's silent stream costs one probe interval and the probe's timeout, then it is retried; with
  no other decode replica the retry lands on the same frozen replica, is probed again, and the request answers
  503 (twice the probe interval and timeout), not at the end-to-end deadline.
Exits 1 if a request outside the frozen phase failed, or any request took longer than ``--max-s``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import httpx
import psutil

from ..engines import replica_stats, serve_replicas

LONG = "Explain how a steam engine turns heat into motion, step by step, with the history of its invention. " * 18


DEPLOYMENTS = {"prefill": "PrefillServer", "decode": "DecodeServer"}


def replica_pids(deployment: str, app: str = "pdserve") -> list[int]:
    """Pids of the deployment's replica processes (each replica reports its own)."""
    return [replica_stats(*r).pid for r in serve_replicas(app, deployment)]


def send(client: httpx.Client, base: str, model: str, phase: str, i: int) -> dict:
    body = {"model": model, "prompt": f"[{phase} {i} {uuid.uuid4().hex[:8]}] " + LONG, "max_tokens": 8}
    t0 = time.monotonic()
    resp = client.post(base + "/v1/completions", json=body)
    row = {"phase": phase, "status": resp.status_code, "seconds": round(time.monotonic() - t0, 2),
           "route": resp.headers.get("x-pdserve-route"), "reason": resp.headers.get("x-pdserve-route-reason"),
           "fallbacks": resp.headers.get("x-pdserve-fallback", "")}
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--pool", choices=sorted(DEPLOYMENTS), default="prefill", help="the pool whose replicas freeze")
    p.add_argument("--num-requests", type=int, default=4, help="per phase")
    p.add_argument("--max-s", type=float, default=60, help="longer than this is a hung request")
    p.add_argument("--out", help="default: docs/reliability/frozen-<pool>.json")
    args = p.parse_args(argv)
    key = os.environ.get("PDSERVE_API_KEY")
    procs = [q for pid in replica_pids(DEPLOYMENTS[args.pool])
             for q in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]]
    rows = []
    with httpx.Client(timeout=300, headers={"authorization": f"Bearer {key}"} if key else {}) as client:
        rows += [send(client, args.base, args.model, "healthy", i) for i in range(args.num_requests)]
        for q in procs:
            q.send_signal(signal.SIGSTOP)
        try:
            rows += [send(client, args.base, args.model, "frozen", i) for i in range(args.num_requests)]
        finally:
            for q in procs:
                with contextlib.suppress(psutil.NoSuchProcess):  # Serve replaced it (failed health checks)
                    q.send_signal(signal.SIGCONT)
        time.sleep(20)  # past the breaker's cooldown: the replica is probed back
        rows += [send(client, args.base, args.model, "thawed", i) for i in range(args.num_requests)]
    out = Path(args.out or f"docs/reliability/frozen-{args.pool}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    failed = [r for r in rows if r["phase"] != "frozen" and r["status"] != 200]
    hung = [r for r in rows if r["seconds"] > args.max_s]
    return 1 if failed or hung else 0


if __name__ == "__main__":
    sys.exit(main())
