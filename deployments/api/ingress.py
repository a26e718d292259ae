"""The OpenAI-compatible HTTP ingress and the one function that shows a request's whole path."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from ..replies import ErrorReply, JsonReply
from ..routing import ReplicaLoad, RouteRequest, decide_prefill
from ..routing.policies import estimate_prompt_tokens, prefix_key, prompt_text
from ..settings import PDServeSettings
from ..metrics import metrics, record_request
from .phases import DecodePhase, Overloaded, PrefillPhase
from .trace import Trace

logger = logging.getLogger("ray.serve.pdserve.ingress")  # under Serve's logger: lands in the replica log
api = FastAPI(title="pdserve", description="Disaggregated prefill/decode LLM serving, OpenAI-compatible API")
MAX_BODY_BYTES = 4 * 1024 * 1024


def error_response(err: ErrorReply, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


@serve.deployment(name="Ingress", num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress(api)
class Ingress:
    def __init__(self, settings: PDServeSettings, prefill: DeploymentHandle | None, decode: DeploymentHandle):
        self.settings = settings
        self.model_name = settings.model.served_model_name
        routing = settings.routing
        self.prefill = PrefillPhase(prefill, "PrefillServer", routing, self.model_name) if prefill is not None else None
        decode_name = "DecodeServer" if prefill is not None else "ColocatedServer"
        self.decode = DecodePhase(decode, decode_name, routing, self.model_name, settings.request_timeout_s)
        self.num_requests = 0
        self._gauge_refresh: asyncio.Task | None = None

    async def _refresh_gauges(self) -> None:
        while True:
            for phase in (self.prefill, self.decode):
                if phase is not None:
                    phase.inflight.publish()
            await asyncio.sleep(2)

    async def serve_request(self, endpoint: str, body: dict, trace: Trace) -> AsyncIterator[JsonReply | ErrorReply | str]:
        """route → prefill → hand-off → decode → stream."""
        route = self.route(body, trace)
        handoff = None
        if trace.route == "disaggregated":
            handoff = await self.prefill.run(endpoint, body, route, trace)
            if isinstance(handoff, ErrorReply):  # invalid request: 4xx
                yield handoff
                return
            if handoff is None:
                trace.route, trace.reason = "local_prefill", trace.fallbacks[-1]
        async for item in self.decode.run(endpoint, body, handoff, route, trace,
                                          self.prefill.breaker if self.prefill else None):
            yield item

    def route(self, body: dict, trace: Trace) -> RouteRequest:
        """Describe the request for the routing policies and decide where its prompt is prefilled."""
        self.num_requests += 1
        route = RouteRequest(seq=self.num_requests, prefix_key=prefix_key(prompt_text(body)),
                             num_prompt_tokens=estimate_prompt_tokens(body))
        if self.prefill is None:
            trace.route, trace.reason = "colocated", "colocated_mode"
            return route
        loads = self.prefill.live_loads()
        decision = decide_prefill(route.num_prompt_tokens, loads if loads is not None else [ReplicaLoad()],  # not seen yet: one idle
                                  self.settings.routing.min_remote_prefill_tokens,
                                  self.settings.routing.max_prefill_waiting)
        trace.route, trace.reason = decision.route, decision.reason
        return route

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

    async def _handle(self, endpoint: str, request: Request):
        if self._gauge_refresh is None:
            self._gauge_refresh = asyncio.create_task(self._refresh_gauges())
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            return error_response(ErrorReply(413, f"request body over {MAX_BODY_BYTES} bytes", "RequestTooLarge"))
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            return error_response(ErrorReply(400, f"malformed JSON body: {exc}"))
        if not isinstance(body, dict):
            return error_response(ErrorReply(400, "request body must be a JSON object"))
        if body.get("model", self.model_name) != self.model_name:
            return error_response(ErrorReply(
                404, f"The model `{body.get('model')}` does not exist; this server serves `{self.model_name}`.",
                "NotFoundError", "model"))
        trace = Trace(request_id=request.headers.get("x-request-id") or uuid.uuid4().hex, model=self.model_name)
        replies = self.serve_request(endpoint, body, trace)
        try:
            first = await anext(replies)
        except Overloaded as exc:
            self._finish(trace, 429)
            return error_response(ErrorReply(429, f"server overloaded, retry later: {exc}", "RateLimitError"),
                                  trace.headers() | {"retry-after": "1"})
        if isinstance(first, ErrorReply):
            self._finish(trace, first.status)
            return error_response(first, trace.headers())
        if isinstance(first, JsonReply):
            trace.finished_at = time.time()
            engine = first.body.get("metrics") or {}
            engine_ttft_ms = engine.get("time_to_first_token_ms")
            if engine.get("mean_itl_ms") is not None:
                trace.engine_mean_itl_s = engine["mean_itl_ms"] / 1000
            if engine_ttft_ms is not None and trace.decode_started_at is not None:
                trace.first_token_at = min(trace.decode_started_at + engine_ttft_ms / 1000, trace.finished_at)
            self._finish(trace, 200)
            return JSONResponse(first.body | {"pdserve_timing": trace.timing()},
                                headers=trace.headers() | {"x-pdserve-timing": trace.timing_header()})
        trace.first_token_at = time.time()
        return StreamingResponse(self._stream(first, replies, trace, skip_first_gap=endpoint == "chat"),
                                 media_type="text/event-stream", headers=trace.headers())

    async def _stream(self, first: str, rest: AsyncIterator, trace: Trace, skip_first_gap: bool) -> AsyncIterator[str]:
        """Relay SSE chunks; time each gap; put the timing breakdown into the final usage chunk, if any."""
        status, last = 200, time.time()
        try:
            yield first
            async for chunk in rest:
                now = time.time()
                if chunk.startswith("data: [DONE]"):
                    trace.finished_at = trace.finished_at or now
                elif '"usage":{' in chunk and '"choices":[]' in chunk:  # the final usage chunk
                    trace.finished_at = now
                    payload = json.loads(chunk[len("data: "):])
                    chunk = f"data: {json.dumps(payload | {'pdserve_timing': trace.timing()})}\n\n"
                elif skip_first_gap:
                    skip_first_gap = False  # chat's first chunk only carries the role
                else:
                    trace.token_gaps_s.append(now - last)
                last = now
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            status = 499  # the client went away
            raise
        except Exception as exc:  # the stream broke after tokens went out: end it cleanly
            status = 503
            logger.warning("%s: stream interrupted: %s: %s", trace.request_id, type(exc).__name__, exc)
            err = ErrorReply(503, f"stream interrupted: {type(exc).__name__}: {exc}", "ServiceUnavailable")
            yield f"data: {json.dumps(err.body())}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            await rest.aclose()  # client gone or stream done: cancel the replica call (vLLM aborts the request)
            self._finish(trace, status)

    def _finish(self, trace: Trace, status: int) -> None:
        """One log line and the metrics of a finished request."""
        trace.finished_at = trace.finished_at or time.time()
        outcome = "ok" if status == 200 else "client_error" if status < 500 else "server_error"
        timing = trace.timing() if status == 200 else {}
        logger.info("request %s", json.dumps({"request_id": trace.request_id, "status": status, "route": trace.route,
                                              "reason": trace.reason, "fallbacks": trace.fallbacks,
                                              "retries": trace.num_retries} | timing))
        record_request(metrics(), trace, status, outcome, self.settings.slo)
