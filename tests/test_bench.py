"""The goodput sweep's bookkeeping on synthetic runs, and every setup's config (no cluster)."""

import pytest

import loadtests.bench.sweep as bench
from loadtests.bench.sweep import (
    BASE,
    COLOCATED_SETUPS,
    DEFAULT_SETUPS,
    PEERS,
    SETUPS,
    _config,
    best_colocated,
    decisions,
    goodput,
    table,
)
from loadtests.locust.workloads import Workload


def _run(rate, attainment, ttft_p50=0.1, itl_p99=0.2):
    lat = {k: {"p50": 0.1, "p99": 0.2} for k in ("ttft", "itl", "tpot", "e2e")}
    lat["ttft"]["p50"], lat["itl"]["p99"] = ttft_p50, itl_p99
    return {"rate_rps": rate, "slo_attainment": attainment, "goodput_rps": rate * attainment,
            "requests_per_s": rate, "output_tokens_per_s": 10 * rate, "num_requests": 10, "num_failed": 0,
            "latency_s": lat, "routes": {}}


def test_goodput_is_the_highest_rate_meeting_the_target_below_the_first_miss():
    runs = [_run(0.1, 1.0), _run(0.2, 0.95), _run(0.3, 0.92), _run(0.4, 0.5), _run(0.8, 0.91)]
    assert goodput(runs) == 0.3  # 0.8 met it by luck above a miss: not counted
    assert goodput([_run(0.1, 0.5)]) == 0.0


def test_every_run_of_a_sweep_sends_its_own_prompts_and_a_rate_the_same_ones_in_every_setup(monkeypatch, tmp_path):
    """Prompts replayed by a later run would hit the engines' prefix caches and measure cached prefills."""
    attainment = {1.2: 0.5}  # the first miss; every other rate meets the target
    sent = []  # (setup, rate, seed) of each run the fake locust gets

    def fake_run_locust(base_url, profile, rate, duration_s, report_dir, *, seed, **options):
        sent.append((report_dir.parent.name, None if report_dir.name == "warmup" else rate, seed))
        return {"slo_attainment": attainment.get(rate, 1.0), "goodput_rps": rate, "requests_per_s": rate,
                "output_tokens_per_s": 1.0, "num_requests": 10, "num_failed": 0, "routes": {},
                "latency_s": {k: {"p50": 0.1, "p99": 0.2} for k in ("ttft", "itl")}}

    monkeypatch.setattr(bench, "run_locust", fake_run_locust)
    for setup in ("a", "b"):
        runs = bench.sweep("http://x", tmp_path / setup, "rag", 1, 0.3, 1, extra_rates=(0.45,), warmup_s=5, seed=7)
        assert [r["rate_rps"] for r in runs] == pytest.approx([0.3, 0.45, 0.6, 0.9, 1.2])
    seeds_a = [seed for setup, _, seed in sent if setup == "a"]
    assert len(seeds_a) == 6 and len(set(seeds_a)) == 6  # warmup and five rates: six prompt sets
    assert [(r, s) for setup, r, s in sent if setup == "a"] == [(r, s) for setup, r, s in sent if setup == "b"]
    first = {Workload("rag", seed=seed).prompt(0).text for seed in seeds_a}
    assert len(first) == 6


def test_table_compares_at_the_best_colocated_goodput_rate_with_ratios_to_elastic():
    results = {"pdserve-colocated": [_run(0.1, 1.0), _run(0.2, 0.95, itl_p99=0.5), _run(0.4, 0.3)],
               "pdserve-colocated-2x1": [_run(0.1, 1.0), _run(0.2, 0.3)],
               "pdserve-elastic": [_run(0.1, 1.0), _run(0.2, 0.95, itl_p99=0.1), _run(0.4, 0.92), _run(0.8, 0.2)],
               "rayllm-pd": [_run(0.1, 0.05), _run(0.2, 0.0, ttft_p50=2.0)]}
    assert best_colocated(results) == "pdserve-colocated"
    md = table(results)
    assert md.startswith("Latency and throughput columns at 0.200 req/s")
    assert "| pdserve-elastic | 0.400 | 95% | 0.100 | 0.200 | 0.100 | 2.0 |" in md
    assert "| pdserve-elastic / pdserve-colocated | 2.00 | 0.20 | 1.00 | 1.00 | 1.00 |" in md
    assert "| pdserve-elastic / pdserve-colocated-2x1 | 4.00 | 0.50 | 1.00 | 1.00 | 1.00 |" in md
    assert "| pdserve-elastic / rayllm-pd | ∞ (denominator 0) | 0.50 | 0.05 | 1.00 | 1.00 |" in md


