"""HTTP for the ingress: the FastAPI app, the API key middleware, error bodies, body reading, the SSE relay and the
one log line per request. What a request does between the phases is ``orchestrator.py``'s."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..metrics import metrics, record_request
from ..outcomes import Failure
from ..replies import ErrorReply, JsonReply
from ..settings import LimitSettings, SLOSettings
from . import auth
from .guard import CLIENT_REQUEST_ID_HEADER
from .phases import DeadlineExceeded
from .trace import Trace

logger = logging.getLogger("ray.serve.pdserve.ingress")  # under Serve's logger: lands in the replica log
api = FastAPI(title="pdserve", description="Disaggregated prefill/decode LLM serving, OpenAI-compatible API")
# Error types whose messages pdserve writes itself (no exception text, ids or addresses): shown as they are.
OWN_ERROR_TYPES = frozenset({"ServiceUnavailable", "Timeout"})


def error_response(err: ErrorReply, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


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


def client_request_id(request: Request) -> str | None:
    """The client's own request id, if it sent a sane token: recorded and echoed as the client's, never used as
    pdserve's id (two clients may send the same one). Serve's HTTP proxy reads ``x-request-id`` itself; the
    header guard (guard.py) hands the client's over as ``x-pdserve-client-request-id``."""
    given = request.headers.get(CLIENT_REQUEST_ID_HEADER, "")  # x-request-id itself is Serve's by now
    if 0 < len(given) <= 128 and given.isascii() and all(c.isalnum() or c in "-_.:" for c in given):
        return given
    return None


async def read_body(request: Request, limits: LimitSettings) -> bytes | ErrorReply:
    """The body, refused with 413 from its Content-Length before reading, or as soon as it grows too big."""
    too_large = ErrorReply(413, f"request body over {limits.max_body_bytes} bytes", "RequestTooLarge")
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limits.max_body_bytes):
        return too_large if length.isdigit() else ErrorReply(400, "invalid Content-Length")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(limits.body_read_timeout_s):  # a trickled body holds no slot
            async for chunk in request.stream():
                size += len(chunk)
                if size > limits.max_body_bytes:
                    return too_large
                chunks.append(chunk)
    except TimeoutError:
        return ErrorReply(408, f"request body not received within {limits.body_read_timeout_s:g} s", "RequestTimeout")
    return b"".join(chunks)


def timed_json(reply: JsonReply, trace: Trace) -> None:
    """A whole (non-streamed) answer: its first token's time from the engine's own metrics, if it sent them."""
    trace.finished_at = time.time()
    engine = reply.body.get("metrics") or {}
    engine_ttft_ms = engine.get("time_to_first_token_ms")
    if engine.get("mean_itl_ms") is not None:
        trace.engine_mean_itl_s = engine["mean_itl_ms"] / 1000
    if engine_ttft_ms is not None and trace.decode_started_at is not None:
        trace.first_token_at = min(trace.decode_started_at + engine_ttft_ms / 1000, trace.finished_at)


def _timed_events(item: str, trace: Trace, state: dict) -> str:
    """One relayed item (it may hold several SSE events: the engine replica joins those that queued up): each gap
    timed, the timing breakdown put into the final usage chunk."""
    now = time.time()
    events = [event for event in item.split("\n\n") if event]
    for i, event in enumerate(events):
        if event.startswith("data: [DONE]"):
            trace.finished_at = trace.finished_at or now
        elif '"usage":{' in event and '"choices":[]' in event:  # the final usage chunk
            trace.finished_at = now
            payload = json.loads(event[len("data: "):])
            events[i] = f"data: {json.dumps(payload | {'pdserve_timing': trace.timing()})}"
        elif state["skip_first_gap"]:
            state["skip_first_gap"] = False  # chat's first chunk only carries the role
        else:
            trace.token_gaps_s.append(now - state["last"])  # chunks that came together: 0 s apart
        state["last"] = now
    return "".join(f"{event}\n\n" for event in events)


async def relay_sse(first: str, rest: AsyncIterator, trace: Trace, skip_first_gap: bool,
                    slo: SLOSettings) -> AsyncIterator[str]:
    """Relay the stream to the client; a stream that breaks after tokens went out ends with an error event."""
    status, state = 200, {"last": time.time(), "skip_first_gap": skip_first_gap}
    try:
        yield first
        async for item in rest:
            yield _timed_events(item, trace, state)
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
        yield f"data: {json.dumps(public(err, trace.request_id).body())}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        await rest.aclose()  # client gone or stream done: cancel the replica call (vLLM aborts the request)
        finish(trace, status, slo)


def finish(trace: Trace, status: int, slo: SLOSettings) -> None:
    """One log line and the metrics of a finished request."""
    trace.finished_at = trace.finished_at or time.time()
    timing = trace.timing() if status == 200 else {}
    logger.info("request %s", json.dumps({"request_id": trace.request_id,
                                          "client_request_id": trace.client_request_id, "status": status,
                                          "route": str(trace.route), "reason": str(trace.reason),
                                          "fallbacks": [str(f) for f in trace.fallbacks],
                                          "retries": trace.num_retries} | timing))
    record_request(metrics(), trace, status, slo)
