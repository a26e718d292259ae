"""The Serve deployment of the ingress: wiring of HTTP (``http.py``) to the request path (``orchestrator.py``)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from ..outcomes import Route, RouteReason
from ..replies import ErrorReply, JsonReply
from ..routing import pools
from ..settings import PDServeSettings
from . import auth
from .direct_ingress import direct_ingress_missing
from .http import api, client_request_id, error_response, finish, public, read_body, relay_sse, timed_json
from .orchestrator import Orchestrator, PoolSource
from .phases import Overloaded
from .requests import inspect, parse_json
from .trace import Trace

logger = logging.getLogger("ray.serve.pdserve.ingress")  # under Serve's logger: lands in the replica log
SERVE_POOLS = PoolSource(view=pools.pool_view, probe=pools.probe)  # the request routers of this process


@serve.deployment(name="Ingress", num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress(api)
class Ingress:
    def __init__(self, settings: PDServeSettings, prefill: DeploymentHandle | None, decode: DeploymentHandle):
        """``prefill`` None: colocated mode; the same deployment as ``decode``: elastic mode."""
        why = direct_ingress_missing(settings, dict(os.environ))
        if why:
            raise RuntimeError(why)
        self.settings, self.model_name = settings, settings.model.served_model_name
        self.orchestrator = Orchestrator(settings, prefill, decode, SERVE_POOLS)
        self._gauge_refresh: asyncio.Task | None = None
        if auth.KEYS.current() is None:
            logger.warning("no %s or %s set: the API accepts requests without a key", auth.API_KEY_FILE_ENV,
                           auth.API_KEY_ENV)

    async def _refresh_gauges(self) -> None:
        while True:
            for phase in (self.orchestrator.prefill, self.orchestrator.decode):
                if phase is not None:
                    phase.inflight.publish()
            await asyncio.sleep(2)

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

    async def _handle(self, endpoint: str, request: Request):
        if self._gauge_refresh is None:
            self._gauge_refresh = asyncio.create_task(self._refresh_gauges())
        trace = Trace(request_id=uuid.uuid4().hex, model=self.model_name, timeout_s=self.settings.request_timeout_s,
                      client_request_id=client_request_id(request))
        try:
            return await self._respond(endpoint, request, trace)
        except Exception:  # a bug of ours: logged with the request id, never shown to the client
            logger.exception("%s: unhandled error", trace.request_id)
            finish(trace, 500, self.settings.slo)
            return error_response(public(ErrorReply(500, "internal"), trace.request_id), trace.headers())

    async def _respond(self, endpoint: str, request: Request, trace: Trace):
        """Body → checks → the request path → a JSON answer, an error, or a stream."""
        limits = self.settings.limits
        raw = await read_body(request, limits)
        body = raw if isinstance(raw, ErrorReply) else parse_json(raw, limits)
        req = body if isinstance(body, ErrorReply) else inspect(endpoint, body, self.model_name, limits,
                                                                self.settings.engine.max_model_len)
        if isinstance(req, ErrorReply):
            return self._refuse(req, trace)
        replies = self.orchestrator.serve_request(req, trace)
        try:
            first = await anext(replies)
        except Overloaded:
            finish(trace, 429, self.settings.slo)
            return error_response(ErrorReply(429, "server overloaded, retry later", "RateLimitError"),
                                  trace.headers() | {"retry-after": "1"})
        if isinstance(first, ErrorReply):
            await replies.aclose()
            if first.status >= 500:
                logger.warning("%s: answering %d: %s", trace.request_id, first.status, first.message)
            finish(trace, first.status, self.settings.slo)
            return error_response(public(first, trace.request_id), trace.headers())
        if isinstance(first, JsonReply):
            await replies.aclose()
            timed_json(first, trace)
            finish(trace, 200, self.settings.slo)
            return JSONResponse(first.body | {"pdserve_timing": trace.timing()},
                                headers=trace.headers() | {"x-pdserve-timing": trace.timing_header()})
        trace.first_token_at = time.time()
        return StreamingResponse(relay_sse(first, replies, trace, endpoint == "chat", self.settings.slo),
                                 media_type="text/event-stream", headers=trace.headers())

    def _refuse(self, err: ErrorReply, trace: Trace) -> JSONResponse:
        trace.route = Route.COLOCATED if self.orchestrator.prefill is None else Route.LOCAL_PREFILL
        trace.reason = RouteReason.REFUSED
        finish(trace, err.status, self.settings.slo)
        return error_response(err, trace.headers())
