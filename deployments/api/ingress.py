"""The OpenAI-compatible HTTP ingress and the one function that shows a request's whole path."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..metrics import metrics, record_request
from ..outcomes import Failure, Route, RouteReason
from ..replies import ErrorReply, HandoffFailed, JsonReply
from ..routing import CircuitBreaker, ReplicaLoad, RouteRequest, decide_prefill, pools
from ..routing.elastic import ElasticLimits, choose_pair
from ..routing.ledger import Ledger
from ..settings import PDServeSettings
from . import auth
from .attempts import Pool
from .direct_ingress import direct_ingress_missing
from .guard import CLIENT_REQUEST_ID_HEADER
from .phases import DeadlineExceeded, DecodePhase, DecodeStream, Overloaded, PrefillPhase
from .requests import ClientRequest, inspect, parse_json
from .trace import Trace

logger = logging.getLogger("ray.serve.pdserve.ingress")  # under Serve's logger: lands in the replica log
api = FastAPI(title="pdserve", description="Disaggregated prefill/decode LLM serving, OpenAI-compatible API")
# A hand-off the decode replica could not use: why the request was then prefilled locally, and whose fault it was.
_HANDOFF_FAILED_REASON = {Failure.KV_PULL_TIMEOUT: RouteReason.KV_PULL_FAILED,
                          Failure.KV_LEASE_EXPIRED: RouteReason.KV_LEASE_EXPIRED,
                          Failure.KV_INCOMPATIBLE: RouteReason.KV_INCOMPATIBLE}
_PREFILL_REPLICA_AT_FAULT = {Failure.KV_PULL_TIMEOUT, Failure.KV_INCOMPATIBLE}


def error_response(err: ErrorReply, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


# Error types whose messages pdserve writes itself (no exception text, ids or addresses): shown as they are.
OWN_ERROR_TYPES = frozenset({"ServiceUnavailable", "Timeout"})


def public(err: ErrorReply, request_id: str) -> ErrorReply:
    """What a client may see of an error. A server error from elsewhere (an engine, Ray) keeps its text in the
    log (exception names, actor ids, addresses); the client gets its kind and the request id to quote."""
    if err.status < 500:
        return err
    if err.type in OWN_ERROR_TYPES:
        return ErrorReply(err.status, f"{err.message} (request id {request_id})", err.type)
    return ErrorReply(err.status, f"internal server error (request id {request_id})", "InternalServerError")


class RequireApiKey:
    """The API key check as plain ASGI middleware: a request passes straight through to the app (Starlette's
    ``@app.middleware("http")`` would relay every streamed chunk through an extra task and queue)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            path, root = scope.get("path", ""), scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root):]
            if auth.needs_key(path):
                refused = auth.check(Headers(scope=scope).get("authorization"), auth.KEYS.current())
                if refused is not None:
                    await error_response(refused, {"www-authenticate": "Bearer"})(scope, receive, send)
                    return
        await self.app(scope, receive, send)


api.add_middleware(RequireApiKey)


@api.exception_handler(StarletteHTTPException)
async def http_error(request: Request, exc: StarletteHTTPException):
    kind = {404: "NotFoundError", 405: "MethodNotAllowed"}.get(exc.status_code, "BadRequestError")
    return error_response(ErrorReply(exc.status_code, str(exc.detail), kind), getattr(exc, "headers", None))


@api.exception_handler(Exception)
async def unhandled_error(request: Request, exc: Exception):
    """Last resort (a bug of ours outside a request's own handler): OpenAI-style JSON, no internal text."""
    logger.error("unhandled error on %s: %r", request.url.path, exc)
    return error_response(public(ErrorReply(500, "internal"), "unknown"))


@api.exception_handler(RequestValidationError)
async def validation_error(request: Request, exc: RequestValidationError):
    return error_response(ErrorReply(400, "invalid request"))


def _client_request_id(request: Request) -> str | None:
    """The client's own request id, if it sent a sane token: recorded and echoed as the client's, never used as
    pdserve's id (two clients may send the same one). Serve's HTTP proxy reads ``x-request-id`` itself; the
    header guard (guard.py) hands the client's over as ``x-pdserve-client-request-id``."""
    given = request.headers.get(CLIENT_REQUEST_ID_HEADER, "")  # x-request-id itself is Serve's by now
    if 0 < len(given) <= 128 and given.isascii() and all(c.isalnum() or c in "-_.:" for c in given):
        return given
    return None


def _pool(deployment: str, policy: str, breaker: CircuitBreaker, suspect_fallback: bool, ledger: Ledger) -> Pool:
    return Pool(policy, breaker, functools.partial(pools.pool_view, deployment),
                functools.partial(pools.probe, deployment), suspect_fallback, ledger)


