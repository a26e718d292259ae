"""The prefill and decode phases of one request, with retries, deadlines, fallbacks and the circuit breaker.

Failure rules (what pdserve promises):
- prefill replica dead, erroring or past ``prefill_timeout_s``: retry on another prefill replica, then prefill
  locally on the decode replica;
- a hand-off whose KV cannot be pulled within ``kv_pull_timeout_s`` (prefill frozen or unreachable): the decode
  engine aborts the pull, and the request is prefilled locally;
- decode replica dead before its first reply: retry on another decode replica (with the same hand-off);
- after tokens went out: the stream ends with an error event and ``[DONE]`` (see ingress.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace

from ray.exceptions import RayError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from ..kv import KVTransferParams
from ..metrics import metrics
from ..replies import ErrorReply, JsonReply, PrefillReply, ReplicaTag
from ..routing import POLICIES, CircuitBreaker, ReplicaLoad, RouteRequest
from ..routing.router import ROUTERS
from ..settings import RoutingSettings
from .trace import Trace

logger = logging.getLogger("ray.serve.pdserve.phases")  # under Serve's logger: lands in the replica log


class Overloaded(Exception):
    """A pool's queue is full (Serve's max_queued_requests): the client should retry later (HTTP 429)."""


def pool_view(deployment: str) -> dict[str, ReplicaLoad] | None:
    """Live replicas of a pool and their loads, from its router in this process; None before its first use."""
    router = ROUTERS.get(deployment)
    return router.pool_view() if router is not None else None


def pick(policy: str, route: RouteRequest, view: dict[str, ReplicaLoad] | None) -> str | None:
    if not view:
        return None
    ranked = POLICIES[policy](route, list(view), view)
    return ranked[0] if ranked else None


def _replica_failed(breaker: CircuitBreaker, exclude: set[str], target: str | None) -> None:
    """Count a failure against the replica this attempt targeted and keep the request's retries off it."""
    if target:
        breaker.record_failure(target)
        exclude.add(target)


async def _await(response):
    return await response


class _InFlight:
    """Requests a phase has in flight, published as ``pdserve_inflight_requests{pool}``."""

    def __init__(self, model: str, pool: str):
        self.tags, self.count = {"model": model, "pool": pool}, 0

    def __enter__(self):
        self.count += 1
        self.publish()

    def __exit__(self, *exc):
        self.count -= 1
        self.publish()

    def publish(self) -> None:
        """Also called every few seconds: Ray's exporter drops a gauge series that is not re-set."""
        metrics().inflight.set(self.count, tags=self.tags)


class PrefillPhase:
    def __init__(self, handle: DeploymentHandle, deployment: str, settings: RoutingSettings, model: str):
        self.handle = handle
        self.deployment = deployment
        self.inflight = _InFlight(model, "prefill")
        self.settings = settings
        self.breaker = CircuitBreaker(settings.breaker_failure_threshold, settings.breaker_cooldown_s)

    def live_loads(self) -> list[ReplicaLoad] | None:
        view = pool_view(self.deployment)
        if view is None:
            return None
        excluded = self.breaker.excluded()
        return [load for rid, load in view.items() if rid not in excluded]

    async def run(self, endpoint: str, body: dict, route: RouteRequest, trace: Trace) -> PrefillReply | ErrorReply | None:
        """The KV hand-off, a client error (4xx), or None: prefill failed everywhere or its queue is full,
        so the decode replica prefills locally."""
        with self.inflight:
            return await self._run(endpoint, body, route, trace)

    async def _run(self, endpoint: str, body: dict, route: RouteRequest, trace: Trace) -> PrefillReply | ErrorReply | None:
        exclude = set(self.breaker.excluded())
        for _ in range(self.settings.num_prefill_attempts):
            attempt = replace(route, exclude=frozenset(exclude))
            target = pick(self.settings.prefill_policy, attempt, pool_view(self.deployment))
            attempt = replace(attempt, target=target)
            trace.num_prefill_attempts += 1
            response = self.handle.prefill.remote(endpoint, body, route=attempt)
            try:
                reply = await asyncio.wait_for(_await(response), self.settings.prefill_timeout_s)
            except asyncio.CancelledError:  # the client left: abort the prefill too
                response.cancel()
                raise
            except BackPressureError:
                trace.fallbacks.append("prefill_backpressure")  # prefill pool full: the decode replica prefills
                return None
            except (RayError, asyncio.TimeoutError) as exc:
                response.cancel()
                failure = "timeout" if isinstance(exc, asyncio.TimeoutError) else type(exc).__name__
                logger.warning("%s: prefill on %s failed (%s)", trace.request_id, target, failure)
                trace.fallbacks.append(f"prefill_{failure}")
                _replica_failed(self.breaker, exclude, target)
                continue
            if isinstance(reply, ErrorReply):
                if reply.status < 500:
                    return reply  # the client's request is invalid: no retry
                trace.fallbacks.append("prefill_error")
                _replica_failed(self.breaker, exclude, target)
                continue
            self.breaker.record_success(reply.prefill_replica)
            trace.prefill_replica, trace.kv_bytes = reply.prefill_replica, reply.kv_bytes
            trace.prefill_started_at, trace.prefill_finished_at = reply.started_at, reply.finished_at
            trace.prefill_received_at = time.time()
            KVTransferParams.model_validate(reply.kv_transfer_params)  # a malformed hand-off fails here
            return reply
        return None


