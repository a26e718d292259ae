"""Each pool's autoscaling signal (pure policy) and how the app hands it to Serve; no cluster."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from deployments.config import SettingsError, parse_settings
from deployments.routing.autoscaling import (
    KV_USAGE,
    PROMPT_TOKENS,
    RUNNING,
    WAITING,
    PoolAutoscalingPolicy,
    desired_replicas,
)
from tests.helm_tools import app_deployments


def per_replica(**metrics: list[float]) -> dict:
    return {name: {f"r{i}": v for i, v in enumerate(values)} for name, values in metrics.items()}


def test_prefill_scales_on_prompt_tokens_held():
    load = per_replica(**{PROMPT_TOKENS: [3000, 2500], RUNNING: [1, 1], WAITING: [5, 4]})
    assert desired_replicas("prefill", load, 2, target_per_replica=2048) == 3
    # Many waiting requests of few tokens are not much prefill work.
    assert desired_replicas("prefill", per_replica(**{PROMPT_TOKENS: [300], WAITING: [8]}), 1, 2048) == 1


def test_decode_scales_on_sequences_and_on_kv_usage():
    seqs = per_replica(**{RUNNING: [4, 4], WAITING: [2, 2], KV_USAGE: [0.2, 0.2]})
    assert desired_replicas("decode", seqs, 2, target_per_replica=4, target_kv_cache_usage=0.8) == 3
    kv = per_replica(**{RUNNING: [1, 1], WAITING: [0, 0], KV_USAGE: [0.95, 0.9]})
    assert desired_replicas("decode", kv, 2, target_per_replica=4, target_kv_cache_usage=0.8) == 3


def test_idle_pools_shrink_to_one_and_silent_pools_keep_their_size():
    idle = per_replica(**{RUNNING: [0, 0, 0], WAITING: [0, 0, 0], KV_USAGE: [0, 0, 0], PROMPT_TOKENS: [0, 0, 0]})
    assert desired_replicas("decode", idle, 3, 4) == 1
    assert desired_replicas("prefill", idle, 3, 2048) == 1
    assert desired_replicas("decode", {}, 3, 4) == 3  # just started: nothing reported yet
    # A load exactly at target needs no extra replica.
    assert desired_replicas("decode", per_replica(**{RUNNING: [4, 4]}), 2, 4) == 2


def test_policy_reads_serves_context_fake():
    policy = PoolAutoscalingPolicy(role="decode", target_per_replica=2, target_kv_cache_usage=0.8)
    ctx = SimpleNamespace(aggregated_metrics=per_replica(**{RUNNING: [3], WAITING: [2]}), current_num_replicas=1,
                          policy_state={"kept": True})  # a fake AutoscalingContext: only what the policy reads
    assert policy(ctx) == (3, {"kept": True})


def _pd(**pools) -> dict:
    return {"mode": "disaggregated", "prefill": pools.get("prefill", {}), "decode": pools.get("decode", {})}


def test_app_gives_each_pool_its_own_policy_and_a_draining_shutdown():
    settings = parse_settings(_pd(prefill={"autoscaling": {"max_replicas": 3}},
                                  decode={"num_replicas": 2, "autoscaling": {"min_replicas": 1, "max_replicas": 4,
                                                                            "target_per_replica": 6}}))
    built = app_deployments(settings)
    prefill, decode = (built[d]._deployment_config for d in ("PrefillServer", "DecodeServer"))
    assert prefill.autoscaling_config.policy.policy_kwargs == {
        "role": "prefill", "target_per_replica": 2048, "target_kv_cache_usage": 0.8}
    assert decode.autoscaling_config.policy.policy_kwargs["target_per_replica"] == 6
    assert (decode.autoscaling_config.min_replicas, decode.autoscaling_config.max_replicas) == (1, 4)
    assert decode.autoscaling_config.initial_replicas == 2
    # Leaving replicas finish their streams (and a prefill replica's KV leases) before they stop.
    assert decode.graceful_shutdown_timeout_s >= settings.request_timeout_s


def test_fixed_pools_keep_num_replicas():
    built = app_deployments(parse_settings(_pd(decode={"num_replicas": 3})))
    assert built["DecodeServer"]._deployment_config.autoscaling_config is None
    assert built["DecodeServer"]._deployment_config.num_replicas == 3


def test_min_above_max_is_refused():
    with pytest.raises(SettingsError, match="decode.autoscaling"):
        parse_settings(_pd(decode={"autoscaling": {"min_replicas": 3, "max_replicas": 2}}))
