"""The prefill and decode phases of one request: what one attempt does and how its result reads.

Retries, replica choice and the breaker are ``attempts.run_attempts``'s; which fallback follows a failed
phase is ``orchestrator.Orchestrator``'s. Failure rules:
- prefill: a replica that died, answered 5xx or stayed silent past its deadline (derived from the prompt
  size and the pool's measured prefill speed) is a replica failure; a replica past the deadline that answers
  a direct probe with other requests in hand was queueing, which is not. Either way the next attempt goes to
  another replica, never the same one; with none left the decode replica prefills locally. A prefill-only run
  refused with 4xx also falls back: the decode engine judges the client's own request.
- decode: a replica that died or answered 5xx before its first token is a failure, retried on another one;
  4xx goes to the client; after the first token a broken stream ends with an error event (ingress.py). A
  stream that stays silent (before or after its first token) gets its replica probed directly every
  ``decode_probe_interval_s``: a replica that answers is busy (a long prefill, a queue) and is waited for; one that
  does not is frozen or cut off, a replica failure, handled as if it had died. A call Serve's router placed (no
  routing view yet in this process) names its replica only in its first message: until then every replica of the
  pool is probed, and one that does not answer is taken to hold the stream.
- every wait is bounded by the request's end-to-end deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from ray.exceptions import RayError
from ray.serve.exceptions import BackPressureError

from ..kv import Handoff, PhaseRequest, decode_request, prefill_request
from ..metrics import metrics
from ..outcomes import Failure, Phase, RouteReason
from ..replies import ErrorReply, HandoffFailed, JsonReply, PrefillReply, PullRecomputed, ReplicaTag
from ..routing import ReplicaLoad, RouteRequest
from ..settings import RoutingSettings
from .attempts import AttemptResult, Pool, Verdict, run_attempts
from .requests import ClientRequest
from .trace import Trace

logger = logging.getLogger("ray.serve.pdserve.phases")  # under Serve's logger: lands in the replica log


# vLLM's parameter names for a refusal of the prompt itself (too long: by its characters before tokenizing, or by
# its tokens), whatever else the request says: the prefill-only copy's refusal is the client's answer.
PROMPT_PARAMS = frozenset({"input_text", "input_tokens"})


# A stream past its first token is probed after this many of its replica's measured inter-token latencies of silence
# (within routing.stream_idle_floor_s and stream_idle_cap_s).
STREAM_IDLE_ITL_FACTOR = 20


class Overloaded(Exception):
    """A pool's queue is full (Serve's max_queued_requests): the client should retry later (HTTP 429)."""


class DeadlineExceeded(Exception):
    """The request's end-to-end deadline passed while it was streaming."""


class Unresponsive(Exception):
    """A decode replica's stream went silent and the replica did not answer a direct probe: frozen or cut off."""

    def __init__(self, replica: str):
        super().__init__(replica)
        self.replica = replica


class InFlight:
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


async def _await(response):
    return await response


