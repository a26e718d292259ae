"""Elastic replicas: one engine (NIXL ``kv_both``) that prefills for other engines, pulls KV from them, or
serves a request whole, as the ingress chooses per request (deployments/routing/elastic.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from ray import serve

from ..kv import PhaseRequest
from ..replies import ReplicaTag
from ..roles import ROLES
from ..routing import RouteRequest
from .decode import Decoder
from .prefill import Prefiller


class Elastic(Prefiller, Decoder):
    async def generate(self, req: PhaseRequest, route: RouteRequest | None = None) -> AsyncIterator:
        """As a decode replica; a prompt prefilled here counts as outstanding prompt tokens until its first reply
        (so the load report tells the choice how much prefill work this engine holds)."""
        num_tokens = route.num_prompt_tokens if route and not req.handoff else 0
        self.num_outstanding_prompt_tokens += num_tokens
        try:
            async for item in Decoder.generate(self, req, route):
                if num_tokens and not isinstance(item, ReplicaTag):  # the engine's first reply: prefill done
                    self.num_outstanding_prompt_tokens -= num_tokens
                    num_tokens = 0
                yield item
        finally:
            self.num_outstanding_prompt_tokens -= num_tokens


ElasticServer = serve.deployment(name=ROLES["elastic"].deployment)(Elastic)
