"""Decode replicas: pull the prompt's KV from a prefill engine and stream the completion.

With no hand-off (colocated mode, or a request pdserve decides to prefill locally) the same replica
prefills the prompt itself.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from ray import serve

from ..metrics import metrics
from ..replies import ErrorReply, JsonReply, ReplicaTag
from ..routing import RouteRequest
from .base import EngineServer


@serve.deployment(name="DecodeServer")
class DecodeServer(EngineServer):
    async def generate(
        self, endpoint: str, body: dict, kv_transfer_params: dict | None = None, route: RouteRequest | None = None
    ) -> AsyncIterator[ReplicaTag | JsonReply | ErrorReply | str]:
        """First a ``ReplicaTag`` (who serves the request), then the engine's reply."""
        yield ReplicaTag(self.replica, time.time())
        async for item in self.engine.generate(endpoint, body, kv_transfer_params):
            if isinstance(item, ErrorReply) and item.type == "KVTransferTimeout":
                metrics().kv_transfer_failures.inc(tags={"model": self.engine.spec.served_model_name})
            yield item
