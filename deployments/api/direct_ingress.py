"""Serve's direct ingress (``http.direct_ingress_port``): the Ingress replica serves HTTP itself, on its own port.

Serve turns it on from the Ray nodes' environment, read when each node starts (controller and replicas): this module
says what that environment is, lets an Ingress replica refuse to start on a node without it, and finds the ports
Serve gave each application's Ingress replicas.
"""

from __future__ import annotations

import time

from ..settings import DIRECT_INGRESS_SPAN, RAY_NODE_ENV, HttpSettings, PDServeSettings

DIRECT_INGRESS_ENABLE_ENV = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
DIRECT_INGRESS_MIN_PORT_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"


def ray_node_env(apps: list[PDServeSettings]) -> dict[str, str]:
    """Environment of the Ray nodes that serve ``apps``: RAY_NODE_ENV, plus Serve's direct ingress where asked for.

    Direct ingress: Serve reads these at each node's start (controller and replicas). A released port is not held
    back (Serve quarantines it for load balancers by default): an Ingress replica that restarts takes its port back.
    An Ingress replica that stops drains for ``RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S`` (Serve's default
    30 s: a load balancer's deregistration time); nothing but pdserve's own clients sits in front of it here, 2 s.
    """
    port = next((s.http.direct_ingress_port for s in apps if s.http.direct_ingress_port), None)
    if port is None:
        return dict(RAY_NODE_ENV)
    return RAY_NODE_ENV | {
        DIRECT_INGRESS_ENABLE_ENV: "1", DIRECT_INGRESS_MIN_PORT_ENV: str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + DIRECT_INGRESS_SPAN - 1),
        "RAY_SERVE_PORT_QUARANTINE_S": "0", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    }


def direct_ingress_missing(settings: PDServeSettings, environ: dict[str, str]) -> str | None:
    """Why this process (an Ingress replica) cannot serve ``settings``' direct ingress; None if it can or need not."""
    port = settings.http.direct_ingress_port
    if port is None:
        return None
    if environ.get(DIRECT_INGRESS_ENABLE_ENV) != "1" or environ.get(DIRECT_INGRESS_MIN_PORT_ENV) != str(port):
        want = " ".join(f"{k}={v}" for k, v in ray_node_env([settings]).items() if k not in RAY_NODE_ENV)
        return (f"http.direct_ingress_port is {port}, but this Ray node was started without Serve's direct ingress "
                f"on that port: start every Ray node with {want} (`pdserve up` does when it starts the cluster; "
                f"`pdserve down` first if one is running)")
    return None


def direct_ingress_urls(app_names: list[str], http: HttpSettings, timeout_s: float = 60) -> dict[str, list[str]]:
    """Base URLs of each application's Ingress replicas on their own ports, from the Serve controller (which names
    the proxy instead while an application has no running Ingress replica): waits until every application has one,
    TimeoutError after ``timeout_s``."""
    import ray
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller
    urls: dict[str, list[str]] = {}
    deadline = time.monotonic() + timeout_s
    for name in app_names:
        while True:
            groups = ray.get(controller.get_target_groups.remote(name))
            urls[name] = [f"http://{t.ip if http.host in ('0.0.0.0', '::') else http.host}:{t.port}"
                          for g in groups if g.protocol == "HTTP" and g.app_name == name for t in g.targets
                          if 0 <= t.port - http.direct_ingress_port < DIRECT_INGRESS_SPAN]
            if urls[name] or time.monotonic() > deadline:
                break
            time.sleep(1)
        if not urls[name]:
            raise TimeoutError(f"application '{name}' has no direct-ingress replica after {timeout_s:.0f} s")
    return urls
