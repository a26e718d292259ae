"""Application builder: settings → Serve application (ingress + prefill and decode pools).

Used by ``pdserve up`` and by any Ray Serve config as ``import_path: deployments.app:build_app``.
"""

from __future__ import annotations

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from .api import Ingress
from .config import parse_settings
from .roles import ROLES
from .routing.autoscaling import PoolAutoscalingPolicy
from .servers import DecodeServer, ElasticServer, PrefillServer
from .servers.base import pool_of
from .settings import PDServeSettings, PoolSettings


def _autoscaling_config(pool: PoolSettings, settings: PDServeSettings, role: str) -> dict:
    a = pool.autoscaling
    max_num_seqs = pool.engine_for(settings.engine).max_num_seqs
    target = a.target_per_replica or (2048 if role == "prefill" else max(1.0, max_num_seqs / 2))
    return {
        "min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
        "initial_replicas": min(max(pool.num_replicas, a.min_replicas), a.max_replicas),
        "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s,
        "look_back_period_s": a.look_back_period_s, "metrics_interval_s": a.metrics_interval_s,
        "policy": {"policy_function": PoolAutoscalingPolicy,
                   "policy_kwargs": {"role": role, "target_per_replica": target,
                                     "target_kv_cache_usage": a.target_kv_cache_usage}},
    }


def _pool_options(settings: PDServeSettings, role: str) -> dict:
    pool = pool_of(settings, role)
    policy = settings.routing.prefill_policy if role == "prefill" else settings.routing.decode_policy
    size = ({"autoscaling_config": _autoscaling_config(pool, settings, role)} if pool.autoscaling
            else {"num_replicas": pool.num_replicas})
    return size | {
        "ray_actor_options": {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus, "resources": pool.ray_resources},
        # One engine batches up to max_num_seqs; let Serve queue a little more before routing elsewhere.
        "max_ongoing_requests": 2 * pool.engine_for(settings.engine).max_num_seqs,
        "health_check_period_s": pool.health_check_period_s,
        "health_check_timeout_s": pool.health_check_timeout_s,
        # A replica leaving (scale-down, redeploy) first finishes what it holds; no request outlives its deadline.
        "graceful_shutdown_timeout_s": settings.request_timeout_s + settings.routing.kv_lease_s,
        # Bounded queue per pool: beyond it the handle raises BackPressureError and the API answers 429.
        "max_queued_requests": settings.routing.max_queued_requests,
        "request_router_config": RequestRouterConfig(
            request_router_class="deployments.routing.router:PDRequestRouter",
            request_router_kwargs={"policy": policy},
            request_routing_stats_period_s=1, request_routing_stats_timeout_s=5,
        ),
    }


def build_app(args: dict | PDServeSettings, ingress_env: dict[str, str] | None = None) -> Application:
    """``ingress_env``: environment of the ingress replica only (``pdserve up`` passes ``PDSERVE_API_KEY``)."""
    settings = args if isinstance(args, PDServeSettings) else parse_settings(args)
    actor_options = {"num_cpus": 0, "resources": settings.ingress.ray_resources}
    if ingress_env:
        actor_options["runtime_env"] = {"env_vars": ingress_env}
    ingress = Ingress.options(ray_actor_options=actor_options)
    if settings.mode == "colocated":
        engines = DecodeServer.options(
            name=ROLES["colocated"].deployment, **_pool_options(settings, "colocated"))
        return ingress.bind(settings, None, engines.bind(settings, "colocated"))
    if settings.mode == "elastic":  # one pool plays both phases: the ingress holds it as both
        engines = ElasticServer.options(**_pool_options(settings, "elastic")).bind(settings, "elastic")
        return ingress.bind(settings, engines, engines)
    prefill = PrefillServer.options(**_pool_options(settings, "prefill"))
    prefill = prefill.bind(settings, "prefill")
    decode = DecodeServer.options(**_pool_options(settings, "decode"))
    decode = decode.bind(settings, "decode")
    return ingress.bind(settings, prefill, decode)
