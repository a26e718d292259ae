"""Goodput benchmark, as DistServe defines it: the highest Poisson request rate at which at least 90% of
requests meet both the TTFT and the TPOT target, found per setup by a sweep of rates (doubling while the
setup keeps up, then bisecting), each setup started fresh on the same machine in the same run, all on the same
cores with the engines' defaults (eager, as ``engine.enforce_eager`` defaults; docs/benchmarks.md says why):
pdserve elastic, pdserve colocated (one engine on both cores, and two one-core engines with least-loaded
routing), pdserve static PD, and Ray Serve LLM's ``build_pd_openai_app`` as shipped and with pdserve's NIXL
idle-spin fix (loadtests/bench/peer.py).

    python -m loadtests.bench --profiles mixed,rag,chat,long --duration-s 60 --out bench-results      (or: make bench)

Prints and writes, per profile (``<out>/<profile>/bench.md``, ``bench.json``, ``attainment.png``), a table of
goodput, SLO attainment, p50/p99 TTFT, p99 ITL and throughput per setup, pdserve elastic's ratios to each other
setup, and the elastic policy's decisions (local / disaggregated, and why) at three rates; ``<out>/bench.md``
holds every profile's tables.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from ..locust.runner import run_locust

ROOT = Path(__file__).resolve().parents[2]
TARGET_ATTAINMENT = 0.9
# name -> how to start it: a pdserve Serve config and edits to its app's args, or the Ray Serve LLM peer's
# variant (loadtests/bench/peer.py). Equal total cores (2 here) for every setup.
SETUPS: dict[str, tuple[str, str, dict]] = {
    "pdserve-colocated": ("pdserve", "cluster/local-colocated.yaml", {
        "colocated": {"num_replicas": 1, "num_cpus": 2, "cpu_bind": ["0-1"]}}),
    "pdserve-colocated-2x1": ("pdserve", "cluster/local-colocated.yaml", {
        "colocated": {"num_replicas": 2, "num_cpus": 1, "cpu_bind": ["0", "1"]},
        "routing": {"decode_policy": "least_loaded"}}),
    "pdserve-elastic": ("pdserve", "cluster/local-elastic.yaml", {}),
    "pdserve-pd": ("pdserve", "cluster/local-disaggregated.yaml", {}),
    "rayllm-pd": ("peer", "shipped", {}),
    "rayllm-pd-nixl-fix": ("peer", "nixl-fix", {}),
}
# What `make bench` runs: the colocated setups first (every later setup also runs the best one's goodput rate), the
# peer as shipped (its NIXL-fix variant on request: --setups).
DEFAULT_SETUPS = ("pdserve-colocated", "pdserve-colocated-2x1", "pdserve-elastic", "pdserve-pd", "rayllm-pd")
BASE = "pdserve-elastic"
COLOCATED_SETUPS = ("pdserve-colocated", "pdserve-colocated-2x1")
PEERS = tuple(name for name, (kind, _, _) in SETUPS.items() if kind == "peer")


def _say(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def _pdserve(*args: str, timeout_s: float = 1200) -> None:
    subprocess.run([str(Path(sys.executable).with_name("pdserve")), *args], check=True, timeout=timeout_s,
                   env=os.environ | {"HF_HUB_OFFLINE": "1"})


def _config(setup: str, out: Path, engine_dtype: str | None = None, batched_tokens: int | None = None) -> Path:
    kind, path, edits = SETUPS[setup]
    assert kind == "pdserve", f"{setup} is not started from a pdserve config"
    doc = yaml.safe_load((ROOT / path).read_text())
    args = doc["applications"][0]["args"]
    for key, value in edits.items():
        args[key] = args.get(key, {}) | value
    if engine_dtype:
        args["engine"] = args.get("engine", {}) | {"dtype": engine_dtype}
    if batched_tokens:  # chunked prefill in steps of this many tokens
        args["engine"] = args.get("engine", {}) | {"max_num_batched_tokens": batched_tokens}
    target = out / f"{setup}.yaml"
    target.write_text(yaml.safe_dump(doc))
    return target


def _start(setup: str, out: Path, engine_dtype: str | None = None, batched_tokens: int | None = None) -> None:
    kind, target, _ = SETUPS[setup]
    if kind == "pdserve":
        _pdserve("up", "--config", str(_config(setup, out, engine_dtype, batched_tokens)))
    else:
        subprocess.run([sys.executable, "-m", "loadtests.bench.peer", "up", "--variant", target], check=True,
                       timeout=1200, cwd=ROOT, env=os.environ | {"HF_HUB_OFFLINE": "1"})


def _stop(setup: str) -> None:
    if SETUPS[setup][0] == "pdserve":
        _pdserve("down")
    else:
        subprocess.run([sys.executable, "-m", "loadtests.bench.peer", "down"], check=False, cwd=ROOT)


def rate_seed(seed: int, rate: float | None) -> int:
    """The prompt seed of one run of a sweep: each rate draws its own prompts (the same ones in every setup), and
    the warmup (``rate`` None) others again. Prompt ``i`` depends only on the seed, so runs with one seed send the
    same prompts: every run after the first would then find them in the engines' prefix caches and measure cached
    prefills (a ~1.3k-token ``rag`` prompt: ~2.5 s on one core, ~0.15 s from the cache)."""
    return seed * 100_000 + (0 if rate is None else 1 + round(rate * 1000))


def sweep(base_url: str, out: Path, profile: str, duration_s: float, start_rps: float, num_bisect: int,
          extra_rates: tuple[float, ...] = (), min_requests: int = 0, warmup_s: float = 0, seed: int = 0,
          **options) -> list[dict]:
    """Runs at increasing rates until attainment drops below the target, then bisects; then runs any of
    ``extra_rates`` (e.g. another setup's goodput rate, to compare latencies at one rate) not yet run. A rate runs
    ``duration_s``, or longer where that is needed for ``min_requests`` requests (low rates: one missed request
    out of five is no measurement). ``warmup_s`` of load at the first rate goes first, unmeasured. Every run sends
    prompts no other run of the sweep sends (``rate_seed``)."""
    runs: list[dict] = []
    if warmup_s > 0:  # a fresh engine's first requests pay one-time costs (kernels for new shapes): not measured
        run_locust(base_url, profile, start_rps, warmup_s, out / "warmup", seed=rate_seed(seed, None), **options)

    def run(rate: float) -> float:
        seconds = max(duration_s, min_requests / rate)
        summary = run_locust(base_url, profile, rate, seconds, out / f"rate-{rate:.3f}", seed=rate_seed(seed, rate),
                             **options)
        runs.append({"rate_rps": rate} | {k: summary[k] for k in (
            "slo_attainment", "goodput_rps", "requests_per_s", "output_tokens_per_s", "num_requests", "num_failed",
            "latency_s", "routes")} | {"route_reasons": summary.get("route_reasons", {})})
        lat = summary["latency_s"]
        _say(f"{out.name} @ {rate:.3f} req/s: attainment {summary['slo_attainment']:.0%} of "
             f"{summary['num_requests']}, TTFT p50 {lat['ttft']['p50']}, ITL p99 {lat['itl']['p99']}")
        return summary["slo_attainment"]

    good, bad, rate = 0.0, None, start_rps
    while bad is None and rate <= 64:
        if run(rate) >= TARGET_ATTAINMENT:
            good, rate = rate, rate * 2
        else:
            bad = rate
    for _ in range(num_bisect if bad is not None else 0):
        mid = (good + bad) / 2
        if run(mid) >= TARGET_ATTAINMENT:
            good = mid
        else:
            bad = mid
    for rate in extra_rates:
        if rate > 0 and at_rate(runs, rate) is None:
            run(rate)
    return sorted(runs, key=lambda r: r["rate_rps"])


def goodput(runs: list[dict]) -> float:
    """The highest swept rate that met the attainment target, below the lowest one that did not."""
    misses = [r["rate_rps"] for r in runs if r["slo_attainment"] < TARGET_ATTAINMENT]
    ceiling = min(misses) if misses else float("inf")
    meets = [r["rate_rps"] for r in runs if r["slo_attainment"] >= TARGET_ATTAINMENT and r["rate_rps"] < ceiling]
    return max(meets, default=0.0)


def at_rate(runs: list[dict], rate: float) -> dict | None:
    """The run at ``rate`` (within 1%), if any."""
    return next((r for r in runs if abs(r["rate_rps"] - rate) <= 0.01 * rate), None)


def best_colocated(results: dict[str, list[dict]]) -> str | None:
    """The colocated setup with the highest goodput in this run."""
    ran = [name for name in COLOCATED_SETUPS if name in results]
    return max(ran, key=lambda name: goodput(results[name]), default=None)


def _ref_rate(results: dict[str, list[dict]]) -> float:
    """Latencies are compared at the best colocated setup's goodput rate (else the lowest rate every setup ran)."""
    best = best_colocated(results)
    rate = goodput(results[best]) if best else 0.0
    if rate and all(at_rate(runs, rate) for runs in results.values()):
        return rate
    common = [r["rate_rps"] for r in next(iter(results.values()))
              if all(at_rate(runs, r["rate_rps"]) for runs in results.values())]
    return min(common, default=rate)


def _ratio(a: float, b: float) -> str:
    if b == 0:
        return "n/a (0 in both)" if a == 0 else "∞ (denominator 0)"
    return f"{a / b:.2f}"


def table(results: dict[str, list[dict]]) -> str:
    """Per setup: goodput and latencies at the reference rate; then pdserve elastic's ratios to every other setup."""
    ref = _ref_rate(results)
    rows = [f"Latency and throughput columns at {ref:.3f} req/s (the best colocated setup's goodput rate, where "
            "every setup ran it).", "",
            "| setup | goodput (req/s) | SLO attainment | TTFT p50 (s) | TTFT p99 (s) | ITL p99 (s) | "
            "throughput (tok/s) |", "|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        r = at_rate(runs, ref)
        if r is None:
            rows.append(f"| {name} | {goodput(runs):.3f} | not run at {ref:.3f} req/s | | | | |")
            continue
        lat = r["latency_s"]
        rows.append(f"| {name} | {goodput(runs):.3f} | {r['slo_attainment']:.0%} | {lat['ttft']['p50']:.3f} | "
                    f"{lat['ttft']['p99']:.3f} | {lat['itl']['p99']:.3f} | {r['output_tokens_per_s']:.1f} |")
    if BASE in results and len(results) > 1:
        rows += ["", "| ratio | goodput | ITL p99 | TTFT p50 | TTFT p99 | throughput |", "|---|---|---|---|---|---|"]
        mine = at_rate(results[BASE], ref)
        for name, runs in results.items():
            other = at_rate(runs, ref)
            if name == BASE or mine is None or other is None:
                continue
            cells = [_ratio(goodput(results[BASE]), goodput(runs))]
            cells += [_ratio(mine["latency_s"][k][q], other["latency_s"][k][q])
                      for k, q in (("itl", "p99"), ("ttft", "p50"), ("ttft", "p99"))]
            cells.append(_ratio(mine["output_tokens_per_s"], other["output_tokens_per_s"]))
            rows.append(f"| {BASE} / {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(results: dict[str, list[dict]], path: Path, profile: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, runs in results.items():
        ax.plot([r["rate_rps"] for r in runs], [100 * r["slo_attainment"] for r in runs], marker="o", label=name)
    ax.axhline(100 * TARGET_ATTAINMENT, color="grey", linestyle="--", label="90% target")
    ax.set_xlabel("request rate (req/s, Poisson)")
    ax.set_ylabel("SLO attainment (% of requests)")
    ax.set_title(f"SLO attainment vs request rate, profile '{profile}'")
    ax.set_ylim(0, 105)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def decisions(runs: list[dict], num_rates: int = 3) -> str:
    """How the elastic policy routed requests at (up to) three rates: lowest, middle and highest swept."""
    runs = sorted(runs, key=lambda r: r["rate_rps"])
    picked = runs if len(runs) <= num_rates else [runs[0], runs[len(runs) // 2], runs[-1]]
    rows = ["| rate (req/s) | local | disaggregated | why (route/reason: requests) |", "|---|---|---|---|"]
    for r in picked:
        routes = r.get("routes", {})
        why = ", ".join(f"{k}: {n}" for k, n in r.get("route_reasons", {}).items())
        rows.append(f"| {r['rate_rps']:.3f} | {routes.get('local_prefill', 0)} | {routes.get('disaggregated', 0)} | "
                    f"{why} |")
    return "\n".join(rows)


def per_rate(results: dict[str, list[dict]]) -> str:
    """SLO attainment of every setup at every rate any of them ran (blank: not run there), and the hand-offs'
    ``transfer_s`` p90 where requests were disaggregated (pdserve's own timing of each request)."""
    rates = sorted({r["rate_rps"] for runs in results.values() for r in runs})
    rows = ["| rate (req/s) | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for rate in rates:
        cells = []
        for runs in results.values():
            r = at_rate(runs, rate)
            transfer = (r["latency_s"].get("transfer") or {}) if r else {}
            p90 = f", transfer p90 {transfer['p90']:.2f} s" if transfer.get("count") else ""
            cells.append(f"{r['slo_attainment']:.0%}{p90}" if r else "")
        rows.append(f"| {rate:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def report(results: dict[str, list[dict]], profile: str) -> str:
    md = [f"### Profile `{profile}`", "", table(results), "", "SLO attainment at every rate swept:", "",
          per_rate(results)]
    best = best_colocated(results)
    if best:
        md += ["", f"Best colocated setup: `{best}` ({goodput(results[best]):.3f} req/s)."]
    if BASE in results:
        md += ["", f"`{BASE}` policy decisions:", "", decisions(results[BASE])]
    return "\n".join(md)


def machine(cpuinfo: str | None = None, num_cores: int | None = None) -> str:
    """One line on the CPU a run measured: its model, cores, and whether it has bf16 instructions (without them the
    engines' bf16 matmuls are emulated: 4.1x slower prefill on one core, docs/benchmarks.md run G)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields = dict(line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    bf16 = sorted(flags & {"avx512_bf16", "amx_bf16"})
    cores = num_cores if num_cores is not None else len(os.sched_getaffinity(0))
    return (f"{cores} core{'' if cores == 1 else 's'}, {fields.get('model name', 'unknown CPU')}, bf16 instructions: "
            f"{', '.join(bf16) if bf16 else 'none (bf16 matmuls emulated)'}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--setups", default=",".join(DEFAULT_SETUPS), help="comma-separated, run in this order, of: "
                   + ", ".join(SETUPS) + " (run the colocated setups first: the best one's goodput rate is run by "
                   "every later setup)")
    p.add_argument("--profiles", default="mixed,rag,chat,long",
                   help="workload profiles (loadtests/locust/workloads.py)")
    # defaults sized for one run of every setup in about 70 minutes on two cores (docs/benchmarks.md)
    p.add_argument("--duration-s", type=float, default=25, help="seconds per rate")
    p.add_argument("--start-rps", type=float, default=0.3, help="first rate of the sweep")
    p.add_argument("--num-bisect", type=int, default=1, help="bisection steps after the first miss")
    p.add_argument("--min-requests", type=int, default=16, help="a rate runs long enough for this many requests")
    p.add_argument("--warmup-s", type=float, default=20, help="unmeasured load before each sweep")
    p.add_argument("--extra-rates", default="", help="comma-separated rates every setup also runs (e.g. another run's "
                   "best colocated goodput rate, when only some setups run)")
    p.add_argument("--slo-ttft-s", type=float, default=5.0)
    p.add_argument("--slo-tpot-s", type=float, default=0.1)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--ignore-eos", action="store_true", help="answers of exactly --max-tokens: every setup then gets "
                   "the same work (the model samples at temperature 1: answers otherwise end at random lengths)")
    p.add_argument("--engine-dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="every pdserve setup's engine.dtype instead of its config's (bfloat16): e.g. float32 on a CPU "
                   "without bf16 instructions (see machine:). The peer runs as shipped: not with peer setups")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="every pdserve setup's engine.max_num_batched_tokens (chunked prefill in steps of this many "
                   "tokens) instead of vLLM's default")
    p.add_argument("--out", default="bench-results", help="results folder")
    return p


def _write_reports(results: dict[str, dict[str, list[dict]]], out: Path, header: str, started: float) -> str:
    """Each profile's table, plot and bench.md, and ``<out>/bench.md`` with all of them; returns that text."""
    md = [header]
    for profile, by_setup in results.items():
        md.append(report(by_setup, profile))
        (out / profile / "bench.md").write_text(md[-1] + "\n")
        plot(by_setup, out / profile / "attainment.png", profile)
    md.append(f"Whole run: {(time.monotonic() - started) / 60:.0f} minutes.")
    (out / "bench.md").write_text("\n\n".join(md) + "\n")
    return "\n\n".join(md)


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    setups, profiles = args.setups.split(","), args.profiles.split(",")
    extra = tuple(float(r) for r in args.extra_rates.split(",") if r)
    unknown = set(setups) - set(SETUPS)
    if unknown:
        p.error(f"unknown setup(s): {', '.join(sorted(unknown))}")
    if (args.engine_dtype or args.max_num_batched_tokens) and set(setups) & set(PEERS):
        p.error("--engine-dtype and --max-num-batched-tokens apply to pdserve setups only; drop "
                f"{', '.join(sorted(set(setups) & set(PEERS)))}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, list[dict]]] = {profile: {} for profile in profiles}
    from deployments.settings import EngineSettings

    defaults = EngineSettings()
    _say(f"engines as users get them by default: enforce_eager={defaults.enforce_eager} "
         "(engine.enforce_eager; docs/benchmarks.md, compiled vs eager)")
    dtype = f"{args.engine_dtype} (--engine-dtype)" if args.engine_dtype else f"{defaults.dtype} (default)"
    _say(f"engine dtype: {dtype}; max_num_batched_tokens: {args.max_num_batched_tokens or 'vLLM default'}")
    on = machine()
    _say(f"machine: {on}")
    started = time.monotonic()
    for setup in setups:  # each setup started fresh once, then swept on every profile
        _say(f"starting {setup} fresh")
        _stop(setup)
        t0 = time.monotonic()
        _start(setup, out, args.engine_dtype, args.max_num_batched_tokens)
        _say(f"{setup} ready in {time.monotonic() - t0:.0f} s")
        try:
            for profile in profiles:
                best = best_colocated(results[profile])
                results[profile][setup] = sweep(
                    "http://127.0.0.1:8000", out / profile / setup, profile, args.duration_s, args.start_rps,
                    args.num_bisect, extra_rates=((goodput(results[profile][best]),) if best else ()) + extra,
                    min_requests=args.min_requests, warmup_s=args.warmup_s,
                    slo_ttft_s=args.slo_ttft_s, slo_tpot_s=args.slo_tpot_s, max_tokens=args.max_tokens, seed=7,
                    ignore_eos=args.ignore_eos,
                    drain_timeout_s=120, no_plots=True)
                (out / profile / "bench.json").write_text(json.dumps(results[profile], indent=1))  # partial results
        finally:
            _stop(setup)
    print(_write_reports(results, out, f"Machine: {on}. Engine dtype: {dtype}.", started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