@serve.deployment(name="Ingress", num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress(api)
class Ingress:
    def __init__(self, settings: PDServeSettings, prefill: DeploymentHandle | None, decode: DeploymentHandle):
        """``prefill`` None: colocated mode; the same deployment as ``decode``: elastic mode, one pool of engines
        that play both phases, sharing one breaker (an engine that fails, fails for both)."""
        why = direct_ingress_missing(settings, dict(os.environ))
        if why:
            raise RuntimeError(why)
        self.settings = settings
        self.model_name = settings.model.served_model_name
        r = settings.routing
        breaker = lambda: CircuitBreaker(r.breaker_failure_threshold, r.breaker_cooldown_s)  # noqa: E731
        self.elastic = settings.mode == "elastic"
        self.ledger = Ledger()  # every pool's policy ranks by what this ingress has in flight, not lagging reports
        self.elastic_limits = ElasticLimits(
            itl_target_s=settings.slo.itl_s, ttft_target_s=settings.slo.ttft_s,
            min_remote_prefill_tokens=r.min_remote_prefill_tokens,
            max_streams_per_engine=(r.elastic_max_streams_per_engine
                                    or settings.elastic.engine_for(settings.engine).max_num_seqs),
            pack_itl_fraction=r.elastic_pack_itl_fraction,
        ) if self.elastic else None
        names = {"disaggregated": ("PrefillServer", "DecodeServer"), "colocated": (None, "ColocatedServer"),
                 "elastic": ("ElasticServer", "ElasticServer")}[settings.mode]
        decode_breaker = breaker()
        self.prefill = None
        if prefill is not None:
            prefill_breaker = decode_breaker if self.elastic else breaker()
            self.prefill = PrefillPhase(prefill, _pool(names[0], r.prefill_policy, prefill_breaker, False, self.ledger),
                                        r, self.model_name)
        self.decode = DecodePhase(decode.options(stream=True),
                                  _pool(names[1], r.decode_policy, decode_breaker, True, self.ledger), r,
                                  self.model_name)
        self.num_requests = 0
        self._gauge_refresh: asyncio.Task | None = None
        if auth.KEYS.current() is None:
            logger.warning("no %s or %s set: the API accepts requests without a key", auth.API_KEY_FILE_ENV,
                           auth.API_KEY_ENV)

    async def _refresh_gauges(self) -> None:
        while True:
            for phase in (self.prefill, self.decode):
                if phase is not None:
                    phase.inflight.publish()
            await asyncio.sleep(2)

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
            started = await self.decode.start(req, handoff, route, trace)
            if isinstance(started, HandoffFailed):  # the decode replica could not use the hand-off: prefill locally
                if started.failure in _PREFILL_REPLICA_AT_FAULT:  # frozen, cut off, or serving another KV layout
                    self.prefill.pool.breaker.record_failure(handoff.prefill_replica)
                trace.fallbacks.append(started.failure)
                trace.prefill_locally(_HANDOFF_FAILED_REASON[started.failure])
                started = await self.decode.start(req, None, route, trace)
            elif handoff is not None and Failure.KV_RECOMPUTED in trace.fallbacks:  # the pull failed inside vLLM
                self.prefill.pool.breaker.record_failure(handoff.prefill_replica)
            if not isinstance(started, DecodeStream):
                yield started
                return
            async with contextlib.aclosing(self.decode.relay(started, trace)) as relay:  # closed with this one
                async for item in relay:
                    yield item

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
        decision = choose_pair(route.num_prompt_tokens, self.ledger.loads(view), self.prefill.tokens_per_s,
                               self.elastic_limits, exclude=self.decode.pool.breaker.excluded())
        trace.route, trace.reason = decision.route, decision.reason
        decode_route = replace(route, target=decision.decode)
        if decision.prefill is None:
            return decode_route, decode_route
        exclude = frozenset({decision.decode}) if decision.decode else frozenset()
        return replace(route, target=decision.prefill, exclude=exclude), decode_route

    # ---- HTTP ----------------------------------------------------------------------------------------

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "mode": self.settings.mode}

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": 0, "owned_by": "pdserve"}]}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._handle("chat", request)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._handle("completions", request)

    async def _read_body(self, request: Request) -> bytes | ErrorReply:
        """The body, refused with 413 from its Content-Length before reading, or as soon as it grows too big."""
        limit = self.settings.limits.max_body_bytes
        too_large = ErrorReply(413, f"request body over {limit} bytes", "RequestTooLarge")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return too_large if length.isdigit() else ErrorReply(400, "invalid Content-Length")
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.settings.limits.body_read_timeout_s):  # a trickled body holds no slot
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        return too_large
                    chunks.append(chunk)
        except TimeoutError:
            return ErrorReply(408, f"request body not received within {self.settings.limits.body_read_timeout_s:g} s",
                              "RequestTimeout")
        return b"".join(chunks)

    async def _handle(self, endpoint: str, request: Request):
        if self._gauge_refresh is None:
            self._gauge_refresh = asyncio.create_task(self._refresh_gauges())
        trace = Trace(request_id=uuid.uuid4().hex, model=self.model_name, timeout_s=self.settings.request_timeout_s,
                      client_request_id=_client_request_id(request))
        try:
            return await self._respond(endpoint, request, trace)
        except Exception:  # a bug of ours: logged with the request id, never shown to the client
            logger.exception("%s: unhandled error", trace.request_id)
            self._finish(trace, 500)
            return error_response(public(ErrorReply(500, "internal"), trace.request_id), trace.headers())

    async def _respond(self, endpoint: str, request: Request, trace: Trace):
        raw = await self._read_body(request)
        if isinstance(raw, ErrorReply):
            return self._refuse(raw, trace)
        body = parse_json(raw, self.settings.limits)
        if isinstance(body, ErrorReply):
            return self._refuse(body, trace)
        req = inspect(endpoint, body, self.model_name, self.settings.limits, self.settings.engine.max_model_len)
        if isinstance(req, ErrorReply):
            return self._refuse(req, trace)
        replies = self.serve_request(req, trace)
        try:
            first = await anext(replies)
        except Overloaded:
            self._finish(trace, 429)
            return error_response(ErrorReply(429, "server overloaded, retry later", "RateLimitError"),
                                  trace.headers() | {"retry-after": "1"})
        if isinstance(first, ErrorReply):
            await replies.aclose()
            if first.status >= 500:
                logger.warning("%s: answering %d: %s", trace.request_id, first.status, first.message)
            self._finish(trace, first.status)
            return error_response(public(first, trace.request_id), trace.headers())
        if isinstance(first, JsonReply):
            await replies.aclose()
            self._timed_json(first, trace)
            self._finish(trace, 200)
            return JSONResponse(first.body | {"pdserve_timing": trace.timing()},
                                headers=trace.headers() | {"x-pdserve-timing": trace.timing_header()})
        trace.first_token_at = time.time()
        return StreamingResponse(self._stream(first, replies, trace, skip_first_gap=endpoint == "chat"),
                                 media_type="text/event-stream", headers=trace.headers())

    def _refuse(self, err: ErrorReply, trace: Trace) -> JSONResponse:
        trace.route = Route.COLOCATED if self.prefill is None else Route.LOCAL_PREFILL
        trace.reason = RouteReason.REFUSED
        self._finish(trace, err.status)
        return error_response(err, trace.headers())

    @staticmethod
    def _timed_json(reply: JsonReply, trace: Trace) -> None:
        trace.finished_at = time.time()
        engine = reply.body.get("metrics") or {}
        engine_ttft_ms = engine.get("time_to_first_token_ms")
        if engine.get("mean_itl_ms") is not None:
            trace.engine_mean_itl_s = engine["mean_itl_ms"] / 1000
        if engine_ttft_ms is not None and trace.decode_started_at is not None:
            trace.first_token_at = min(trace.decode_started_at + engine_ttft_ms / 1000, trace.finished_at)

    async def _stream(self, first: str, rest: AsyncIterator, trace: Trace, skip_first_gap: bool) -> AsyncIterator[str]:
        """Relay SSE chunks (an item of ``rest`` may hold several: the engine replica joins those that queued up);
        time each gap; put the timing breakdown into the final usage chunk, if any."""
        status, last = 200, time.time()
        try:
            yield first
            async for item in rest:
                now = time.time()
                events = [event for event in item.split("\n\n") if event]
                for i, event in enumerate(events):
                    if event.startswith("data: [DONE]"):
                        trace.finished_at = trace.finished_at or now
                    elif '"usage":{' in event and '"choices":[]' in event:  # the final usage chunk
                        trace.finished_at = now
                        payload = json.loads(event[len("data: "):])
                        events[i] = f"data: {json.dumps(payload | {'pdserve_timing': trace.timing()})}"
                    elif skip_first_gap:
                        skip_first_gap = False  # chat's first chunk only carries the role
                    else:
                        trace.token_gaps_s.append(now - last)  # chunks that came together: 0 s apart
                    last = now
                yield "".join(f"{event}\n\n" for event in events)
        except (asyncio.CancelledError, GeneratorExit):
            status = 499  # the client went away
            raise
        except Exception as exc:  # the stream broke after tokens went out: end it cleanly
            if isinstance(exc, DeadlineExceeded):
                status, err = 504, ErrorReply(504, f"stream interrupted: {exc}", "Timeout")
            else:
                status = 503
                err = ErrorReply(503, "stream interrupted: the decode replica failed", "ServiceUnavailable")
                trace.fallbacks.append(Failure.STREAM_INTERRUPTED)
            logger.warning("%s: stream interrupted: %r", trace.request_id, exc)
            err = public(err, trace.request_id)
            yield f"data: {json.dumps(err.body())}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            await rest.aclose()  # client gone or stream done: cancel the replica call (vLLM aborts the request)
            self._finish(trace, status)

    def _finish(self, trace: Trace, status: int) -> None:
        """One log line and the metrics of a finished request."""
        trace.finished_at = trace.finished_at or time.time()
        timing = trace.timing() if status == 200 else {}
        logger.info("request %s", json.dumps({"request_id": trace.request_id,
                                              "client_request_id": trace.client_request_id, "status": status,
                                              "route": str(trace.route), "reason": str(trace.reason),
                                              "fallbacks": [str(f) for f in trace.fallbacks],
                                              "retries": trace.num_retries} | timing))
        record_request(metrics(), trace, status, self.settings.slo)

