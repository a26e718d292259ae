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
3. For a long one, every option is predicted (``_Predict``): its TTFT (the prefill work each engine already holds,
   this prefill at the measured speed, and for a hand-off the measured pull time, which starts only once the decode
   engine is done with its own prefill work) and the decoding streams its prefill stalls past their budget (the
   ITL target, or a share of a stream's measured slack). The options: the packed engine D serving it whole; one of
   the quietest engines prefilling (fewest decoding streams, soonest done, KV room to hold the hand-off) for D or
   the next decode engines; the quietest engine taking it whole. A hand-off never goes to an engine busy with its
   own prefill work past the pull's share of the TTFT target (what this prompt's prefill and pull leave of it; or
   ``max_pull_wait_s`` where set): the pull would wait behind it. (Refusing every wait spreads streams over
   both engines under load, where each one's local prefills then stall the other's streams: measured, run K.)
4. The option with the fewest predicted misses (a TTFT past the target; each stream stalled past its budget) wins;
   at equal misses, in the order above (no transfer over a transfer, packed streams over spread ones), then the
   sooner first token. When no engine decodes anything, the one done soonest serves it whole.
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
    # No hand-off to an engine busy prefilling longer than this (None: the TTFT target less this prompt's prefill
    # and pull): the pull would wait behind it.
    max_pull_wait_s: float | None = None
    # A stream's stall budget: the stall it absorbs and still meets the ITL (TPOT) target, from its engine's measured
    # ITL, the mean output length and this share of the slack (streams live through several stalls); at least the
    # ITL target itself. With no output length measured yet, the ITL target alone.
    mean_output_tokens: float = 0.0
    stall_budget_share: float = 0.0


@dataclass(frozen=True)
class Option:
    """One way to serve the request, with what it is predicted to cost."""

    decode: str
    prefill: str | None  # None: the decode engine prefills itself
    ttft_s: float  # predicted time to first token: queued prefill work, this prefill, the pull
    stalled: int  # decoding streams whose stall passes their budget
    ttft_miss: bool

    @property
    def misses(self) -> int:
        return self.stalled + self.ttft_miss


@dataclass
class Observed:
    """What the ingress measures on its own requests for the predictions: the mean output length (a moving
    average of what its requests streamed)."""

    mean_output_tokens: float = 0.0

    def record_output(self, num_tokens: int, weight: float = 0.2) -> None:
        if num_tokens > 0:
            mean = self.mean_output_tokens
            self.mean_output_tokens = num_tokens if mean == 0.0 else (1 - weight) * mean + weight * num_tokens


def _streams(load: ReplicaLoad) -> int:
    """Every stream the engine holds: decoding (running) and waiting for its first token."""
    return load.num_running + load.num_waiting


class _Predict:
    """What each option costs, from the engines' loads and the measured prefill and transfer speeds."""

    def __init__(self, num_prompt_tokens: int, loads: Mapping[str, ReplicaLoad], tokens_per_s: float,
                 transfer_s: float, limits: ElasticLimits):
        self.n, self.loads, self.speed, self.transfer_s, self.limits = num_prompt_tokens, loads, tokens_per_s, \
            transfer_s, limits

    def busy_s(self, r: str) -> float:
        """How long the engine is busy with the prefill work it already holds."""
        return self.loads[r].num_outstanding_prompt_tokens / self.speed

    def done_s(self, r: str) -> float:
        """When the engine would finish this prompt's prefill, behind the work it holds."""
        return self.busy_s(r) + self.n / self.speed

    def stall_budget_s(self, r: str) -> float:
        lim = self.limits
        slack = max(0.0, lim.itl_target_s - self.loads[r].itl_s) * lim.mean_output_tokens * lim.stall_budget_share
        return max(lim.itl_target_s, slack)

    def stalled(self, r: str) -> int:
        """Decoding streams on ``r`` that a prefill of this prompt there stalls past their budget."""
        return self.loads[r].num_running if self.n / self.speed > self.stall_budget_s(r) else 0

    def whole(self, r: str) -> Option:
        ttft = self.done_s(r)
        return Option(r, None, ttft, self.stalled(r), ttft > self.limits.ttft_target_s)

    def pull_may_wait(self, decode: str) -> bool:
        """Whether a pull to ``decode`` may wait for its own prefill work: within ``max_pull_wait_s``, or where that
        is unset, within what this prompt's prefill and pull leave of the TTFT target."""
        limit = self.limits.max_pull_wait_s
        if limit is None:
            limit = self.limits.ttft_target_s - self.n / self.speed - self.pull_s(decode)
        return self.busy_s(decode) <= limit

    def pull_s(self, decode: str) -> float:
        """The pull's time at the decode engine's own measured pull speed (NIXL's bytes over transfer time; no
        handshake or queue in it); before it measured any, ``transfer_s``."""
        speed = self.loads[decode].kv_pull_tokens_per_s
        return self.n / speed if speed > 0 else self.transfer_s

    def pair(self, prefill: str, decode: str) -> Option:
        """The pull starts when the prefill is done and the decode engine has finished its own prefill work."""
        ttft = max(self.done_s(prefill), self.busy_s(decode)) + self.pull_s(decode)
        return Option(decode, prefill, ttft, self.stalled(prefill), ttft > self.limits.ttft_target_s)