def test_table_says_when_a_setup_did_not_run_the_reference_rate():
    md = table({"pdserve-colocated": [_run(0.2, 1.0), _run(0.4, 0.5)], "pdserve-elastic": [_run(0.3, 1.0)]})
    assert md.startswith("Latency and throughput columns at 0.200 req/s")
    assert "| pdserve-elastic | 0.300 | not run at 0.200 req/s |" in md


def test_attainment_at_every_rate_with_the_hand_offs_transfer_p90():
    pd = [_run(0.3, 0.88), _run(0.6, 0.5)]
    pd[0]["latency_s"]["transfer"] = {"count": 12, "p90": 0.2}
    elastic = [_run(0.3, 0.92)]
    elastic[0]["latency_s"]["transfer"] = {"count": 0, "p90": None}
    rows = bench.per_rate({"pdserve-pd": pd, "pdserve-elastic": elastic}).splitlines()
    assert rows[0] == "| rate (req/s) | pdserve-pd | pdserve-elastic |"
    assert rows[2] == "| 0.300 | 88%, transfer p90 0.20 s | 92% |"
    assert rows[3] == "| 0.600 | 50% |  |"  # elastic did not run 0.6 req/s


def test_decisions_show_local_and_disaggregated_counts_and_reasons_at_three_rates():
    runs = [_run(r, 1.0) | {"routes": {"local_prefill": 3, "disaggregated": 1},
                            "route_reasons": {"local_prefill/short_prompt": 3, "disaggregated/itl_protected": 1}}
            for r in (0.1, 0.2, 0.4, 0.8)]
    md = decisions(runs)
    assert [line.split(" | ")[0] for line in md.splitlines()[2:]] == ["| 0.100", "| 0.400", "| 0.800"]
    assert "| 0.100 | 3 | 1 | local_prefill/short_prompt: 3, disaggregated/itl_protected: 1 |" in md


def test_pdserve_setup_configs_load_into_settings_with_equal_cores(tmp_path):
    from deployments.config import load_serve_config

    for setup, (kind, _, _) in SETUPS.items():
        if kind != "pdserve":
            continue
        [(_, settings)] = load_serve_config(_config(setup, tmp_path))
        pools = [p for p in (settings.prefill, settings.decode, settings.colocated, settings.elastic) if p]
        assert sum(p.num_cpus * p.num_replicas for p in pools) == 2  # equal cores for every setup
        assert all(p.engine_for(settings.engine).enforce_eager for p in pools)  # what users get by default
    # the colocated setups run first: the best one's goodput rate is one every later setup also runs
    assert tuple(SETUPS)[:len(COLOCATED_SETUPS)] == COLOCATED_SETUPS
    # what `make bench` runs: the same order; elastic beside colocated, static PD and the peer
    assert DEFAULT_SETUPS[:len(COLOCATED_SETUPS)] == COLOCATED_SETUPS
    assert {BASE, "pdserve-pd"} <= set(DEFAULT_SETUPS) and set(PEERS) & set(DEFAULT_SETUPS)


def test_engine_dtype_applies_to_every_engine_of_every_pdserve_setup_and_refuses_the_peer(tmp_path):
    from deployments.config import load_serve_config
    from loadtests.bench.sweep import main

    for setup, (kind, _, _) in SETUPS.items():
        if kind != "pdserve":
            continue
        [(_, default)] = load_serve_config(_config(setup, tmp_path))
        [(_, fp32)] = load_serve_config(_config(setup, tmp_path, "float32"))
        pools = [p for p in (fp32.prefill, fp32.decode, fp32.colocated, fp32.elastic) if p]
        assert default.engine.dtype == "bfloat16" and {p.engine_for(fp32.engine).dtype for p in pools} == {"float32"}
    with pytest.raises(SystemExit):  # argparse's error: the peer's dtype is its own
        main(["--setups", "pdserve-colocated,rayllm-pd", "--engine-dtype", "float32", "--out", str(tmp_path)])


