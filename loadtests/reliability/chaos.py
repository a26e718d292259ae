"""Chaos runs on the local multi-node cluster: faults under steady locust load, every request's outcome recorded.

    python -m loadtests.reliability.chaos --out docs/chaos          # make chaos; root (network namespaces); ~15 minutes

Starts head, prefill and two decode nodes (cluster/local-multinode.yaml plus a second decode node, one decode replica
per decode node), then runs one locust load test per scenario. Each scenario injects its fault a third of the way
in and heals it (where it heals) at two thirds:

    baseline       no fault
    delay_loss     50 ms delay and 1% loss on the prefill<->decode links only (tc netem; skipped, and said so, on a
                   kernel without netem)
    slow_link      the prefill<->decode links capped at 20 Mbit/s (tc htb): the KV takes seconds to cross
    cut_link       prefill<->decode links cut (the head still reaches every node)
    freeze_prefill every process of the prefill node stopped (SIGSTOP), then continued
    kill_decode    one of the two decode nodes killed (for good)
    kill_prefill   the prefill node killed (for good)

Per scenario: requests sent, completed, failed (clean: an HTTP error or an error event), hung (no end of stream:
must be 0), latency percentiles next to the baseline's, and the routes taken. Writes ``summary.json``, ``chaos.md``
and each scenario's locust report (``requests.jsonl`` has every request) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import yaml

from cluster import multinode

from ..locust.report import SAMPLES_FILE, percentile
from ..locust.runner import run_locust

ROOT = Path(__file__).resolve().parents[2]
PDSERVE = str(Path(sys.executable).with_name("pdserve"))
HUNG_KINDS = {"timeout", "cancelled_at_stop", "incomplete_stream"}  # the request never ended


def chaos_configs(out: Path) -> Path:
    """The shipped multi-node configs with a second decode node; each decode node takes one decode replica."""
    topo = yaml.safe_load((ROOT / "cluster/local-multinode.yaml").read_text())
    serve = yaml.safe_load((ROOT / "cluster" / topo["serve_config"]).read_text())
    decode_nodes = [{"name": f"decode{i}", "role": "decode", "num_cpus": 2, "resources": {"pdserve_decode": 1}}
                    for i in (1, 2)]
    topo["nodes"] = [n for n in topo["nodes"] if n["role"] != "decode"] + decode_nodes
    topo["serve_config"] = "chaos-serve.yaml"
    serve["applications"][0]["args"]["decode"]["num_replicas"] = len(decode_nodes)
    out.mkdir(parents=True, exist_ok=True)
    (out / "chaos-serve.yaml").write_text(yaml.safe_dump(serve, sort_keys=False))
    (out / "chaos-topology.yaml").write_text(yaml.safe_dump(topo, sort_keys=False))
    return out / "chaos-topology.yaml"


def scenarios(nodes: dict[str, tuple[str, str]]) -> list[tuple[str, Callable | None, Callable | None]]:
    """(name, fault, heal) with nodes as {name: (namespace, address)}."""
    prefill, decodes = nodes["prefill1"], [nodes["decode1"], nodes["decode2"]]

    def each_link(fn, **kw):
        return lambda: [fn(prefill, d, **kw) for d in decodes]

    return [
        ("baseline", None, None),
        ("delay_loss", each_link(multinode.degrade_link, delay_ms=50, loss_pct=1), each_link(multinode.degrade_link)),
        ("slow_link", each_link(multinode.degrade_link, rate_mbit=20), each_link(multinode.degrade_link)),
        ("cut_link", each_link(multinode.cut_link), each_link(multinode.cut_link, cut=False)),
        ("freeze_prefill", lambda: multinode.freeze_node(prefill[0]), lambda: multinode.freeze_node(prefill[0], False)),
        ("kill_decode", lambda: multinode.kill_node(decodes[1][0]), None),
        ("kill_prefill", lambda: multinode.kill_node(prefill[0]), None),
    ]


def outcome(report_dir: Path, baseline: dict | None) -> dict:
    samples = [json.loads(line) for line in (report_dir / SAMPLES_FILE).read_text().splitlines()]
    ok = [s for s in samples if s["ok"]]
    kinds = Counter(s["error_kind"] for s in samples if not s["ok"])
    e2e, ttft = [s["e2e_s"] for s in ok], [s["ttft_s"] for s in ok if s["ttft_s"] is not None]
    hung = sum(n for k, n in kinds.items() if k in HUNG_KINDS)
    out = {"sent": len(samples), "completed": len(ok), "failed": sum(kinds.values()) - hung, "hung": hung,
           "errors": dict(kinds),
           "routes": dict(Counter(s["route"] or "?" for s in ok)),
           "route_reasons": dict(Counter(s.get("route_reason") or "?" for s in ok)),
           "e2e_s": {"p50": percentile(e2e, 50), "p99": percentile(e2e, 99), "max": max(e2e, default=None)},
           "ttft_s": {"p50": percentile(ttft, 50), "p99": percentile(ttft, 99)}}
    if baseline and out["e2e_s"]["p50"] and baseline["e2e_s"]["p50"]:
        out["e2e_p50_vs_baseline"] = round(out["e2e_s"]["p50"] / baseline["e2e_s"]["p50"], 2)
        out["e2e_p99_vs_baseline"] = round(out["e2e_s"]["p99"] / baseline["e2e_s"]["p99"], 2)
    return out


def run_scenario(base_url: str, name: str, fault, heal, args, out: Path) -> Path:
    """Load with the fault in its middle third; the report folder."""
    report_dir = out / name
    load = threading.Thread(target=run_locust, daemon=True, kwargs=dict(
        base_url=base_url, profile=args.profile, rate=args.rate, duration_s=args.phase_s, report_dir=report_dir,
        max_tokens=args.max_tokens, request_timeout_s=args.hung_after_s, drain_timeout_s=args.hung_after_s,
        seed=len(name), no_plots=True))
    load.start()
    time.sleep(args.phase_s / 3)
    if fault:
        print(f"[chaos] {name}: fault", flush=True)
        fault()
    time.sleep(args.phase_s / 3)
    if heal:
        print(f"[chaos] {name}: healed", flush=True)
        heal()
    load.join()
    return report_dir


def warm_up(base_url: str) -> None:
    """A few requests before the baseline: the first prefills, NIXL handshakes and pulls of a fresh cluster are
    slower, and would count against the baseline."""
    import httpx

    headers = {"authorization": f"Bearer {os.environ['PDSERVE_API_KEY']}"} if os.environ.get("PDSERVE_API_KEY") else {}
    for i in range(4):
        body = {"model": "smollm2-135m-instruct", "max_tokens": 4,
                "prompt": f"[warm-up {i}] " + "A long report of the northern mill and its workers. " * 80}
        httpx.post(f"{base_url}/v1/completions", json=body, headers=headers, timeout=120)


def render(results: dict, args) -> str:
    lines = [f"Load: locust `{args.profile}` profile, {args.rate} req/s open loop, {args.max_tokens} output tokens, "
             f"{args.phase_s:.0f} s per scenario; fault at 1/3, healed at 2/3 (where it heals). Hung: no end of "
             f"stream within {args.hung_after_s:.0f} s.", "",
             "| scenario | sent | completed | failed | hung | e2e p50 / p99 (s) | vs baseline p50 / p99 | TTFT p99 (s) "
             "| routes | errors |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "skipped" in r:
            lines.append(f"| {name} | not run: {r['skipped']} |||||||||")
            continue
        lines.append(f"| {name} | {r['sent']} | {r['completed']} | {r['failed']} | {r['hung']} | "
                     f"{r['e2e_s']['p50'] or 0:.2f} / {r['e2e_s']['p99'] or 0:.2f} | "
                     f"{r.get('e2e_p50_vs_baseline', '-')}x / {r.get('e2e_p99_vs_baseline', '-')}x | "
                     f"{r['ttft_s']['p99'] or 0:.2f} | "
                     f"{', '.join(f'{k} {v}' for k, v in sorted(r['routes'].items()))} | "
                     f"{', '.join(f'{k} {v}' for k, v in sorted(r['errors'].items())) or '-'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/chaos", help="where the results go")
    parser.add_argument("--phase-s", type=float, default=120, help="seconds of load per scenario")
    parser.add_argument("--rate", type=float, default=0.1, help="requests per second (open loop)")
    parser.add_argument("--profile", default="rag", help="locust workload profile (rag: long prompts, disaggregated)")
    parser.add_argument("--max-tokens", type=int, default=24, help="output tokens per request")
    parser.add_argument("--hung-after-s", type=float, default=120, help="a request without an end by then hung")
    parser.add_argument("--only", nargs="*", help="run only these scenarios (baseline always runs)")
    args = parser.parse_args(argv)
    why = multinode.preflight()
    if why:
        print(f"chaos: {why}", file=sys.stderr)
        return 2
    out = Path(args.out)
    topology = chaos_configs(out)
    topo, _ = multinode.load_topology(topology)
    nodes = {n.name: (multinode.namespace(n), topo.address(n)) for n in topo.nodes}
    env = os.environ | {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    subprocess.run([PDSERVE, "up", "--topology", str(topology)], env=env, check=True)
    base_url = f"http://{nodes['head'][1]}:8000"
    results: dict[str, dict] = {}
    try:
        warm_up(base_url)
        for name, fault, heal in scenarios(nodes):
            if args.only and name != "baseline" and name not in args.only:
                continue
            print(f"[chaos] {name}: {args.phase_s:.0f} s of load", flush=True)
            missing = multinode.missing_qdisc("netem") if name == "delay_loss" else None
            if missing:
                results[name] = {"skipped": missing}
                print(f"[chaos] {name}: skipped: {missing}", flush=True)
                continue
            report_dir = run_scenario(base_url, name, fault, heal, args, out)
            results[name] = outcome(report_dir, results.get("baseline"))
            print(f"[chaos] {name}: {json.dumps(results[name])}", flush=True)
            time.sleep(15)  # let breakers close and queues drain between scenarios
    finally:
        subprocess.run([PDSERVE, "down"], env=env, check=False)
    (out / "summary.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "chaos.md").write_text(render(results, args))
    print(render(results, args))
    return 0 if all(r.get("hung", 0) == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
