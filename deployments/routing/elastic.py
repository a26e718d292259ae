"""Elastic roles: one pool of engines, each prefilling or decoding, with the pair chosen per request.

Pure: ``choose_pair`` sees plain data (each engine's load, the SLO, the measured prefill speed) and returns the
decode engine that will stream the answer and, where it is worth a KV transfer, another engine to prefill the
prompt on. The loads it sees come from the ingress's own ledger of what it sent where (``ledger.py``), so that
requests arriving between two load reports (Serve ships them once a second) do not all pile onto the same engine.

The rule, for one request. An engine's *decoding* streams are those past their first token: a prefill there stalls
them (their inter-token latency). Its *streams* add those still waiting for their first token (a prefill there
only delays them, like any queue). *done*: when the engine would finish this prompt's prefill behind the prompt
tokens it already holds, at the measured prefill speed.
1. Decode load is packed: a stream goes to the engine that already runs the most streams while it has room: fewer
   than ``max_streams_per_engine``, and its streams' measured inter-token latency below ``pack_itl_fraction`` of
   the ITL target (what a stream there sees depends on the engine's speed, which the count alone does not know:
   a one-core CPU engine passes the target at a few streams, a GPU at hundreds). Past that, to the least loaded
   (``ReplicaLoad.score``). Packing keeps the other engines free of decoding streams, so that long prompts can be
   prefilled where they stall no one: the pool drifts into static PD's shape while the load calls for it, and
   spreads out when one engine is full.
2. A short prompt is served whole by that decode engine D.
3. For a long one, the prefill engine P is the one whose decoding streams suffer least: the fewest, then the
   earliest done (and with KV room to hold the hand-off). D is chosen as in 1 among the others.
4. The request is served whole (no transfer) when no prefill anywhere stalls a stream (no engine decodes: the
   sooner of P and D), when D is full (P takes the stream), when the stall on D (its done) stays within the ITL
   target, when P has as many decoding streams as D, or when P would finish neither sooner than D nor within the
   TTFT target (D). Otherwise P prefills and D pulls the KV.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

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

    itl_target_s: float  # the longest stall of decoding streams that keeps them within the ITL target
    min_remote_prefill_tokens: int  # shorter prompts always prefill locally
    ttft_target_s: float = float("inf")  # a remote prefill done within it is in time, even if not sooner
    max_streams_per_engine: int = 8  # streams packed onto one engine before the next one takes streams
    pack_itl_fraction: float = 0.6  # nor once its streams' measured ITL reaches this fraction of the ITL target
    max_kv_cache_usage: float = 0.9  # a prefill engine must have room to hold the KV until it is pulled


def _streams(load: ReplicaLoad) -> int:
    """Every stream the engine holds: decoding (running) and waiting for its first token."""
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

    def kv_room(r: str) -> bool:  # KV cache left to hold a hand-off or another stream
        return loads[r].kv_cache_usage < limits.max_kv_cache_usage

    def full(r: str) -> bool:  # no room for another stream: as many as packing allows, slow streams, no KV cache left
        slow = loads[r].itl_s >= limits.pack_itl_fraction * limits.itl_target_s
        return _streams(loads[r]) >= limits.max_streams_per_engine or slow or not kv_room(r)

    def pack_rank(r: str) -> tuple:  # the busiest engine with room for a stream; else the least loaded
        return (True, loads[r].score(), r) if full(r) else (False, -_streams(loads[r]), loads[r].score(), r)

    def whole(engine: str, reason: RouteReason) -> PairDecision:
        return PairDecision(Route.LOCAL_PREFILL, reason, engine)

    if num_prompt_tokens < limits.min_remote_prefill_tokens:
        return whole(min(eligible, key=pack_rank), RouteReason.SHORT_PROMPT)
    with_room = [r for r in eligible if kv_room(r)]
    if not with_room:  # no engine can hold a hand-off: the best decode engine does it all
        return whole(min(eligible, key=pack_rank), RouteReason.PREFILL_UNAVAILABLE)
    prefill = min(with_room, key=lambda r: (loads[r].num_running, done_s(r), r))
    others = [r for r in eligible if r != prefill]
    if not others:
        return whole(prefill, RouteReason.PREFILL_UNAVAILABLE)
    decode = min(others, key=pack_rank)
    if loads[decode].num_running == 0:  # D stalls no one: it serves the request whole, or P if P is sooner
        sooner = prefill if loads[prefill].num_running == 0 and done_s(prefill) < done_s(decode) else decode
        return whole(sooner, RouteReason.NO_STREAMS_TO_STALL)
    if full(decode):
        return whole(prefill, RouteReason.BALANCE_STREAMS)
    if done_s(decode) <= limits.itl_target_s:
        return whole(decode, RouteReason.STALL_WITHIN_SLO)
    if loads[prefill].num_running >= loads[decode].num_running:
        return whole(decode, RouteReason.NO_QUIETER_ENGINE)
    if done_s(prefill) > max(done_s(decode), limits.ttft_target_s):
        return whole(decode, RouteReason.PREFILL_OVERLOADED)
    return PairDecision(Route.DISAGGREGATED, RouteReason.ITL_PROTECTED, decode, prefill)