def test_chunked_prefill_size_applies_to_every_engine_of_every_pdserve_setup(tmp_path):
    from deployments.config import load_serve_config
    from loadtests.bench.sweep import main

    for setup, (kind, _, _) in SETUPS.items():
        if kind == "pdserve":
            [(_, s)] = load_serve_config(_config(setup, tmp_path, batched_tokens=256))
            pools = [p for p in (s.prefill, s.decode, s.colocated, s.elastic) if p]
            assert {p.engine_for(s.engine).max_num_batched_tokens for p in pools} == {256}
    with pytest.raises(SystemExit):
        main(["--setups", "rayllm-pd", "--max-num-batched-tokens", "256", "--out", str(tmp_path)])


@pytest.mark.integration  # imports Ray Serve LLM
@pytest.mark.parametrize("peer", PEERS)
def test_peer_config_is_accepted_by_ray_serve_llm_and_uses_the_same_cores(peer):
    from ray.llm._internal.serve.serving_patterns.prefill_decode.builder import PDServingArgs

    from loadtests.bench.peer import pd_serving_args

    variant = SETUPS[peer][1]
    args = PDServingArgs.model_validate(pd_serving_args("/models/smol", variant))
    binds = [c.runtime_env["env_vars"]["VLLM_CPU_OMP_THREADS_BIND"] for c in (args.prefill_config, args.decode_config)]
    assert binds == ["0", "1"]
    for c in (args.prefill_config, args.decode_config):
        assert c.engine_kwargs["kv_transfer_config"]["kv_connector"] == "NixlConnector"
        # "shipped" switches pdserve's NIXL plugin off (an allowlist naming no plugin); "nixl-fix" leaves it on
        assert ("VLLM_PLUGINS" in c.runtime_env["env_vars"]) == (variant == "shipped")
    with pytest.raises(ValueError, match="unknown variant"):
        pd_serving_args("/m", "tuned")


def test_machine_line_says_whether_the_cpu_has_bf16_instructions():
    ice_lake = "model name\t: Intel(R) Xeon(R) Processor @ 2.80GHz\nflags\t\t: fpu avx2 avx512f avx512_vnni\n"
    sapphire = "model name\t: Intel(R) Xeon(R) Platinum 8481C\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16\n"
    assert bench.machine(ice_lake, 2) == ("2 cores, Intel(R) Xeon(R) Processor @ 2.80GHz, "
                                          "bf16 instructions: none (bf16 matmuls emulated)")
    assert bench.machine(sapphire, 4).endswith("bf16 instructions: amx_bf16, avx512_bf16")
    assert bench.machine("", 1) == "1 core, unknown CPU, bf16 instructions: none (bf16 matmuls emulated)"


def test_overhead_direct_ingress_row_targets_the_ingress_replica_not_the_proxy():
    """With direct ingress the proxy still holds port 8000: the row must send to the replica's own port, or it
    measures the proxy hop it means to remove."""
    from deployments.config import load_serve_config
    from deployments.settings import DIRECT_INGRESS_SPAN, HttpSettings
    from loadtests.bench.overhead import BARE_PORT, DIRECT_INGRESS_HTTP, DIRECT_INGRESS_PORT, ROOT, setup_url

    [(_, settings)] = load_serve_config(ROOT / "cluster/local-colocated.yaml")  # the config the benchmark deploys
    proxy = settings.http.port
    assert proxy == 8000 and settings.http.direct_ingress_port is None
    direct = HttpSettings(**settings.http.model_dump() | DIRECT_INGRESS_HTTP)
    assert setup_url(settings.http) == "http://127.0.0.1:8000"
    assert setup_url(direct) == f"http://127.0.0.1:{DIRECT_INGRESS_PORT}"
    assert not 0 <= BARE_PORT - DIRECT_INGRESS_PORT < DIRECT_INGRESS_SPAN  # its port range leaves the baseline's
