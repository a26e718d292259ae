"""The OpenAI-compatible HTTP ingress and the one function that shows a request's whole path."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from ..kv import KVTransferParams
from ..replies import ErrorReply, JsonReply
from ..settings import PDServeSettings

logger = logging.getLogger("pdserve.ingress")
api = FastAPI(title="pdserve", description="Disaggregated prefill/decode LLM serving, OpenAI-compatible API")
MAX_BODY_BYTES = 4 * 1024 * 1024


def error_response(err: ErrorReply) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


@serve.deployment(name="Ingress", num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress(api)
class Ingress:
    def __init__(self, settings: PDServeSettings, prefill: DeploymentHandle | None, decode: DeploymentHandle):
        self.settings = settings
        self.model_name = settings.model.served_model_name
        self.prefill = prefill
        self.decode = decode

    async def serve_request(self, endpoint: str, body: dict) -> AsyncIterator[JsonReply | ErrorReply | str]:
        """route → prefill → hand-off → decode → stream."""
        kv_params = None
        if self.prefill is not None:
            prefill = await self.prefill.prefill.remote(endpoint, body)
            if isinstance(prefill, ErrorReply):
                yield prefill
                return
            kv_params = KVTransferParams.model_validate(prefill.kv_transfer_params).for_decode()
        async for item in self.decode.options(stream=True).generate.remote(endpoint, body, kv_params):
            yield item

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
        t0 = time.monotonic()
        replies = self.serve_request(endpoint, body)
        try:
            first = await replies.__anext__()
        except Exception as exc:  # a replica failed before producing anything
            logger.exception("request failed before the first reply")
            return error_response(ErrorReply(503, f"request failed: {type(exc).__name__}: {exc}", "ServiceUnavailable"))
        if isinstance(first, ErrorReply):
            return error_response(first)
        if isinstance(first, JsonReply):
            logger.info("%s request done in %.3f s", endpoint, time.monotonic() - t0)
            return JSONResponse(first.body)
        return StreamingResponse(self._stream(first, replies), media_type="text/event-stream")

    async def _stream(self, first: str, rest: AsyncIterator) -> AsyncIterator[str]:
        yield first
        try:
            async for chunk in rest:
                yield chunk
        except Exception as exc:  # the stream broke after tokens went out: end it cleanly
            logger.exception("stream failed mid-way")
            err = ErrorReply(503, f"stream interrupted: {type(exc).__name__}: {exc}", "ServiceUnavailable")
            yield f"data: {json.dumps(err.body())}\n\n"
            yield "data: [DONE]\n\n"
