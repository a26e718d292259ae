"""Soak: a steady load for minutes, with client disconnects and bad requests mixed in; then check for leaks.

`make soak` (or `python -m loadtests.reliability.soak`) against a running server (`make run`):
- locust, the `mixed` profile, open loop below the goodput rate (`--rate`), for `--duration-s`;
- beside it, every `--chaos-every-s`: one streaming request that the client drops after its first chunk, and
  one bad request (malformed JSON, an internal field, a list prompt, a null text part, n over its cap, a wrong
  API key, an oversized body, ...), each checked for its expected status;
- RSS of every process of the Ray cluster (raylets, GCS, Serve, every engine process) sampled each
  `--sample-every-s`; growth is compared between minute 2 (warm) and the end;
- afterwards: every engine's KV cache usage and running/waiting requests back to 0, no request hung.

Results: `docs/soak/soak-summary.json`, and the numbers in docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

from ..engines import busy_engines
from ..locust.runner import run_locust

LONG = "Summarise the history of the printing press in Europe, its inventors and its effect on literacy. " * 25


def bad_requests(model: str) -> list[tuple[str, str, dict | bytes, set[int]]]:
    """(name, path, body, allowed statuses): requests a hostile or careless client sends."""
    return [
        ("malformed-json", "/completions", b'{"model": "x", "prompt": [', {400}),
        ("internal-field", "/completions", {"model": model, "prompt": "Hi", "vllm_xargs": {"kv_transfer_params": 0}},
         {400}),
        ("list-prompt", "/completions", {"model": model, "prompt": [LONG, "List the colours"], "max_tokens": 4}, {200}),
        ("null-text-part", "/chat/completions",
         {"model": model, "messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]}, {400}),
        ("n-over-cap", "/completions", {"model": model, "prompt": "Hi", "n": 1000}, {400}),
        ("min-tokens-long", "/completions", {"model": model, "prompt": LONG, "min_tokens": 5, "max_tokens": 6}, {200}),
        ("beam-search", "/completions", {"model": model, "prompt": LONG, "use_beam_search": True, "max_tokens": 4},
         {200}),
        ("too-long", "/completions", {"model": model, "prompt": LONG * 6, "max_tokens": 4}, {400}),  # > 2,048 tokens
        ("oversized", "/completions", {"model": model, "prompt": "x" * (5 * 1024 * 1024)}, {413}),
        ("wrong-model", "/completions", {"model": "nope", "prompt": "Hi"}, {404}),
    ]


def cluster_processes() -> list[psutil.Process]:
    """Every process of the local Ray cluster: raylet/GCS and their descendants (workers, engines)."""
    roots = [p for p in psutil.process_iter(["cmdline"])
             if any(part.endswith(("raylet", "gcs_server")) for part in (p.info["cmdline"] or [])[:1])]
    out = {}
    for root in roots:
        for proc in [root, *root.children(recursive=True)]:
            out[proc.pid] = proc
    return list(out.values())


def rss_snapshot() -> dict[int, tuple[str, int]]:
    snap = {}
    for proc in cluster_processes():
        try:
            snap[proc.pid] = (" ".join(proc.cmdline()[:3])[:120], proc.memory_info().rss)
        except psutil.Error:
            continue
    return snap


class Chaos(threading.Thread):
    """Disconnecting clients and bad requests, at a steady pace, until stopped."""

    def __init__(self, base: str, model: str, every_s: float, headers: dict):
        super().__init__(daemon=True)
        self.base, self.model, self.every_s, self.headers = base, model, every_s, headers
        self.stop = threading.Event()
        self.results: list[dict] = []

    def run(self) -> None:
        bad = bad_requests(self.model)
        i = 0
        with httpx.Client(timeout=120, headers=self.headers) as client:
            while not self.stop.wait(self.every_s):
                self.results.append(self._disconnect(client, i))
                self.results.append(self._bad(client, *bad[i % len(bad)]))
                if i % 5 == 0:
                    self.results.append(self._wrong_key())
                i += 1

    def _disconnect(self, client: httpx.Client, i: int) -> dict:
        body = {"model": self.model, "prompt": f"Soak {i}. " + LONG, "max_tokens": 64, "stream": True}
        with client.stream("POST", self.base + "/v1/completions", json=body) as resp:
            for _ in resp.iter_lines():
                break  # the client goes away after the first chunk
        return {"kind": "disconnect", "status": resp.status_code, "ok": resp.status_code == 200}

    def _bad(self, client: httpx.Client, name: str, path: str, body, allowed: set[int]) -> dict:
        kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
            else {"json": body}
        resp = client.post(self.base + "/v1" + path, **kwargs)
        return {"kind": name, "status": resp.status_code, "ok": resp.status_code in allowed}

    def _wrong_key(self) -> dict:
        resp = httpx.post(self.base + "/v1/completions", headers={"authorization": "Bearer wrong"}, timeout=30,
                          json={"model": self.model, "prompt": "Hi", "max_tokens": 1})
        ok = resp.status_code == 401 if self.headers else resp.status_code == 200
        return {"kind": "wrong-key", "status": resp.status_code, "ok": ok}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="http://127.0.0.1:8000")
    p.add_argument("--metrics", default="http://127.0.0.1:8080/metrics")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--rate", type=float, default=0.5,
                   help="req/s of the steady load: below the goodput rate of the default config (docs/benchmarks.md; "
                        "measured with --max-tokens 64)")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per request, as `make bench` uses")
    p.add_argument("--duration-s", type=float, default=600)
    p.add_argument("--warm-s", type=float, default=120, help="RSS baseline taken after this long")
    p.add_argument("--chaos-every-s", type=float, default=10)
    p.add_argument("--sample-every-s", type=float, default=30)
    p.add_argument("--report", default="docs/soak")
    return p


def _summary(args: argparse.Namespace, load: dict, chaos: Chaos, growth: dict,
             busy: dict[str, dict[str, float]]) -> dict:
    """soak-summary.json: the load's outcome, the chaos requests, the engines still busy, and RSS growth."""
    chaos_failed = [r for r in chaos.results if not r["ok"]]
    return {
        "rate_rps": args.rate, "duration_s": args.duration_s, "locust": {
            k: load.get(k) for k in ("num_requests", "num_ok", "num_failed", "errors", "slo_attainment", "routes")},
        "chaos": {"num_requests": len(chaos.results), "num_unexpected": len(chaos_failed),
                  "unexpected": chaos_failed[:20],
                  "by_kind": {k: sum(1 for r in chaos.results if r["kind"] == k)
                              for k in sorted({r["kind"] for r in chaos.results})}},
        "busy_engines_after": busy, "num_processes": len(growth),
        "worst_rss_growth": max(growth.values(), key=lambda g: g["growth_pct"], default=None),
        "processes_over_10pct": [g for g in growth.values() if g["growth_pct"] >= 10],
        "rss_growth": sorted(growth.values(), key=lambda g: -g["growth_pct"]),
    }


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    key = os.environ.get("PDSERVE_API_KEY")
    headers = {"authorization": f"Bearer {key}"} if key else {}
    report = Path(args.report)
    report.mkdir(parents=True, exist_ok=True)
    chaos = Chaos(args.base, args.model, args.chaos_every_s, headers)
    samples: list[tuple[float, dict]] = []
    load: dict = {}

    def run_load():  # an exception here leaves `load` empty: the soak then fails
        load.update(run_locust(args.base + "/v1", "mixed", args.rate, args.duration_s, report / "locust",
                               model=args.model, seed=7, max_tokens=args.max_tokens, drain_timeout_s=120))

    t0 = time.monotonic()
    loader = threading.Thread(target=run_load, daemon=True)
    loader.start()
    chaos.start()
    while loader.is_alive():
        samples.append((time.monotonic() - t0, rss_snapshot()))
        print(f"[soak] {samples[-1][0]:.0f} s: {len(samples[-1][1])} processes, "
              f"{sum(r for _, r in samples[-1][1].values()) / 2**30:.2f} GiB RSS, {len(chaos.results)} chaos requests",
              flush=True)
        loader.join(args.sample_every_s)
    chaos.stop.set()
    chaos.join(60)
    end = rss_snapshot()
    warm = next((snap for at, snap in samples if at >= args.warm_s), samples[0][1])
    growth = {pid: {"process": name, "rss_warm_mib": round(warm[pid][1] / 2**20, 1),
                    "rss_end_mib": round(rss / 2**20, 1), "growth_pct": round(100 * (rss / warm[pid][1] - 1), 2)}
              for pid, (name, rss) in end.items() if pid in warm and warm[pid][1] > 0}
    busy = busy_engines()
    summary = _summary(args, load, chaos, growth, busy)
    (report / "soak-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "rss_growth"}, indent=2))
    hung = (load.get("errors") or {}).get("cancelled_at_stop", 0) + (load.get("errors") or {}).get("timeout", 0)
    ok = (bool(load) and load.get("num_requests", 0) > 0 and not busy and not summary["chaos"]["num_unexpected"]
          and not summary["processes_over_10pct"] and not hung)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
