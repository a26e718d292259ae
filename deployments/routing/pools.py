"""The live routers of this process, by deployment name: how the ingress sees its pools.

This registry must live outside ``router.py``: Serve ships the request router class *by value* (its config
cloudpickles the router's whole module), so module-level state there would be a private copy in the router and
an empty dict everywhere else. Modules are pickled by reference, so the router registers itself here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .policies import ReplicaLoad
    from .router import PDRequestRouter

# deployment name -> the router of that pool in this process (the ingress replica)
ROUTERS: dict[str, PDRequestRouter] = {}


def pool_view(deployment: str) -> dict[str, ReplicaLoad] | None:
    """Live replicas of a pool and their loads, from its router in this process; None before its first use."""
    router = ROUTERS.get(deployment)
    return router.pool_view() if router is not None else None


async def probe(deployment: str, replica: str, timeout_s: float) -> int | None:
    """Requests ``replica`` of ``deployment`` holds, asked directly; None if it does not answer in time."""
    router = ROUTERS.get(deployment)
    return await router.probe(replica, timeout_s) if router is not None else None
