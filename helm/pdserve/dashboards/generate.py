"""Writes pdserve.json, the Grafana dashboard the chart ships (run: python helm/pdserve/dashboards/generate.py).

Metric names as the Ray node's scrape target exposes them: Ray prefixes application metrics with ``ray_``
(pdserve_requests_total → ray_pdserve_requests_total, vllm:nixl_bytes_transferred → ray_vllm_nixl_bytes_transferred).
tests/test_e2e_metrics.py checks every expression against a live scrape.
"""

import json
from pathlib import Path

Q = "histogram_quantile({q}, sum by (le, route) (rate(ray_pdserve_{m}_bucket[1m])))"
PANELS = [
    ("TTFT p50 / p99 by path", "s", [(Q.format(q=0.5, m="time_to_first_token_seconds"), "p50 {{route}}"),
                                      (Q.format(q=0.99, m="time_to_first_token_seconds"), "p99 {{route}}")]),
    ("Inter-token latency p50 / p99 by path", "s", [(Q.format(q=0.5, m="inter_token_latency_seconds"), "p50 {{route}}"),
                                                     (Q.format(q=0.99, m="inter_token_latency_seconds"), "p99 {{route}}")]),
    ("Goodput: requests meeting TTFT and ITL targets", "reqps", [
        ("sum by (route) (rate(ray_pdserve_slo_met_requests_total[1m]))", "goodput {{route}}"),
        ('sum by (route) (rate(ray_pdserve_requests_total{outcome="ok"}[1m]))', "answered {{route}}")]),
    ("SLO attainment", "percentunit", [
        ('sum(rate(ray_pdserve_slo_met_requests_total[5m])) / clamp_min(sum(rate(ray_pdserve_requests_total{outcome="ok"}[5m])), 1e-9)',
         "attainment")]),
    ("Requests by path and outcome", "reqps", [
        ("sum by (route, outcome) (rate(ray_pdserve_requests_total[1m]))", "{{route}} {{outcome}}")]),
    ("In flight per pool", "short", [("sum by (pool) (ray_pdserve_inflight_requests)", "{{pool}}")]),
    ("Engine load: running / waiting by role", "short", [
        ("sum by (role) (ray_vllm_num_requests_running * on (ReplicaId) group_left (role) ray_pdserve_engine_info)",
         "running {{role}}"),
        ("sum by (role) (ray_vllm_num_requests_waiting * on (ReplicaId) group_left (role) ray_pdserve_engine_info)",
         "waiting {{role}}")]),
    ("KV cache usage per replica", "percentunit", [
        ("max by (ReplicaId) (ray_vllm_kv_cache_usage_perc)", "{{ReplicaId}}")]),
    ("Time per phase (p50)", "s", [  # not _sum / _count: Ray's exporter rebuilds _sum from bucket midpoints
        (f"histogram_quantile(0.5, sum by (le) (rate(ray_pdserve_{p}_seconds_bucket[1m])))", p)
        for p in ("queue_time", "prefill_time", "kv_transfer_time", "decode_time")]),
    ("KV transfer time p50 / p99", "s", [
        ("histogram_quantile(0.5, sum by (le) (rate(ray_pdserve_kv_transfer_time_seconds_bucket[1m])))", "p50"),
        ("histogram_quantile(0.99, sum by (le) (rate(ray_pdserve_kv_transfer_time_seconds_bucket[1m])))", "p99")]),
    ("KV bytes moved / s", "Bps", [
        ("sum(rate(ray_vllm_nixl_bytes_transferred_sum[1m]))", "NIXL (engines)"),
        ("sum(rate(ray_pdserve_kv_transfer_size_bytes_sum[1m]))", "hand-offs (pdserve)")]),
    ("KV transfer failures and fallbacks", "short", [
        # a counter shows up in the scrape at its first increment: 0 until then, not "no data"
        ("sum(increase(ray_pdserve_kv_transfer_failures_total[5m])) or vector(0)", "KV hand-offs not used"),
        ("sum by (kind) (increase(ray_pdserve_fallbacks_total[5m])) or vector(0)", "{{kind}}")]),
    ("Routing decisions", "reqps", [
        ("sum by (route, reason) (rate(ray_pdserve_routing_decisions_total[5m]))", "{{route}}: {{reason}}")]),
    ("Retries by phase", "short", [("sum by (phase) (increase(ray_pdserve_retries_total[5m])) or vector(0)", "{{phase}}")]),
]


def dashboard() -> dict:
    panels = []
    for i, (title, unit, targets) in enumerate(PANELS):
        panels.append({
            "id": i + 1, "type": "timeseries", "title": title,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"refId": chr(65 + j), "expr": expr, "legendFormat": legend}
                        for j, (expr, legend) in enumerate(targets)],
        })
    return {
        "title": "pdserve", "uid": "pdserve", "tags": ["pdserve", "ray-serve", "vllm"], "editable": True,
        "description": "pdserve: latency by path, goodput, prefill/decode pool load, KV transfers, routing.",
        "schemaVersion": 39, "version": 1, "refresh": "30s", "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "label": "Data source", "type": "datasource",
                                 "query": "prometheus", "current": {}, "hide": 0}]},
        "panels": panels,
    }


if __name__ == "__main__":
    out = Path(__file__).with_name("pdserve.json")
    out.write_text(json.dumps(dashboard(), indent=1) + "\n")
    print(out)
