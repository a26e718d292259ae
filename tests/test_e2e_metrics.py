"""Metrics through a real Prometheus server scraping the cluster's one scrape target (:8080), promtool's lint,
the per-request timing breakdown against client-side clocks, and the Grafana dashboard against the live scrape."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from deployments.metrics import LATENCY_BUCKETS_S

from .conftest import AUTH
from .prompts import SHORT, long_prompt, tagged

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parent.parent
SCRAPE = "http://127.0.0.1:8080/metrics"
PROM_PORT = 9091
DASHBOARD = ROOT / "helm/pdserve/dashboards/pdserve.json"
METRICS_SOURCE = ROOT / "deployments/metrics.py"
# Ray's exporter labels every metric with its own camelCase labels (Component, WorkerId, NodeAddress, ...).
RAY_LABEL_LINT = "label names should be written in 'snake_case' not 'camelCase'"


@pytest.fixture(scope="module")
def prometheus(cluster, tmp_path_factory):
    binary = shutil.which("prometheus")
    assert binary, "the Prometheus server is installed by .ci/run (Debian package 'prometheus')"
    work = tmp_path_factory.mktemp("prometheus")
    (work / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n  - job_name: pdserve\n    static_configs: [{targets: ['127.0.0.1:8080']}]\n")
    proc = subprocess.Popen([binary, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
                             f"--web.listen-address=127.0.0.1:{PROM_PORT}"],
                            stdout=subprocess.DEVNULL, stderr=open(work / "prometheus.log", "w"))  # noqa: SIM115 (kept open for the server's life)
    try:
        _until(lambda: _query("up") == 1.0, 60, "Prometheus never scraped the cluster")
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _query(promql: str) -> float | None:
    try:
        resp = httpx.get(f"http://127.0.0.1:{PROM_PORT}/api/v1/query", params={"query": promql}, timeout=10)
        result = resp.json()["data"]["result"]
    except (httpx.HTTPError, ValueError, KeyError):  # not up yet, or the expression was refused
        return None
    return float(result[0]["value"][1]) if result else 0.0


def _buckets(metric: str) -> dict[float, float]:
    """Cumulative bucket counts of a histogram summed over its series: {upper bound: count}."""
    resp = httpx.get(f"http://127.0.0.1:{PROM_PORT}/api/v1/query", params={"query": f"sum by (le) ({metric}_bucket)"},
                     timeout=10)
    return {float(r["metric"]["le"]): float(r["value"][1]) for r in resp.json()["data"]["result"]}


def _until(predicate, timeout_s: float, message: str):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, message
        time.sleep(1)


TTFT = "ray_pdserve_time_to_first_token_seconds"
NIXL_TRANSFERS = 'sum(ray_vllm_nixl_xfer_time_seconds_count{ReplicaId=~"%s"})'
QUERIES = {
    "requests": "sum(ray_pdserve_requests_total)",
    "disaggregated": 'sum(ray_pdserve_requests_total{route="disaggregated"})',
    "e2e_count": "sum(ray_pdserve_e2e_request_latency_seconds_count)",
    "ttft_count": "sum(ray_pdserve_time_to_first_token_seconds_count)",
    "transfer_count": "sum(ray_pdserve_kv_transfer_time_seconds_count)",
    "decisions": "sum(ray_pdserve_routing_decisions_total)",
}


def _stream(base: str, model: str, prompt: str) -> tuple[float, float, dict]:
    """(client TTFT, client e2e, pdserve_timing of the final usage chunk) of one streamed completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0, ttft, timing = time.monotonic(), None, None
    with httpx.stream("POST", base + "/completions", json=body, timeout=120, headers=AUTH) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            ttft = ttft or time.monotonic() - t0
            timing = json.loads(line[6:]).get("pdserve_timing") or timing
    return ttft, time.monotonic() - t0, timing