class DecodePhase:
    def __init__(self, handle: DeploymentHandle, deployment: str, settings: RoutingSettings, model: str,
                 timeout_s: float):
        self.handle = handle.options(stream=True)
        self.deployment = deployment
        self.inflight = _InFlight(model, "decode")
        self.settings = settings
        self.timeout_s = timeout_s
        self.breaker = CircuitBreaker(settings.breaker_failure_threshold, settings.breaker_cooldown_s)

    async def run(
        self, endpoint: str, body: dict, handoff: PrefillReply | None, route: RouteRequest, trace: Trace,
        prefill_breaker: CircuitBreaker | None,
    ) -> AsyncIterator[JsonReply | ErrorReply | str]:
        with self.inflight:
            async for item in self._run(endpoint, body, handoff, route, trace, prefill_breaker):
                yield item

    async def _run(self, endpoint, body, handoff, route, trace, prefill_breaker):
        exclude = set(self.breaker.excluded())
        attempts_left = self.settings.num_decode_attempts
        while attempts_left > 0:
            attempts_left -= 1
            attempt = replace(route, exclude=frozenset(exclude))
            target = pick(self.settings.decode_policy, attempt, pool_view(self.deployment))
            attempt = replace(attempt, target=target)
            trace.num_decode_attempts += 1
            kv_params = KVTransferParams.model_validate(handoff.kv_transfer_params).for_decode() if handoff else None
            stream = self.handle.generate.remote(endpoint, body, kv_params, route=attempt)
            try:
                tag = await asyncio.wait_for(anext(stream), self.timeout_s)
                first = await asyncio.wait_for(anext(stream), self.timeout_s)
            except asyncio.CancelledError:
                stream.cancel()
                raise
            except BackPressureError as exc:
                raise Overloaded(str(exc)) from None
            except (RayError, asyncio.TimeoutError, StopAsyncIteration) as exc:
                stream.cancel()
                failure = "timeout" if isinstance(exc, asyncio.TimeoutError) else type(exc).__name__
                logger.warning("%s: decode on %s failed before its first reply (%s)", trace.request_id, target, failure)
                trace.fallbacks.append(f"decode_{failure}")
                _replica_failed(self.breaker, exclude, target)
                continue
            assert isinstance(tag, ReplicaTag), tag
            trace.decode_replica, trace.decode_started_at = tag.replica, tag.started_at
            if isinstance(first, ErrorReply) and first.type == "KVTransferTimeout" and handoff is not None:
                # The prefill replica holding the KV is frozen or unreachable: prefill on a decode replica.
                stream.cancel()
                if prefill_breaker is not None:
                    prefill_breaker.record_failure(handoff.prefill_replica)
                trace.fallbacks.append("kv_pull_timeout")
                trace.route, trace.reason, handoff = "local_prefill", "kv_pull_failed", None
                trace.clear_prefill()
                attempts_left += 1  # the decode replica did nothing wrong
                continue
            self.breaker.record_success(tag.replica)
            try:
                yield first
                while True:  # each chunk within the request deadline: a frozen replica cannot hang the client
                    try:
                        item = await asyncio.wait_for(anext(stream), self.timeout_s)
                    except StopAsyncIteration:
                        return
                    yield item
            finally:
                stream.cancel()  # no-op when finished; aborts the engine request when the client left early
            return
        yield ErrorReply(503, f"no decode replica could serve the request after {trace.num_decode_attempts} "
                              f"attempt(s): {', '.join(trace.fallbacks)}", "ServiceUnavailable")
