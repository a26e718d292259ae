"""A Serve replica that owns one vLLM engine: placement, per-replica NIXL identity, health and stats."""

from __future__ import annotations

import logging
import os
import socket
import uuid

import ray
from ray import serve

from ..engine.nixl_plugin import DELAY_ENV
from ..engine.vllm_engine import EngineSpec, Role, VLLMEngine
from ..metrics import metrics
from ..models import resolve_model
from ..replies import EngineStats
from ..settings import PDServeSettings, PoolSettings

logger = logging.getLogger("ray.serve.pdserve.server")  # under Serve's logger: lands in the replica log


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def pool_of(settings: PDServeSettings, role: Role) -> PoolSettings:
    return {"prefill": settings.prefill, "decode": settings.decode, "colocated": settings.colocated}[role]


class EngineServer:
    """Base of the prefill and decode deployments. Each replica gets a unique engine id and NIXL side
    channel (a free port on the node's Ray IP, so peers on other nodes can reach it) and binds its engine
    to the cores its pool names for the replica's local rank."""

    role: Role

    async def __init__(self, settings: PDServeSettings, role: Role):
        self.role = role
        ctx = serve.get_replica_context()
        self.replica = ctx.replica_id.unique_id  # the id Serve's router knows this replica by
        pool = pool_of(settings, role)
        host = ray.util.get_node_ip_address()
        env = {
            "VLLM_NIXL_SIDE_CHANNEL_HOST": host,
            "VLLM_NIXL_SIDE_CHANNEL_PORT": str(_free_port(host)),
            "VLLM_CPU_KVCACHE_SPACE": str(settings.engine.cpu_kv_cache_space_gib),
            DELAY_ENV: str(settings.kv_connector.nixl_progress_delay_us),
        }
        bind = pool.bind_for(ctx.rank.local_rank if ctx.rank else 0)
        if bind is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = bind
        spec = EngineSpec(
            model=resolve_model(settings.model.source), served_model_name=settings.model.served_model_name,
            role=role, engine=settings.engine, kv_connector=settings.kv_connector,
            engine_id=f"{self.replica}-{uuid.uuid4().hex[:8]}", num_gpus=pool.num_gpus, env=env,
            kv_lease_s=settings.routing.kv_lease_s, kv_pull_timeout_s=settings.routing.kv_pull_timeout_s,
        )
        self.num_outstanding_prompt_tokens = 0
        logger.info("starting %s engine %s (pid %d, env %s)", role, spec.engine_id, os.getpid(), env)
        self.engine = VLLMEngine(spec)
        await self.engine.start()
        logger.info("%s engine %s ready", role, spec.engine_id)

    def record_routing_stats(self) -> dict:
        """Polled by Serve in the background and shipped to the routers (deployments/routing/router.py)."""
        metrics().engine_info.set(1, tags={"model": self.engine.spec.served_model_name, "ReplicaId": self.replica,
                                           "role": self.role})
        return self.engine.load() | {"num_outstanding_prompt_tokens": self.num_outstanding_prompt_tokens}

    async def check_health(self) -> None:
        await self.engine.check_health()

    async def stats(self, route=None) -> EngineStats:
        """This engine's counters; ``route=RouteRequest(target=<replica id>)`` asks one replica in particular."""
        return self.engine.stats(self.replica)

    async def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            await engine.shutdown()
