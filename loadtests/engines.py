"""Engine replicas of a running server, asked through Serve. Needs the Ray cluster of the server.

Load is asked from each engine, not read from the metrics target: Ray's exporter drops a gauge that an idle
engine stops setting, so "no series" there proves nothing.
"""

from __future__ import annotations

import time
from typing import NamedTuple

ENGINE_DEPLOYMENTS = ("PrefillServer", "DecodeServer", "ColocatedServer", "ElasticServer")
BUSY_KEYS = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")


def _connect() -> None:
    from deployments.credentials import use_ray_auth

    use_ray_auth()  # before Ray reads its settings: the cluster pdserve started wants its token, on loopback
    import ray

    if not ray.is_initialized():
        ray.init(address="auto", logging_level="ERROR", log_to_driver=False)


class ServeReplica(NamedTuple):
    app: str
    deployment: str
    replica: str  # Serve's replica id, as in the x-pdserve-*-replica headers

    @property
    def actor_name(self) -> str:
        """The name Serve gives the replica's actor (namespace ``serve``)."""
        return f"SERVE_REPLICA::{self.app}#{self.deployment}#{self.replica}"


def serve_replicas(app: str | None = None, deployment: str | None = None) -> list[ServeReplica]:
    """Every Serve replica (of one app, one deployment), from the names of the live actors."""
    import ray

    _connect()
    out = []
    for actor in ray.util.list_named_actors(all_namespaces=True):
        prefix, _, rest = actor["name"].partition("::")
        if prefix != "SERVE_REPLICA" or rest.count("#") != 2:
            continue
        a, d, replica = rest.split("#")
        if (app is None or a == app) and (deployment is None or d == deployment):
            out.append(ServeReplica(a, d, replica))
    return out


def replica_stats(app: str, deployment: str, replica: str | None, timeout_s: float = 60):
    """That replica's ``EngineStats`` (its engine's counters and gauges, and the replica's pid); any replica's for
    ``replica=None``.

    The call is routed to the replica by id; a router that does not know it yet (a replica Serve just started)
    or no longer (one that is stopping) answers from another replica instead, so the answer's own replica id is
    checked and the call repeated until the replica asked for answers (else ``LookupError``)."""
    from ray import serve

    from deployments.routing import RouteRequest

    _connect()
    handle = serve.get_deployment_handle(deployment, app)
    deadline = time.monotonic() + timeout_s
    while True:
        stats = handle.stats.remote(route=RouteRequest(target=replica)).result(
            timeout_s=max(deadline - time.monotonic(), 1))
        if replica is None or stats.replica == replica:
            return stats
        if time.monotonic() > deadline:
            raise LookupError(f"{deployment} replica {replica} did not answer within {timeout_s:.0f} s "
                              f"(replica {stats.replica} did)")
        time.sleep(0.5)


def engine_loads() -> dict[str, dict[str, float]]:
    """``app/deployment/replica`` -> its engine's running and waiting requests and KV cache usage (0..1)."""
    out = {}
    for app, deployment, replica in serve_replicas():
        if deployment in ENGINE_DEPLOYMENTS:
            stats = replica_stats(app, deployment, replica)
            out[f"{app}/{deployment}/{replica}"] = {k: stats.get(k) for k in BUSY_KEYS}
    return out


def busy_engines(timeout_s: float = 60) -> dict[str, dict[str, float]]:
    """Engines still running or queueing requests, or holding KV blocks, after up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        loads = engine_loads()
        busy = {name: load for name, load in loads.items() if any(v > 0 for v in load.values())}
        if not loads:
            raise RuntimeError("no engine replica found: is the server's Ray cluster running here?")
        if not busy or time.monotonic() > deadline:
            return busy
        time.sleep(5)