def choose_pair(num_prompt_tokens: int, loads: Mapping[str, ReplicaLoad], tokens_per_s: float,
                limits: ElasticLimits, exclude: Iterable[str] = (), transfer_s: float = 0.0) -> PairDecision:
    """The (prefill, decode) pair for one request; see the module's docstring for the rule. ``transfer_s``: the
    pull time assumed for a decode engine that has not measured its own pulls yet."""
    excluded = frozenset(exclude)
    eligible = sorted(r for r in loads if r not in excluded)
    if not eligible:
        return PairDecision(Route.LOCAL_PREFILL, RouteReason.PREFILL_UNAVAILABLE, None)
    predict = _Predict(num_prompt_tokens, loads, tokens_per_s, transfer_s, limits)

    def kv_room(r: str) -> bool:  # KV cache left to hold a hand-off or another stream
        return loads[r].kv_cache_usage < limits.max_kv_cache_usage

    def full(r: str) -> bool:  # no room for another stream: as many as packing allows, slow streams, no KV cache left
        slow = loads[r].itl_s >= limits.pack_itl_fraction * limits.itl_target_s
        return _streams(loads[r]) >= limits.max_streams_per_engine or slow or not kv_room(r)

    def pack_rank(r: str) -> tuple:  # the busiest engine with room for a stream; else the least loaded
        return (True, loads[r].score(), r) if full(r) else (False, -_streams(loads[r]), loads[r].score(), r)

    def whole(engine: str, reason: RouteReason) -> PairDecision:
        return PairDecision(Route.LOCAL_PREFILL, reason, engine)

    packed = min(eligible, key=pack_rank)
    if num_prompt_tokens < limits.min_remote_prefill_tokens:
        return whole(packed, RouteReason.SHORT_PROMPT)
    with_room = [r for r in eligible if kv_room(r)]
    if not with_room:  # no engine can hold a hand-off: the best decode engine does it all
        return whole(packed, RouteReason.PREFILL_UNAVAILABLE)
    if len(eligible) == 1:
        return whole(packed, RouteReason.PREFILL_UNAVAILABLE)
    if all(loads[r].num_running == 0 for r in eligible):  # no stream to stall anywhere: the soonest done, whole
        return whole(min(with_room, key=lambda r: (predict.done_s(r), pack_rank(r))), RouteReason.NO_STREAMS_TO_STALL)
    return _decide(predict, eligible, with_room, full, pack_rank)


def _decide(predict: _Predict, eligible: list[str], with_room: list[str], full, pack_rank) -> PairDecision:
    """Where a long prompt's prefill stalls streams: the option with the fewest predicted misses (a TTFT past its
    target; decoding streams stalled past their budget), preferring, at equal misses, the packed decode engine
    serving it whole, then a hand-off to it, then a hand-off to the next decode engine, then the quietest engine
    taking the stream whole; then the sooner first token."""
    loads = predict.loads
    decoders = sorted((r for r in eligible if not full(r)), key=pack_rank)
    quiet = sorted(with_room, key=lambda r: (loads[r].num_running, predict.done_s(r), r))
    ranked: list[tuple[Option, int]] = []
    if decoders:
        ranked.append((predict.whole(decoders[0]), 0))
    for rank, decode in enumerate(decoders[:3], start=1):
        if predict.pull_may_wait(decode):  # never a pull waiting long behind a local prefill
            ranked += [(predict.pair(p, decode), rank) for p in quiet[:3] if p != decode]
    balance = next((r for r in quiet if r not in decoders[:1]), None)
    if balance is not None:
        ranked.append((predict.whole(balance), 4))
    best, _ = min(ranked, key=lambda o: (o[0].misses, o[1], o[0].ttft_s))
    if best.prefill is not None:
        reason = RouteReason.ITL_PROTECTED if predict.stalled(best.decode) else RouteReason.TTFT_PROTECTED
        return PairDecision(Route.DISAGGREGATED, reason, best.decode, best.prefill)
    packed = decoders[0] if decoders else None
    return PairDecision(Route.LOCAL_PREFILL, _why_whole(best, ranked, predict, full, packed), best.decode)


def _why_whole(best: Option, ranked: list[tuple[Option, int]], predict: _Predict, full, packed: str | None
               ) -> RouteReason:
    loads = predict.loads
    if (packed is not None and predict.busy_s(packed) > 0 and not predict.pull_may_wait(packed)
            and (best.decode != packed or best.misses)):
        return RouteReason.PULL_WOULD_WAIT  # a hand-off to the packed engine was no option: its pull would wait
    if best.misses == 0:
        return RouteReason.STALL_WITHIN_SLO if loads[best.decode].num_running else RouteReason.NO_STREAMS_TO_STALL
    if best.decode != packed or any(full(r) and loads[r].num_running >= loads[best.decode].num_running
                                    for r in loads if r != best.decode):
        return RouteReason.BALANCE_STREAMS
    pairs = [o for o, _ in ranked if o.prefill is not None]
    if pairs and min(loads[o.prefill].num_running for o in pairs) >= loads[best.decode].num_running:
        return RouteReason.NO_QUIETER_ENGINE
    return RouteReason.PREFILL_OVERLOADED
