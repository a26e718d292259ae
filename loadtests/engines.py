"""Every engine's own load, asked through Serve (not the metrics target: Ray's exporter drops a gauge that an
idle engine stops setting, so "no series" there proves nothing). Needs the Ray cluster of the server."""

from __future__ import annotations

import time

ENGINE_DEPLOYMENTS = ("PrefillServer", "DecodeServer", "ColocatedServer")
BUSY_KEYS = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")


def engine_loads() -> dict[str, dict[str, float]]:
    """``app/deployment/replica`` -> its engine's running and waiting requests and KV cache usage (0..1)."""
    import ray
    from ray import serve

    from deployments.routing import RouteRequest

    if not ray.is_initialized():
        ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
    out = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        prefix, _, rest = actor["name"].partition("::")
        if prefix != "SERVE_REPLICA" or rest.count("#") != 2:
            continue
        app, deployment, replica = rest.split("#")
        if deployment not in ENGINE_DEPLOYMENTS:
            continue
        handle = serve.get_deployment_handle(deployment, app)
        stats = handle.stats.remote(route=RouteRequest(target=replica)).result(timeout_s=60)
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
