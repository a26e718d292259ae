"""Prefill replicas: compute a prompt's KV cache and hold it for a decode engine to pull."""

from __future__ import annotations

import asyncio
import time

from ray import serve

from ..kv import PhaseRequest
from ..replies import ErrorReply, JsonReply, PrefillReply
from ..roles import ROLES
from ..routing import RouteRequest
from .base import EngineServer, logger


class Prefiller(EngineServer):
    kv_held_until = 0.0  # wall clock: the lease of the newest hand-off; a decode engine may pull until then

    async def before_engine_shutdown(self) -> None:
        """A prefill replica leaving (scale-down, redeploy) has answered every request, but decode engines may
        still be pulling the KV it handed off: keep the engine until the newest lease ran out."""
        wait_s = self.kv_held_until - time.time()
        if wait_s > 0:
            logger.info("draining: keeping the engine %.0f s for KV pulls of hand-offs already made", wait_s)
            await asyncio.sleep(wait_s)

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
        self.kv_held_until = finished_at + self.engine.spec.kv_lease_s
        return PrefillReply(
            kv_transfer_params=reply.body["kv_transfer_params"], num_prompt_tokens=num_prompt_tokens,
            prefill_replica=self.replica, prefill_node=self.node, started_at=started_at, finished_at=finished_at,
            kv_bytes=num_prompt_tokens * self.engine.kv_bytes_per_token,
            kv_expires_at=self.kv_held_until, kv_fingerprint=self.engine.kv_fingerprint,
        )


PrefillServer = serve.deployment(name=ROLES["prefill"].deployment)(Prefiller)
