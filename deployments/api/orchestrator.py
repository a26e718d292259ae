"""A request's whole path, decided in one place: route, prefill, hand-off, decode, and every fallback between them.

No HTTP and no Serve here: the phases (``phases.py``) run attempts and say how each ended, as typed outcomes; this
module decides what follows and whom to blame. The trace only records. ``Ingress`` (``ingress.py``) is the Serve
deployment that wires it to HTTP; ``tests/test_request_path.py`` runs it over fake pools in milliseconds.

Outcomes it reads:
- a prefill phase ends in a hand-off (``kv.Handoff``), a reason to prefill on the decode replica instead
  (``RouteReason``), or the client's own error (``ErrorReply``: the engine refused the prompt itself);
- a decode start (``DecodeStart``) ends in a stream (``DecodeStream``), a hand-off the decode replica could not use
  (``HandoffFailed``, nothing ran), or an error for the client, and says whether vLLM recomputed a failed pull.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from ..kv import Handoff
from ..outcomes import Failure, Route, RouteReason
from ..replies import ErrorReply, HandoffFailed, JsonReply
from ..roles import deployments_of
from ..routing import CircuitBreaker, ReplicaLoad, RouteRequest, decide_prefill
from ..routing.elastic import ElasticLimits, Observed, choose_pair
from ..routing.ledger import Ledger
from ..settings import PDServeSettings
from .attempts import Pool
from .phases import DecodePhase, DecodeStream, PrefillPhase
from .requests import ClientRequest
from .trace import Trace

# A hand-off the decode replica could not use: why the request was then prefilled locally, and whose fault it was.
HANDOFF_FAILED_REASON = {Failure.KV_PULL_TIMEOUT: RouteReason.KV_PULL_FAILED,
                         Failure.KV_LEASE_EXPIRED: RouteReason.KV_LEASE_EXPIRED,
                         Failure.KV_INCOMPATIBLE: RouteReason.KV_INCOMPATIBLE}
PREFILL_REPLICA_AT_FAULT = {Failure.KV_PULL_TIMEOUT, Failure.KV_INCOMPATIBLE}  # frozen, cut off, another KV layout


@dataclass(frozen=True)
class PoolSource:
    """How the orchestrator sees a deployment's replicas: their live loads, and a direct liveness probe.
    Over Serve: ``routing.pools`` (the request routers of this process); in tests: fake pools."""

    view: Callable[[str], dict[str, ReplicaLoad] | None]  # deployment -> live replicas and loads (None: not yet)
    probe: Callable[[str, str, float], Awaitable[int | None]]  # (deployment, replica, timeout_s) -> requests held

    def pool(self, deployment: str, policy: str, breaker: CircuitBreaker, suspect_fallback: bool,
             ledger: Ledger) -> Pool:
        return Pool(policy, breaker, lambda: self.view(deployment),
                    lambda replica, timeout_s: self.probe(deployment, replica, timeout_s), suspect_fallback, ledger)


class Orchestrator:
    def __init__(self, settings: PDServeSettings, prefill: Any | None, decode: Any, source: PoolSource):
        """``prefill``/``decode``: the phases' handles (``prefill`` None: colocated mode; the same handle: elastic
        mode, one pool whose engines play both phases and share one breaker)."""
        self.settings, self.model_name = settings, settings.model.served_model_name
        r = settings.routing
        self.ledger = Ledger()  # every pool's policy ranks by what this ingress has in flight, not lagging reports
        self.elastic = settings.mode == "elastic"
        self.elastic_limits = ElasticLimits(
            itl_target_s=settings.slo.itl_s, ttft_target_s=settings.slo.ttft_s,
            min_remote_prefill_tokens=r.min_remote_prefill_tokens,
            max_streams_per_engine=(r.elastic_max_streams_per_engine
                                    or settings.elastic.engine_for(settings.engine).max_num_seqs),
            pack_itl_fraction=r.elastic_pack_itl_fraction, max_pull_wait_s=r.elastic_max_pull_wait_s,
            stall_budget_share=r.elastic_stall_budget_share,
        ) if self.elastic else None
        self.observed = Observed()
        prefill_name, decode_name = deployments_of(settings.mode)
        for handle, name in ((prefill, prefill_name), (decode, decode_name)):
            wired = getattr(handle, "deployment_name", name)  # a Serve handle knows its deployment; fakes need not
            if handle is not None and wired != name:
                raise ValueError(f"{settings.mode} mode wires {name}, got a handle to {wired}")
        decode_breaker = CircuitBreaker(r.breaker_failure_threshold, r.breaker_cooldown_s)
        self.prefill = None
        if prefill is not None:
            breaker = decode_breaker if self.elastic else CircuitBreaker(r.breaker_failure_threshold,
                                                                         r.breaker_cooldown_s)
            pool = source.pool(prefill_name, r.prefill_policy, breaker, False, self.ledger)
            self.prefill = PrefillPhase(prefill, pool, r, self.model_name)
        pool = source.pool(decode_name, r.decode_policy, decode_breaker, True, self.ledger)
        self.decode = DecodePhase(decode.options(stream=True), pool, r, self.model_name)
        self.num_requests = 0

    async def serve_request(self, req: ClientRequest, trace: Trace) -> AsyncIterator[JsonReply | ErrorReply | str]:
        """route → prefill → hand-off → decode → stream; every fallback is decided here."""
        prefill_route, route = self.route(req, trace)
        handoff = None
        if trace.route is Route.DISAGGREGATED:
            handoff = await self.prefill.run(req, prefill_route, trace)
            if isinstance(handoff, ErrorReply):  # the engine refused the prompt itself: the client's error
                yield handoff
                return
            if isinstance(handoff, RouteReason):  # no hand-off: the decode replica prefills
                trace.prefill_locally(handoff)
                handoff = None
        with self.decode.inflight:
            started = await self._start_decode(req, handoff, route, trace)
            if not isinstance(started, DecodeStream):
                yield started
                return
            async with contextlib.aclosing(self.decode.relay(started, trace)) as relay:  # closed with this one
                async for item in relay:
                    yield item
            self._observe_output(started, trace)

    def _observe_output(self, started: DecodeStream, trace: Trace) -> None:
        """The output length, for the streams' stall budgets (elastic predictions)."""
        if isinstance(started.first, JsonReply):
            self.observed.record_output(int((started.first.body.get("usage") or {}).get("completion_tokens") or 0))
        else:
            self.observed.record_output(len(trace.token_gaps_s) + 1)

    async def _start_decode(self, req: ClientRequest, handoff: Handoff | None, route: RouteRequest,
                            trace: Trace) -> DecodeStream | ErrorReply:
        """The decode phase until its first reply; a hand-off it could not use is followed by a local prefill. The
        prefill replica is blamed where the hand-off failed for its sake (frozen, cut off, another KV layout)."""
        start = await self.decode.start(req, handoff, route, trace)
        if isinstance(start.outcome, HandoffFailed):
            failure = start.outcome.failure
            if failure in PREFILL_REPLICA_AT_FAULT:
                self.prefill.pool.breaker.record_failure(handoff.prefill_replica)
            trace.fallbacks.append(failure)
            trace.prefill_locally(HANDOFF_FAILED_REASON[failure])
            return (await self.decode.start(req, None, route, trace)).outcome
        if start.pull_recomputed and handoff is not None:  # the pull failed inside vLLM: the link or its engine
            self.prefill.pool.breaker.record_failure(handoff.prefill_replica)
        return start.outcome

    def route(self, req: ClientRequest, trace: Trace) -> tuple[RouteRequest, RouteRequest]:
        """Describe the request for the routing policies and decide where its prompt is prefilled: the routes of
        its prefill and its decode phase (elastic mode: each names the engine chosen for it)."""
        self.num_requests += 1
        route = RouteRequest(seq=self.num_requests, prefix_key=req.prefix_key, num_prompt_tokens=req.num_prompt_tokens)
        if self.prefill is None:
            trace.route, trace.reason = Route.COLOCATED, RouteReason.COLOCATED_MODE
        elif req.not_transferable is not None:
            trace.route, trace.reason = Route.LOCAL_PREFILL, RouteReason.NOT_TRANSFERABLE
        elif self.elastic:
            return self._elastic_routes(route, trace)
        else:
            loads = self.prefill.pool.live_loads()
            decision = decide_prefill(route.num_prompt_tokens, loads if loads is not None else [ReplicaLoad()],
                                      self.settings.routing.min_remote_prefill_tokens,
                                      self.settings.routing.max_prefill_waiting)
            trace.route, trace.reason = decision.route, decision.reason
        return route, route

    def _elastic_routes(self, route: RouteRequest, trace: Trace) -> tuple[RouteRequest, RouteRequest]:
        """The (prefill, decode) pair from one pool (routing/elastic.py). The prefill phase may retry on any engine
        but the decode one: prefilling there is the local fallback."""
        view = self.decode.pool.view() or {}
        limits = replace(self.elastic_limits, mean_output_tokens=self.observed.mean_output_tokens)
        decision = choose_pair(route.num_prompt_tokens, self.ledger.loads(view), self.prefill.tokens_per_s, limits,
                               exclude=self.decode.pool.breaker.excluded())
        trace.route, trace.reason = decision.route, decision.reason
        decode_route = replace(route, target=decision.decode)
        if decision.prefill is None:
            return decode_route, decode_route
        exclude = frozenset({decision.decode}) if decision.decode else frozenset()
        return replace(route, target=decision.prefill, exclude=exclude), decode_route
