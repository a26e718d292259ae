"""Each pool scales on its own signal: a Ray Serve custom autoscaling policy, run by the Serve controller.

- prefill replicas are busy with prompt tokens: the signal is the prompt tokens they hold (queued and running
  prefills), ``target_per_replica`` tokens per replica;
- decode replicas are busy with sequences and KV memory: the signal is their running + waiting sequences,
  ``target_per_replica`` per replica, and their KV cache usage, ``target_kv_cache_usage`` on average.

Replicas report these (``EngineServer.record_autoscaling_stats``); Serve averages each replica's reports over
``look_back_period_s`` and applies the up/down delays and min/max bounds around ``desired_replicas``. This module
is shipped to the controller by value: it imports nothing of pdserve.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

# The keys replicas report (record_autoscaling_stats) and the policy reads.
PROMPT_TOKENS, RUNNING, WAITING, KV_USAGE = (
    "num_outstanding_prompt_tokens", "num_running", "num_waiting", "kv_cache_usage")


def desired_replicas(role: str, per_replica: Mapping[str, Mapping[object, float]], current: int,
                     target_per_replica: float, target_kv_cache_usage: float = 1.0) -> int:
    """How many replicas the pool needs for the load its replicas report (``{metric: {replica: value}}``).

    Replicas that have not reported yet (just started) count as idle. Never below 1: a pool always serves.
    """
    def total(key: str) -> float:
        return sum(per_replica.get(key, {}).values())

    if not any(per_replica.get(k) for k in (PROMPT_TOKENS, RUNNING, WAITING, KV_USAGE)):
        return max(current, 1)  # nothing reported yet: keep what runs
    if role == "prefill":
        need = total(PROMPT_TOKENS) / target_per_replica
    else:
        need = max((total(RUNNING) + total(WAITING)) / target_per_replica, total(KV_USAGE) / target_kv_cache_usage)
    return max(1, math.ceil(need - 1e-9))


class PoolAutoscalingPolicy:
    """The policy Serve calls every control-loop tick (``policy_kwargs`` are this class's arguments)."""

    def __init__(self, role: str, target_per_replica: float, target_kv_cache_usage: float = 1.0):
        self.role, self.target, self.kv_target = role, target_per_replica, target_kv_cache_usage

    def __call__(self, ctx) -> tuple[int, dict]:
        desired = desired_replicas(self.role, ctx.aggregated_metrics or {}, ctx.current_num_replicas, self.target,
                                   self.kv_target)
        return desired, ctx.policy_state
