"""Decode replicas: pull the prompt's KV from a prefill engine and stream the completion.

With no hand-off (colocated mode, or a request pdserve decides to prefill locally) the same replica
prefills the prompt itself.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from ray import serve

from ..kv import PhaseRequest
from ..metrics import metrics
from ..outcomes import Failure
from ..replies import ErrorReply, HandoffFailed, JsonReply, PullRecomputed, ReplicaTag
from ..roles import ROLES
from ..routing import RouteRequest
from .base import EngineServer, logger


class Decoder(EngineServer):
    async def generate(
        self, req: PhaseRequest, route: RouteRequest | None = None
    ) -> AsyncIterator[ReplicaTag | JsonReply | ErrorReply | HandoffFailed | PullRecomputed | str]:
        """First a ``ReplicaTag`` (who serves the request), then the engine's reply.

        A hand-off whose lease would run out before a pull could finish (the request waited, or was retried
        late) is not used: the prefill engine may already have reused those blocks. Nor is one from an engine
        whose KV layout differs (another model, dtype, block size or vLLM version): its blocks would be garbage."""
        yield ReplicaTag(self.replica, time.time(), self.node)
        spec, handoff = self.engine.spec, req.handoff
        if handoff and not handoff.usable(time.time(), spec.kv_pull_timeout_s):
            yield HandoffFailed(Failure.KV_LEASE_EXPIRED)
            return
        if handoff and not handoff.compatible_with(self.engine.kv_fingerprint):
            logger.warning("hand-off from an engine with another KV layout (%s, this engine %s): prefilling locally",
                           handoff.fingerprint, self.engine.kv_fingerprint)
            yield HandoffFailed(Failure.KV_INCOMPATIBLE)
            return
        async for item in self.engine.generate(req):
            if isinstance(item, HandoffFailed | PullRecomputed):
                metrics().kv_transfer_failures.inc(tags={"model": spec.served_model_name})
            yield item


DecodeServer = serve.deployment(name=ROLES["decode"].deployment)(Decoder)
