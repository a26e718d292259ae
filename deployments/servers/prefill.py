"""Prefill replicas: compute a prompt's KV cache and hold it for a decode engine to pull."""

from __future__ import annotations

import time

from ray import serve

from ..kv import PhaseRequest
from ..replies import ErrorReply, JsonReply, PrefillReply
from ..routing import RouteRequest
from .base import EngineServer


@serve.deployment(name="PrefillServer")
class PrefillServer(EngineServer):
    async def prefill(self, req: PhaseRequest, route: RouteRequest | None = None) -> PrefillReply | ErrorReply:
        """Run the prefill-only request (one token, ``do_remote_decode``); return the engine's KV hand-off."""
        reply, started_at = None, time.time()
        num_tokens = route.num_prompt_tokens if route else 0
        self.num_outstanding_prompt_tokens += num_tokens
        try:
            async for item in self.engine.generate(req):
                reply = item
        finally:
            self.num_outstanding_prompt_tokens -= num_tokens
        if isinstance(reply, ErrorReply):
            return reply
        if not isinstance(reply, JsonReply) or not reply.body.get("kv_transfer_params"):
            return ErrorReply(502, "prefill engine returned no kv_transfer_params", "KVTransferError")
        num_prompt_tokens = int((reply.body.get("usage") or {}).get("prompt_tokens") or 0)
        finished_at = time.time()
        return PrefillReply(
            kv_transfer_params=reply.body["kv_transfer_params"], num_prompt_tokens=num_prompt_tokens,
            prefill_replica=self.replica, prefill_node=self.node, started_at=started_at, finished_at=finished_at,
            kv_bytes=num_prompt_tokens * self.engine.kv_bytes_per_token,
            kv_expires_at=finished_at + self.engine.spec.kv_lease_s,
        )
