"""Where the cores go under load: one load test against a running server while the CPU time of each Serve
replica's process tree (the replica and its vLLM engine processes) and of everything else is sampled.

    python -m loadtests.bench.cpu_profile --rate 1.2 --duration-s 60 --profile mixed --out cpu-profile

Prints, per component, the share of one core it used on average during the run (100% = one core busy the whole
time), so the bottleneck of a setup is named by measurement rather than guessed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import psutil

from ..locust.runner import run_locust

REPLICA_TITLE = "ray::ServeReplica:"


def _component(proc: psutil.Process) -> str | None:
    """``app:Deployment`` for a Serve replica process (by its Ray process title), else None."""
    try:
        cmd = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    if REPLICA_TITLE not in cmd:
        return None
    return cmd.split(REPLICA_TITLE, 1)[1].split(".", 1)[0].split()[0]


def _cpu_s(proc: psutil.Process) -> float:
    try:
        t = proc.cpu_times()
        return t.user + t.system
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0.0


def snapshot() -> dict[str, float]:
    """CPU seconds so far per replica process tree, plus the machine's total busy seconds (``all``)."""
    out: dict[str, float] = {}
    for proc in psutil.process_iter():
        name = _component(proc)
        if name:
            tree = [proc] + proc.children(recursive=True)
            out[name] = out.get(name, 0.0) + sum(_cpu_s(p) for p in tree)
    t = psutil.cpu_times()
    out["all"] = t.user + t.system + t.nice + getattr(t, "irq", 0) + getattr(t, "softirq", 0)
    return out


def profile(base_url: str, rate: float, duration_s: float, out: Path, **options) -> dict:
    """Runs the load test; returns the summary and each component's average share of one core."""
    before, t0 = snapshot(), time.monotonic()
    result = run_locust(base_url, options.pop("profile", "mixed"), rate, duration_s, out, **options)
    after, wall_s = snapshot(), time.monotonic() - t0
    shares = {name: (after[name] - before.get(name, 0.0)) / wall_s for name in after}
    shares["other (locust, Ray, proxy)"] = shares.pop("all") - sum(shares.values())
    return {"summary": result, "wall_s": wall_s, "core_share": shares}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench.cpu_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--profile", default="mixed")
    p.add_argument("--rate", type=float, default=1.2, help="Poisson request rate (req/s)")
    p.add_argument("--duration-s", type=float, default=60)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--out", default="cpu-profile")
    args = p.parse_args(argv)
    out = Path(args.out)
    res = profile(args.base_url, args.rate, args.duration_s, out, profile=args.profile, max_tokens=args.max_tokens,
                  seed=7, no_plots=True)
    (out / "cpu-profile.json").write_text(json.dumps({k: v for k, v in res.items() if k != "summary"}, indent=1))
    s = res["summary"]
    print(f"{args.profile} at {args.rate} req/s for {res['wall_s']:.0f} s: attainment {s['slo_attainment']:.0%}, "
          f"routes {s.get('routes')}")
    print("| component | average share of one core |\n|---|---|")
    for name, share in sorted(res["core_share"].items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {share:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
