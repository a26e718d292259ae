"""A short headless locust run against the real cluster: the report is written and counts what the engines served.

In disaggregated mode every request ends on a decode engine (also when it was prefilled locally), so the client's
count of successful requests equals the sum over decode replicas of their ``vllm:request_success_total`` delta.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from loadtests.locust.report import RequestSample, meets_slo
from loadtests.locust.runner import run_locust

pytestmark = pytest.mark.cluster
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NUM_OUTPUT_TOKENS = 16
RUN_S = 20


def _decode_counters(cluster) -> dict[str, dict[str, float]]:
    names = ("vllm:request_success_total", "vllm:num_requests_running", "vllm:num_requests_waiting")
    return {r.id: {n: cluster.stats("DecodeServer", replica=r.id).get(n) for n in names}
            for r in cluster.replicas("DecodeServer")}


def _wait_until_idle(cluster, timeout_s: float = 10) -> dict[str, dict[str, float]]:
    """Decode counters once no decode engine has a request running or waiting (earlier tests' work drained)."""
    deadline = time.monotonic() + timeout_s
    while True:
        counters = _decode_counters(cluster)
        busy = sum(c["vllm:num_requests_running"] + c["vllm:num_requests_waiting"] for c in counters.values())
        if busy == 0 or time.monotonic() > deadline:
            return counters
        time.sleep(0.5)


def test_loadtest_counts_what_the_decode_engines_served(cluster, tmp_path):
    t0 = time.monotonic()
    before = _wait_until_idle(cluster)
    assert before, "no live DecodeServer replica"
    summary = run_locust(cluster.pd, "chat", 0.5, RUN_S, tmp_path / "report", model=cluster.model,
                         max_tokens=NUM_OUTPUT_TOKENS, ignore_eos=True, seed=11, drain_timeout_s=15,
                         progress_interval_s=5, timeout_s=55)
    log = Path(summary["log"]).read_text()
    assert summary["exit_code"] == 0, log[-3000:]
    n = summary["num_requests"]
    assert n >= 3 and summary["num_ok"] == n and summary["num_failed"] == 0, summary["errors"]
    run = summary["run"]
    assert (run["model"], run["profile"], run["mode"], run["request_rate"]) == (cluster.model, "chat", "open_loop", 0.5)

    # The server counted the same requests (its counters can trail the last [DONE] by an engine step).
    deadline = time.monotonic() + 15
    while True:
        after = _decode_counters(cluster)
        assert set(after) == set(before), f"decode replicas changed during the run: {set(before)} -> {set(after)}"
        served = sum(after[r]["vllm:request_success_total"] - before[r]["vllm:request_success_total"] for r in after)
        if served >= n or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert served == n, f"client counted {n} successful requests, decode engines finished {served}"

    # Token counts come from the usage chunk; every request has a TTFT, gaps and an end-to-end time.
    assert summary["num_output_tokens"] == NUM_OUTPUT_TOKENS * n
    assert summary["num_prompt_tokens"] > 0
    lat = summary["latency_s"]
    assert lat["ttft"]["count"] == lat["e2e"]["count"] == lat["tpot"]["count"] == n
    assert 0 < lat["itl"]["count"] <= (NUM_OUTPUT_TOKENS - 1) * n
    assert 0 < lat["ttft"]["p50"] <= lat["e2e"]["p50"] and lat["tpot"]["p50"] > 0
    assert sum(summary["routes"].values()) == n
    assert set(summary["routes"]) <= {"disaggregated", "local_prefill"}, summary["routes"]
    assert summary["requests_per_s"] > 0 and summary["output_tokens_per_s"] > 0

    # The report files, consistent with each other.
    report_dir = tmp_path / "report"
    samples = [RequestSample(**json.loads(line)) for line in (report_dir / "requests.jsonl").read_text().splitlines()]
    assert len(samples) == n and all(s.ok and s.request_id for s in samples)
    slo = summary["slo"]
    assert summary["num_good"] == sum(meets_slo(s, slo["ttft_s"], slo["tpot_s"]) for s in samples)
    assert summary["slo_attainment"] == pytest.approx(summary["num_good"] / n)
    assert "# pdserve load test" in (report_dir / "report.md").read_text()
    for name in ("latency_cdf.png", "itl_over_time.png"):
        data = (report_dir / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000, name
    rows = (report_dir / "locust_stats.csv").read_text().splitlines()
    assert sum(int(r.split(",")[2]) for r in rows if r.startswith("E2E,")) == n
    assert (report_dir / "locust.html").stat().st_size > 0
    assert re.search(r"progress \d+ s: sent \d+, done \d+, errors 0, in flight \d+, SLO attainment", log), log[-2000:]
    assert time.monotonic() - t0 < 60
