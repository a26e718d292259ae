"""Routing policies: pure functions of (request, candidates, stats) → ranked choice.

Nothing here talks to Ray or vLLM: the Serve request router (``router.py``) feeds these functions plain data,
and the unit tests do the same. A policy returns the candidates ranked best first; the router tries them in
that order (a replica whose queue is full is skipped by Serve).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..outcomes import Route, RouteReason

# Characters of the prompt that make up its affinity key: requests sharing this prefix share KV blocks.
PREFIX_KEY_CHARS = 512


@dataclass(frozen=True)
class ReplicaLoad:
    """Live load of one engine replica, as the replica reports it (refreshed every second)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # 0..1
    num_outstanding_prompt_tokens: int = 0  # prompt tokens accepted but not yet prefilled
    itl_s: float = 0.0  # mean gap between the output tokens it streamed in the last report period (0: none)
    kv_pull_tokens_per_s: float = 0.0  # how fast it pulls prompt KV from other engines, as NIXL measured it (0: never)

    @classmethod
    def from_stats(cls, stats: dict | None) -> ReplicaLoad:
        stats = stats or {}
        return cls(**{k: stats[k] for k in cls.__dataclass_fields__ if k in stats})

    def score(self) -> float:
        """Lower is less loaded: queued work first, then running sequences, then KV pressure."""
        return (self.num_waiting * 4 + self.num_running + self.num_outstanding_prompt_tokens / 512
                + self.kv_cache_usage * 2)


@dataclass(frozen=True)
class RouteRequest:
    """What a policy may know about a request."""

    seq: int = 0  # the ingress's request counter (round robin)
    prefix_key: str = ""  # hash of the prompt's first PREFIX_KEY_CHARS characters
    num_prompt_tokens: int = 0  # an estimate, before tokenization
    exclude: frozenset[str] = field(default_factory=frozenset)  # replicas that failed this request or are broken
    target: str | None = None  # the replica the ingress chose; the router honours it while that replica lives


def prefix_key(text: str) -> str:
    return hashlib.blake2b(text[:PREFIX_KEY_CHARS].encode(), digest_size=8).hexdigest()


def _eligible(candidates: Sequence[str], request: RouteRequest) -> list[str]:
    return [c for c in candidates if c not in request.exclude]


def round_robin(request: RouteRequest, candidates: Sequence[str], stats: dict[str, ReplicaLoad]) -> list[str]:
    eligible = sorted(_eligible(candidates, request))
    if not eligible:
        return []
    start = request.seq % len(eligible)
    return eligible[start:] + eligible[:start]


def least_loaded(request: RouteRequest, candidates: Sequence[str], stats: dict[str, ReplicaLoad]) -> list[str]:
    eligible = _eligible(candidates, request)
    return sorted(eligible, key=lambda c: (stats.get(c, ReplicaLoad()).score(), c))


def prefix_affinity(
    request: RouteRequest, candidates: Sequence[str], stats: dict[str, ReplicaLoad], max_imbalance: float = 8.0
) -> list[str]:
    """Rendezvous hashing of the prompt prefix: a repeated prefix goes to the same replica (whose prefix cache
    holds it) unless that replica is more than ``max_imbalance`` load units busier than the least loaded one."""
    by_load = least_loaded(request, candidates, stats)
    if not by_load or not request.prefix_key:
        return by_load
    def weight(c: str) -> bytes:
        return hashlib.blake2b(f"{request.prefix_key}:{c}".encode(), digest_size=8).digest()

    preferred = max(by_load, key=weight)
    load = lambda c: stats.get(c, ReplicaLoad()).score()  # noqa: E731
    if load(preferred) - load(by_load[0]) > max_imbalance:
        return by_load
    return [preferred] + [c for c in by_load if c != preferred]


POLICIES: dict[str, Callable[[RouteRequest, Sequence[str], dict[str, ReplicaLoad]], list[str]]] = {
    "round_robin": round_robin,
    "least_loaded": least_loaded,
    "prefix_affinity": prefix_affinity,
}


@dataclass(frozen=True)
class Decision:
    """Whether to prefill on a prefill replica (and hand the KV to decode) or on the decode replica itself."""

    route: Route
    reason: RouteReason


def decide_prefill(
    num_prompt_tokens: int,
    prefill_loads: Sequence[ReplicaLoad],
    min_remote_prefill_tokens: int,
    max_prefill_waiting: int,
) -> Decision:
    """Conditional disaggregation: a remote prefill pays a KV transfer; it is worth it for long prompts only,
    and only while the prefill pool is alive and not overloaded."""
    if not prefill_loads:
        return Decision(Route.LOCAL_PREFILL, RouteReason.PREFILL_UNAVAILABLE)
    if num_prompt_tokens < min_remote_prefill_tokens:
        return Decision(Route.LOCAL_PREFILL, RouteReason.SHORT_PROMPT)
    if min(load.num_waiting for load in prefill_loads) > max_prefill_waiting:
        return Decision(Route.LOCAL_PREFILL, RouteReason.PREFILL_OVERLOADED)
    return Decision(Route.DISAGGREGATED, RouteReason.LONG_PROMPT)