class PrefillPhase:
    def __init__(self, handle: Any, pool: Pool, settings: RoutingSettings, model: str):
        self.handle, self.pool, self.settings, self.ledger = handle, pool, settings, pool.ledger
        self.inflight = InFlight(model, "prefill")
        self.tokens_per_s = settings.prefill_tokens_per_s  # the pool's measured prefill speed (EWMA)

    def deadline_s(self, route: RouteRequest) -> float:
        """How long one attempt may take: the prompt at the pool's measured speed (measured from replies, so it
        includes the queueing of recent requests), with headroom, plus a fixed allowance; at most
        ``prefill_timeout_s``. A replica's own reported queue is not added: a frozen replica's last report is
        stale. Queueing past the deadline is told apart by the probe (``_timed_out``). Timeouts do not lengthen
        later deadlines: under a burst they would climb to the cap, and a replica that then froze would cost each
        request the cap again (measured: 16 s to 60 s within one overload test)."""
        s = self.settings
        expected_s = route.num_prompt_tokens / self.tokens_per_s
        return min(s.prefill_timeout_s, s.prefill_deadline_base_s + s.prefill_deadline_factor * expected_s)

    def _measured(self, reply: PrefillReply) -> None:
        took_s = reply.finished_at - reply.started_at
        if reply.num_prompt_tokens > 0 and took_s > 0:
            self.tokens_per_s = 0.8 * self.tokens_per_s + 0.2 * (reply.num_prompt_tokens / took_s)

    async def run(self, req: ClientRequest, route: RouteRequest,
                  trace: Trace) -> Handoff | RouteReason | ErrorReply:
        """The KV hand-off (its params parsed, ready for the decode engine), why the decode replica must prefill
        locally instead, or the client's error when the engine refused the prompt itself (e.g. longer than the
        model takes: no decode engine tokenizes it again)."""
        phase_req = prefill_request(req.endpoint, req.body)
        with self.inflight:
            result = await run_attempts(self.pool, Phase.PREFILL, self.settings.num_prefill_attempts, route, trace,
                                        lambda attempt: self._attempt(phase_req, attempt, trace))
        if result is not None and result.verdict in (Verdict.DONE, Verdict.REFUSED):
            return result.value
        if result is not None and result.failure is Failure.PREFILL_BACKPRESSURE:
            return RouteReason.PREFILL_BACKPRESSURE
        if result is not None and result.failure is Failure.PREFILL_REFUSED:
            return RouteReason.PREFILL_REFUSED
        return RouteReason.PREFILL_FAILED

    async def _attempt(self, req: PhaseRequest, route: RouteRequest, trace: Trace) -> AttemptResult[Handoff]:
        """Booked in the ledger: the prompt's tokens while the replica prefills them."""
        self.ledger.add(route.target, prompt_tokens=route.num_prompt_tokens)
        try:
            return await self._try(req, route, trace)
        finally:
            self.ledger.add(route.target, prompt_tokens=-route.num_prompt_tokens)

    async def _try(self, req: PhaseRequest, route: RouteRequest, trace: Trace) -> AttemptResult[Handoff]:
        timeout_s = min(self.deadline_s(route), trace.remaining_s())
        response = self.handle.prefill.remote(req, route=route)
        try:
            reply = await asyncio.wait_for(_await(response), timeout_s)
        except asyncio.CancelledError:  # the client left: abort the prefill too
            response.cancel()
            raise
        except BackPressureError:  # the prefill pool is full: the decode replica prefills
            return AttemptResult(Verdict.STOP, failure=Failure.PREFILL_BACKPRESSURE)
        except TimeoutError:  # probed before the cancel: the count it answers still includes this request
            try:
                return await self._timed_out(route, trace, timeout_s)
            finally:
                response.cancel()
        except RayError as exc:
            response.cancel()
            logger.warning("%s: prefill on %s failed: %r", trace.request_id, route.target, exc)
            return AttemptResult(Verdict.RETRY, failure=Failure.PREFILL_REPLICA_DIED, replica_at_fault=True)
        if isinstance(reply, ErrorReply):
            if reply.status < 500 and reply.param in PROMPT_PARAMS:  # the prompt itself: the client's answer
                return AttemptResult(Verdict.REFUSED, value=reply, replica=route.target)
            if reply.status < 500:  # the prefill-only copy was refused: let the decode engine judge the request
                return AttemptResult(Verdict.STOP, failure=Failure.PREFILL_REFUSED)
            logger.warning("%s: prefill on %s answered %d: %s", trace.request_id, route.target, reply.status,
                           reply.message)
            return AttemptResult(Verdict.RETRY, failure=Failure.PREFILL_ERROR, replica_at_fault=True)
        try:  # the hand-off is parsed here, once: a malformed one fails here, not in the decode engine
            handoff = Handoff.parse(reply.kv_transfer_params, reply.prefill_replica, reply.kv_expires_at,
                                    reply.kv_fingerprint)
        except ValidationError as exc:
            logger.warning("%s: prefill on %s returned a malformed hand-off: %s", trace.request_id, route.target, exc)
            return AttemptResult(Verdict.RETRY, failure=Failure.PREFILL_ERROR, replica_at_fault=True,
                                 replica=reply.prefill_replica)
        self._measured(reply)
        trace.prefill_replica, trace.prefill_node = reply.prefill_replica, reply.prefill_node
        trace.kv_bytes = reply.kv_bytes
        trace.prefill_started_at, trace.prefill_finished_at = reply.started_at, reply.finished_at
        trace.prefill_received_at = time.time()
        return AttemptResult(Verdict.DONE, value=handoff, replica=reply.prefill_replica)

    async def _timed_out(self, route: RouteRequest, trace: Trace, timeout_s: float) -> AttemptResult[Handoff]:
        if trace.remaining_s() <= 0:
            return AttemptResult(Verdict.STOP, failure=Failure.DEADLINE_EXCEEDED)
        held = await self.pool.probe(route.target, self.settings.replica_probe_timeout_s) if route.target else None
        logger.warning("%s: prefill on %s past its %.1f s deadline; probe: %s", trace.request_id, route.target,
                       timeout_s, "no answer" if held is None else f"{held} request(s) held")
        if held is not None and held > 1:  # alive, with other work beside ours: queueing
            return AttemptResult(Verdict.RETRY, failure=Failure.PREFILL_QUEUED)
        return AttemptResult(Verdict.RETRY, failure=Failure.PREFILL_TIMEOUT, replica_at_fault=route.target is not None)


