"""The goodput sweep's bookkeeping on synthetic runs (no cluster)."""

from loadtests.bench import SETUPS, _config, goodput, table


def _run(rate, attainment):
    lat = {k: {"p50": 0.1, "p99": 0.2} for k in ("ttft", "itl", "tpot", "e2e")}
    return {"rate_rps": rate, "slo_attainment": attainment, "goodput_rps": rate * attainment,
            "requests_per_s": rate, "output_tokens_per_s": 10 * rate, "num_requests": 10, "num_failed": 0,
            "latency_s": lat, "routes": {}}


def test_goodput_is_the_highest_rate_meeting_the_target_below_the_first_miss():
    runs = [_run(0.1, 1.0), _run(0.2, 0.95), _run(0.3, 0.92), _run(0.4, 0.5), _run(0.8, 0.91)]
    assert goodput(runs) == 0.3  # 0.8 met it by luck above a miss: not counted
    assert goodput([_run(0.1, 0.5)]) == 0.0


def test_table_has_ratios_against_disaggregated():
    md = table({"pdserve-pd": [_run(0.1, 1.0), _run(0.2, 0.95), _run(0.4, 0.3)],
                "pdserve-colocated": [_run(0.1, 1.0), _run(0.2, 0.5)]})
    assert "| pdserve-pd | 0.200 |" in md and md.rstrip().endswith("| 0.50 |")


def test_setup_configs_load_into_settings(tmp_path):
    from deployments.settings import load_serve_config

    for setup in SETUPS:
        [(_, settings)] = load_serve_config(_config(setup, tmp_path))
        pools = [p for p in (settings.prefill, settings.decode, settings.colocated) if p]
        assert sum(p.num_cpus * p.num_replicas for p in pools) == 2  # equal cores for every setup