def test_prometheus_counts_match_what_was_sent(cluster, prometheus):
    decode_ids = "|".join(r.id for r in cluster.replicas("DecodeServer"))
    queries = QUERIES | {"nixl": NIXL_TRANSFERS % decode_ids}
    time.sleep(12)  # let earlier tests' metrics settle (Ray exports every few seconds)
    before = {k: _query(q) for k, q in queries.items()}
    ttft_buckets_before = _buckets(TTFT)
    results = []
    for i in range(3):
        prompt = tagged(f"m{i}{uuid.uuid4().hex}", long_prompt(30))
        results.append(("disaggregated", *_stream(cluster.pd, cluster.model, prompt)))
        results.append(("local_prefill", *_stream(cluster.pd, cluster.model, tagged(f"s{i}{uuid.uuid4().hex}", SHORT))))
    delta = lambda k: _query(queries[k]) - before[k]  # noqa: E731
    _until(lambda: delta("requests") >= 6 and delta("nixl") >= 3, 60, "metrics did not arrive in Prometheus")
    time.sleep(3)  # one more scrape: nothing beyond what was sent may show up
    assert delta("requests") == 6
    assert delta("disaggregated") == 3
    assert delta("decisions") == 6
    assert delta("e2e_count") == 6 and delta("ttft_count") == 6  # histograms consistent with the counter
    assert delta("transfer_count") == 3
    assert delta("nixl") == 3  # the decode engines' own NIXL transfer count: one per disaggregated request

    for route, client_ttft, client_e2e, timing in results:
        assert timing["route"] == route
        parts = timing["queue_s"] + timing["prefill_s"] + timing["transfer_s"] + timing["decode_s"]
        # the parts partition the ingress's time; the client also pays the HTTP proxy hop
        assert abs(parts - timing["e2e_s"]) < 0.005
        assert 0 <= client_e2e - timing["e2e_s"] < 0.25 + 0.05 * client_e2e, (client_e2e, timing)
        assert abs(client_ttft - timing["ttft_s"]) < 0.25 + 0.1 * client_ttft, (client_ttft, timing)
        assert (timing["transfer_s"] > 0) == (route == "disaggregated")
    # Ray's exporter rebuilds a histogram's _sum from bucket midpoints, so the exact check is per bucket: each
    # request's TTFT (as its timing told the client, itself checked against the client's clock) in its bucket
    ttft_buckets = {le: n - ttft_buckets_before.get(le, 0.0) for le, n in _buckets(TTFT).items()}
    assert set(LATENCY_BUCKETS_S) <= set(ttft_buckets), ttft_buckets
    ttfts = [timing["ttft_s"] for *_, timing in results]
    assert ttft_buckets == {le: sum(t <= le for t in ttfts) for le in ttft_buckets}, (ttft_buckets, ttfts)


def test_promtool_accepts_the_scrape(cluster, prometheus):
    scrape = httpx.get(SCRAPE, timeout=30).text
    promtool = subprocess.run(["promtool", "check", "metrics"], input=scrape, capture_output=True, text=True)
    problems = [line for line in (promtool.stdout + promtool.stderr).splitlines() if line.strip()]
    ours = [p for p in problems if "pdserve" in p and RAY_LABEL_LINT not in p]
    assert not ours, ours  # pdserve's names, types, units and help texts pass promtool's lint
    assert "error while linting" not in promtool.stderr  # the exposition format parses
    families = set(re.findall(r"^# TYPE (ray_pdserve_\w+) (\w+)", scrape, re.M))
    for name, kind in families:
        assert name.endswith("_total") == (kind == "counter"), (name, kind)
    assert {"ray_pdserve_requests_total", "ray_pdserve_kv_transfer_size_bytes"} <= {n for n, _ in families}
    assert re.search(r"^ray_vllm_nixl_bytes_transferred_sum\{.*ReplicaId=", scrape, re.M)  # engines, by replica


def test_dashboard_queries_name_only_scraped_metrics(cluster, prometheus):
    """Checked while a long request runs: Ray's exporter drops gauges (engine load) that idle engines stop setting."""
    dashboard = json.loads(DASHBOARD.read_text())
    body = {"model": cluster.model, "prompt": tagged(uuid.uuid4().hex, long_prompt(30)), "max_tokens": 150,
            "temperature": 0, "ignore_eos": True}
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(httpx.post, cluster.pd + "/completions", json=body, timeout=300, headers=AUTH)
        time.sleep(6)
        scraped = set(re.findall(r"^([a-zA-Z_:][\w:]*)(?:\{| )", httpx.get(SCRAPE, timeout=30).text, re.M))
        assert running.result().status_code == 200
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 8
    # a counter is scraped from its first increment on; an expression may name one not yet scraped (a failure
    # that has not happened) only with a 0 to show until then
    counters = {f"ray_{n}_total" for n in re.findall(r'Counter\(\s*"(\w+)"', METRICS_SOURCE.read_text())}
    functions = {"sum", "rate", "histogram_quantile", "by", "le", "increase", "clamp_min", "avg", "max", "without",
                 "on", "ignoring", "irate", "route", "pool", "reason", "kind", "model", "ReplicaId", "status",
                 "outcome", "phase", "deployment", "application", "group_left", "role", "or", "vector"}
    for expr in exprs:
        names = set(re.findall(r"(?<![\w.])[a-zA-Z_:][\w:]*", re.sub(r'"[^"]*"|\[[^\]]*\]', "", expr))) - functions
        missing = names - scraped - (counters if expr.endswith(" or vector(0)") else set())
        assert not missing, f"{expr}: {missing} not in the scrape"
        assert _query(expr) is not None, expr  # Prometheus accepts the expression