@dataclass
class DecodeStream:
    """A decode attempt that produced its first reply: the rest follows from ``rest``."""

    first: JsonReply | str
    rest: Any  # the Serve streaming response
    replica: str | None = None  # the replica the ingress chose for it (booked in the ledger)


@dataclass
class DecodeStart:
    """How the decode phase started: a stream, a hand-off the decode replica could not use (nothing ran), or the
    client's error; and whether a pull of the hand-off failed inside vLLM, which then computed the prompt itself."""

    outcome: DecodeStream | HandoffFailed | ErrorReply
    pull_recomputed: bool = False


@dataclass
class _PullSeen:
    """Set by the attempt whose replica reported that vLLM recomputed the prompt after a failed pull."""

    recomputed: bool = False


class DecodePhase:
    def __init__(self, handle: Any, pool: Pool, settings: RoutingSettings, model: str):
        self.handle, self.pool, self.settings, self.ledger = handle, pool, settings, pool.ledger
        self.inflight = InFlight(model, "decode")

    async def start(self, req: ClientRequest, handoff: Handoff | None, route: RouteRequest,
                    trace: Trace) -> DecodeStart:
        """Until the first reply: a stream, a hand-off the replica could not use, or the error for the client."""
        pull = _PullSeen()
        outcome = await self._start(req, handoff, route, trace, pull)
        return DecodeStart(outcome, pull.recomputed)

    async def _start(self, req: ClientRequest, handoff: Handoff | None, route: RouteRequest, trace: Trace,
                     pull: _PullSeen) -> DecodeStream | HandoffFailed | ErrorReply:
        local_req = decode_request(req.endpoint, req.body)
        # What the next attempt sends: the hand-off once at most, then the local prefill.
        next_req = decode_request(req.endpoint, req.body, handoff) if handoff else local_req

        async def attempt(route: RouteRequest) -> AttemptResult:
            nonlocal next_req
            sent = next_req
            result = await self._attempt(sent, route, trace, pull)
            if sent.handoff is not None and result.verdict is Verdict.RETRY:
                # The attempt reached a replica, which may have pulled the KV: the prefill engine frees its blocks on
                # the first completed pull, so a second pull could read freed or reused blocks. Prefill locally.
                next_req = local_req
                trace.prefill_locally(RouteReason.KV_HANDOFF_SPENT)
            return result

        result = await run_attempts(self.pool, Phase.DECODE, self.settings.num_decode_attempts, route, trace, attempt)
        if result is not None and result.value is not None:
            return result.value
        if result is not None and result.failure is Failure.DEADLINE_EXCEEDED:
            return ErrorReply(504, f"request deadline of {trace.timeout_s:.0f} s exceeded", "Timeout")
        return ErrorReply(503, f"no decode replica could serve the request after {trace.attempts[Phase.DECODE]} "
                               f"attempt(s)", "ServiceUnavailable")

    async def _attempt(self, req: PhaseRequest, route: RouteRequest, trace: Trace, pull: _PullSeen) -> AttemptResult:
        """Booked in the ledger: a stream on its replica until ``relay`` ends, waiting until its first
        reply, and the prompt's tokens while the replica prefills them itself."""
        local_tokens = 0 if req.handoff else route.num_prompt_tokens
        self.ledger.add(route.target, streams=1, waiting=1, prompt_tokens=local_tokens)
        result = None
        try:
            result = await self._try(req, route, trace, pull)
            return result
        finally:
            self.ledger.add(route.target, waiting=-1, prompt_tokens=-local_tokens)
            if result is None or result.verdict is not Verdict.DONE:
                self.ledger.add(route.target, streams=-1)

    async def _try(self, req: PhaseRequest, route: RouteRequest, trace: Trace, pull: _PullSeen) -> AttemptResult:
        stream = self.handle.generate.remote(req, route=route)
        replica = route.target  # until the replica's tag names it (None: Serve's router chose, unknown until then)
        try:
            tag = await self._next(stream, replica, trace)
            replica = tag.replica if isinstance(tag, ReplicaTag) else replica
            first = await self._next(stream, replica, trace)
            if isinstance(first, PullRecomputed):  # the engine computed the prompt itself: say so, then go on
                logger.warning("%s: KV pull on %s failed inside vLLM; the prompt was recomputed (%d of %d tokens "
                               "not computed)", trace.request_id, route.target, first.num_cached_tokens,
                               first.num_prompt_tokens)
                pull.recomputed = True
                trace.fallbacks.append(Failure.KV_RECOMPUTED)
                trace.prefill_locally(RouteReason.KV_RECOMPUTED)
                first = await self._next(stream, replica, trace)
        except Unresponsive as exc:
            stream.cancel()
            return AttemptResult(Verdict.RETRY, failure=Failure.DECODE_REPLICA_UNRESPONSIVE, replica_at_fault=True,
                                 replica=exc.replica)
        except asyncio.CancelledError:
            stream.cancel()
            raise
        except BackPressureError as exc:
            raise Overloaded(str(exc)) from None
        except TimeoutError:  # the request's own deadline: no replica's fault
            stream.cancel()
            return AttemptResult(Verdict.STOP, failure=Failure.DEADLINE_EXCEEDED)
        except (RayError, StopAsyncIteration) as exc:
            stream.cancel()
            logger.warning("%s: decode on %s failed before its first reply: %r", trace.request_id, route.target, exc)
            return AttemptResult(Verdict.RETRY, failure=Failure.DECODE_REPLICA_DIED, replica_at_fault=True)
        assert isinstance(tag, ReplicaTag), tag
        trace.decode_replica, trace.decode_node, trace.decode_started_at = tag.replica, tag.node, tag.started_at
        if isinstance(first, HandoffFailed):  # nothing ran on the engine; serve_request decides what follows
            stream.cancel()
            return AttemptResult(Verdict.STOP, value=first, replica=tag.replica)
        if isinstance(first, ErrorReply):
            stream.cancel()
            if first.status < 500:
                return AttemptResult(Verdict.REFUSED, value=first, replica=tag.replica)
            logger.warning("%s: decode on %s answered %d: %s", trace.request_id, tag.replica, first.status,
                           first.message)
            return AttemptResult(Verdict.RETRY, failure=Failure.DECODE_ERROR, replica_at_fault=True,
                                 replica=tag.replica)
        return AttemptResult(Verdict.DONE, value=DecodeStream(first, stream, route.target), replica=tag.replica)

    def stream_idle_s(self, replica: str | None) -> float:
        """How long a stream past its first token may stay silent before its replica is probed: a multiple of the
        replica's measured inter-token latency, within the settings' floor and cap."""
        itl_s = (self.pool.view() or {}).get(replica, ReplicaLoad()).itl_s if replica else 0.0
        s = self.settings
        return min(s.stream_idle_cap_s, max(s.stream_idle_floor_s, STREAM_IDLE_ITL_FACTOR * itl_s)) if itl_s > 0 \
            else s.stream_idle_cap_s

    async def _next(self, stream: Any, replica: str | None, trace: Trace, idle_s: float | None = None) -> Any:
        """The stream's next item, within the request's deadline (else TimeoutError). While the stream is silent its
        replica is asked directly, every ``idle_s`` (``decode_probe_interval_s`` before the first token), whether it
        is alive: one that answers is busy (a long prefill, a queue) and is waited for; one that does not is frozen
        or cut off (``Unresponsive``)."""
        idle_s = idle_s or self.settings.decode_probe_interval_s
        pending = asyncio.ensure_future(anext(stream))
        try:
            while True:
                wait_s = min(trace.remaining_s(), idle_s)
                done, _ = await asyncio.wait({pending}, timeout=max(wait_s, 0))
                if done:
                    return pending.result()
                if trace.remaining_s() <= 0:
                    raise TimeoutError
                probed_at = time.monotonic()
                silent = await self._unanswered_probe(replica)
                if silent is not None and not pending.done():
                    logger.warning("%s: decode on %s silent for %.1f s and %s did not answer a probe in %.1f s: "
                                   "frozen or cut off", trace.request_id, replica or "a replica Serve's router chose",
                                   idle_s, silent, time.monotonic() - probed_at)
                    raise Unresponsive(silent)
        finally:
            pending.cancel()  # a no-op when it finished

    async def _unanswered_probe(self, replica: str | None) -> str | None:
        """Probe ``replica``: itself if it does not answer, else None. Unknown (Serve's router placed the call and
        its tag has not come): every replica of the pool, and the first that does not answer, which may hold the
        stream. A stream waiting in Serve's queue while every replica answers is waited for."""
        timeout_s = self.settings.replica_probe_timeout_s
        if replica is not None:
            return replica if await self.pool.probe(replica, timeout_s) is None else None
        candidates = list(self.pool.view() or {})
        answers = await asyncio.gather(*(self.pool.probe(r, timeout_s) for r in candidates))
        return next((r for r, held in zip(candidates, answers, strict=True) if held is None), None)

    async def relay(self, started: DecodeStream, trace: Trace) -> AsyncIterator[JsonReply | str]:
        """The first reply, then the rest of the stream, all within the request's end-to-end deadline."""
        idle_s = self.stream_idle_s(trace.decode_replica)  # once per stream: the pool view is not per-token work
        try:
            yield started.first
            while True:
                try:
                    item = await self._next(started.rest, trace.decode_replica, trace, idle_s)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    trace.fallbacks.append(Failure.DEADLINE_EXCEEDED)
                    raise DeadlineExceeded(f"request deadline of {trace.timeout_s:.0f} s exceeded") from None
                except Unresponsive:  # ingress.py ends the stream with an error event
                    self.pool.breaker.record_failure(trace.decode_replica)
                    trace.fallbacks.append(Failure.DECODE_REPLICA_UNRESPONSIVE)
                    raise
                yield item
        finally:
            started.rest.cancel()  # no-op when finished; aborts the engine request when the client left early
            self.ledger.add(started.replica, streams=-1)
