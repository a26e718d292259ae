"""Ray Serve request router that applies pdserve's pure routing policies to live replica stats.

Each engine replica reports its load through ``record_routing_stats`` (Serve polls it in the background and
ships it to every router), so routing never waits on a replica. The ingress passes a ``RouteRequest`` as the
``route`` keyword of each call: its prefix key, prompt size and the replicas to avoid (failed for this
request, or taken out of rotation by the circuit breaker). Routers register themselves by deployment name so
that the ingress, which owns them, can read the pool's live view for its own decisions: it names the replica
(``route.target``), ranked with its own ledger of what it has in flight (``ledger.py``), and this router's
ranking by the reports alone is the fallback for calls that name none.
"""

from __future__ import annotations

import asyncio

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from . import pools
from .policies import POLICIES, ReplicaLoad, RouteRequest


class PDRequestRouter(RequestRouter):
    """Each call goes to the replica chosen for it. No ``FIFOMixin``: that hands a replica chosen for one call to
    whichever call has waited longest, so under contention a call the ingress sent to replica A ran on B, while the
    ingress booked it on A and probed A (a call for a healthy replica held by a frozen one until Serve's health
    check; a retry blamed on the wrong replica)."""

    def initialize_state(self, policy: str = "least_loaded", **kwargs) -> None:
        self._policy = POLICIES[policy]
        pools.ROUTERS[self._deployment_id.name] = self  # the real registry: this class arrives by value

    def pool_view(self) -> dict[str, ReplicaLoad]:
        """Live replicas of this pool and their last reported load."""
        return {rid.unique_id: ReplicaLoad.from_stats(r.routing_stats) for rid, r in self.curr_replicas.items()}

    async def probe(self, replica: str, timeout_s: float) -> int | None:
        """Ask one replica directly (an actor call, past Serve's queues) how many requests it holds; None if it
        does not answer within ``timeout_s`` (frozen, cut off, or gone)."""
        for rid, running in self.curr_replicas.items():
            if rid.unique_id == replica:
                try:
                    return await asyncio.wait_for(running.get_queue_len(deadline_s=timeout_s), timeout_s)
                except Exception:  # timeout, actor died, ...: no answer
                    return None
        return None

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # Every call ranks all candidates, so when none has room Serve must back off before asking again;
            # without this flag its routing loop calls us in a tight loop and spins the ingress's CPU.
            pending_request.routing_context.should_backoff = True
        route = (pending_request.kwargs.get("route") if pending_request else None) or RouteRequest()
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        if route.target in by_id:
            return [[by_id[route.target]]]
        stats = {rid: ReplicaLoad.from_stats(r.routing_stats) for rid, r in by_id.items()}
        ranked = self._policy(route, list(by_id), stats)
        if not ranked:  # every replica excluded: better a suspect replica than no answer at all
            ranked = self._policy(RouteRequest(seq=route.seq, prefix_key=route.prefix_key), list(by_id), stats)
        return [[by_id[rid]] for rid in ranked]
