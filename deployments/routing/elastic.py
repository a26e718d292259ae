"""Elastic roles: one pool of engines, each prefilling or decoding, with the pair chosen per request.

Pure: ``choose_pair`` sees plain data (each engine's load, the SLO, the measured prefill speed) and returns the
decode engine that will stream the answer and, where it is worth a KV transfer, another engine to prefill the
prompt on. ``Ledger`` is the ingress's own count of what it sent where, so that requests arriving between two
load reports (Serve ships them once a second) do not all pile onto the same engine.

The rule, for one request (streams: an engine's running + waiting sequences; done: when it would finish this
prompt's prefill behind the prompt tokens it already holds, at the measured prefill speed):
1. A short prompt is served whole by the engine with the fewest streams (then the most free KV cache).
2. For a long one, the prefill engine P is the one whose streams suffer least: the fewest streams, then the
   earliest done. The decode engine D is the best of the others by streams and KV cache.
3. D serves the request whole (no transfer) when it has no streams a prefill could stall, when the stall (its
   done) stays within the ITL target, or when P would not finish the prefill sooner.
4. Otherwise P prefills and D pulls the KV, unless D would then run more than ``max_stream_imbalance`` streams
   above P: then P serves the request whole, so that decode load does not pile onto one engine.

Under prefill-heavy load the pool drifts into a quiet engine that takes long prompts and engines that decode
(disaggregation protects the decoders' ITL); under decode-heavy load the imbalance bound spreads the streams
over every engine (colocated capacity). No fixed ratio: the split follows the load, request by request.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from ..outcomes import Route, RouteReason
from .policies import ReplicaLoad


@dataclass(frozen=True)
class PairDecision:
    route: Route
    reason: RouteReason
    decode: str | None  # None: no live engine known, the router picks
    prefill: str | None = None  # another engine to prefill on; None: the decode engine prefills itself


@dataclass(frozen=True)
class ElasticLimits:
    """What the choice weighs a prompt against (routing and SLO settings)."""

    itl_target_s: float  # the longest stall of running streams that keeps them within the ITL target
    min_remote_prefill_tokens: int  # shorter prompts always prefill locally
    max_stream_imbalance: int = 4  # most streams a decode engine may run above its prefill engine
    max_kv_cache_usage: float = 0.9  # a prefill engine must have room to hold the KV until it is pulled


def _streams(load: ReplicaLoad) -> int:
    """Streams a prefill on this engine would stall: the running ones, and the waiting ones it delays."""
    return load.num_running + load.num_waiting


def choose_pair(num_prompt_tokens: int, loads: Mapping[str, ReplicaLoad], tokens_per_s: float,
                limits: ElasticLimits, exclude: Iterable[str] = ()) -> PairDecision:
    """The (prefill, decode) pair for one request; see the module's docstring for the rule."""
    excluded = frozenset(exclude)
    eligible = sorted(r for r in loads if r not in excluded)
    if not eligible:
        return PairDecision(Route.LOCAL_PREFILL, RouteReason.PREFILL_UNAVAILABLE, None)

    def done_s(r: str) -> float:
        return (loads[r].num_outstanding_prompt_tokens + num_prompt_tokens) / tokens_per_s

    def decode_rank(r: str) -> tuple:
        return _streams(loads[r]), loads[r].kv_cache_usage, loads[r].num_outstanding_prompt_tokens, r

    def whole(engine: str, reason: RouteReason) -> PairDecision:
        return PairDecision(Route.LOCAL_PREFILL, reason, engine)

    if num_prompt_tokens < limits.min_remote_prefill_tokens:
        return whole(min(eligible, key=decode_rank), RouteReason.SHORT_PROMPT)
    with_room = [r for r in eligible if loads[r].kv_cache_usage < limits.max_kv_cache_usage]
    if not with_room:  # no engine can hold a hand-off: the best decode engine does it all
        return whole(min(eligible, key=decode_rank), RouteReason.PREFILL_UNAVAILABLE)
    prefill = min(with_room, key=lambda r: (_streams(loads[r]), done_s(r), r))
    others = [r for r in eligible if r != prefill]
    if not others:
        return whole(prefill, RouteReason.PREFILL_UNAVAILABLE)
    decode = min(others, key=decode_rank)
    if _streams(loads[decode]) == 0:
        return whole(decode, RouteReason.NO_STREAMS_TO_STALL)
    if done_s(decode) <= limits.itl_target_s:
        return whole(decode, RouteReason.STALL_WITHIN_SLO)
    if done_s(prefill) > done_s(decode):
        return whole(decode, RouteReason.PREFILL_OVERLOADED)
    if _streams(loads[decode]) + 1 - _streams(loads[prefill]) > limits.max_stream_imbalance:
        return whole(prefill, RouteReason.BALANCE_STREAMS)
    return PairDecision(Route.DISAGGREGATED, RouteReason.ITL_PROTECTED, decode, prefill)


class Ledger:
    """What this ingress has in flight on each engine: open streams and prompt tokens not yet prefilled.

    The one ingress replica sends every request, so its ledger is exact and current, where the engines' own load
    reports lag by up to a second or two (a request that just finished still shows): streams and prompt tokens
    come from the ledger, KV cache usage from the reports."""

    def __init__(self) -> None:
        self.streams: dict[str, int] = {}
        self.prompt_tokens: dict[str, int] = {}

    def add(self, replica: str | None, streams: int = 0, prompt_tokens: int = 0) -> None:
        if replica is None:
            return
        for book, delta in ((self.streams, streams), (self.prompt_tokens, prompt_tokens)):
            if delta:
                book[replica] = book.get(replica, 0) + delta
                if book[replica] <= 0:
                    del book[replica]

    def loads(self, reported: Mapping[str, ReplicaLoad]) -> dict[str, ReplicaLoad]:
        """The live engines (those reported), with this ledger's streams and prompt tokens."""
        return {rid: replace(load, num_running=self.streams.get(rid, 0), num_waiting=0,
                             num_outstanding_prompt_tokens=self.prompt_tokens.get(rid, 0))
                for rid, load in reported.items()}
