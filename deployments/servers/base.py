"""A Serve replica that owns one vLLM engine: placement, per-replica NIXL identity, health and stats."""

from __future__ import annotations

import importlib
import logging
import os
import socket
import uuid

import ray
from ray import serve

from ..credentials import is_loopback
from ..engine.nixl_plugin import DELAY_ENV
from ..engine.vllm_engine import EngineSpec, VLLMEngine
from ..metrics import metrics
from ..models import resolve_model
from ..replies import EngineStats
from ..roles import ROLES, Role
from ..settings import ENGINE_PRIVACY_ENV, PDServeSettings, PoolSettings

logger = logging.getLogger("ray.serve.pdserve.server")  # under Serve's logger: lands in the replica log


# Tests only: "module:Class" of a stand-in for VLLMEngine (tests/fake_engine.py), read from the node's environment.
ENGINE_CLASS_ENV = "PDSERVE_ENGINE_CLASS"
NUM_SPARE_PORTS = 32  # base+32 .. base+63: for a replica whose rank's port is still held


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def side_channel_port(host: str, base: int, local_rank: int) -> int:
    """The replica's NIXL side channel port: base + its local rank on the node, from a fixed range."""
    for port in [base + local_rank, *range(base + NUM_SPARE_PORTS, base + 2 * NUM_SPARE_PORTS)]:
        if _port_free(host, port):
            return port
    raise RuntimeError(f"no free NIXL side channel port on {host} in {base}..{base + 2 * NUM_SPARE_PORTS - 1}")


def engine_class() -> type:
    path = os.environ.get(ENGINE_CLASS_ENV)
    if not path:
        return VLLMEngine
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def pool_of(settings: PDServeSettings, role: Role) -> PoolSettings:
    return {"prefill": settings.prefill, "decode": settings.decode, "colocated": settings.colocated,
            "elastic": settings.elastic}[role]


class EngineServer:
    """Base of the prefill and decode deployments. Each replica gets a unique engine id and NIXL side
    channel (on the node's Ray address, so that peers on other nodes reach it, with a port from the pool's fixed
    range) and binds its engine to the cores its pool names for the replica's local rank."""

    role: Role

    async def __init__(self, settings: PDServeSettings, role: Role):
        self.role = role
        ctx = serve.get_replica_context()
        self.replica = ctx.replica_id.unique_id  # the id Serve's router knows this replica by
        pool = pool_of(settings, role)
        self.node = ray.util.get_node_ip_address()
        local_rank = ctx.rank.local_rank if ctx.rank else 0
        env = {
            "VLLM_CPU_KVCACHE_SPACE": str(settings.engine.cpu_kv_cache_space_gib),
            DELAY_ENV: str(settings.kv_connector.nixl_progress_delay_us),
        } | pool.env | ENGINE_PRIVACY_ENV
        # The side channel listens on the node's address (peers on other nodes connect to it) and a port from
        # the pool's range; an operator's own VLLM_NIXL_SIDE_CHANNEL_HOST/PORT (node or pool env) win.
        env.setdefault("VLLM_NIXL_SIDE_CHANNEL_HOST", os.environ.get("VLLM_NIXL_SIDE_CHANNEL_HOST", self.node))
        if "VLLM_NIXL_SIDE_CHANNEL_PORT" not in env and "VLLM_NIXL_SIDE_CHANNEL_PORT" not in os.environ:
            base = pool.nixl_side_channel_port_base or ROLES[role].port_base
            env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(side_channel_port(env["VLLM_NIXL_SIDE_CHANNEL_HOST"], base,
                                                                       local_rank))
        if is_loopback(self.node) and "UCX_NET_DEVICES" not in env and "UCX_NET_DEVICES" not in os.environ:
            env["UCX_NET_DEVICES"] = "lo"  # one node on loopback: UCX listens there only, not on the LAN address
        bind = pool.bind_for(local_rank)
        if bind is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = bind
        spec = EngineSpec(
            model=resolve_model(settings.model.source), served_model_name=settings.model.served_model_name,
            role=role, engine=pool.engine_for(settings.engine), kv_connector=settings.kv_connector,
            engine_id=f"{self.replica}-{uuid.uuid4().hex[:8]}", num_gpus=pool.num_gpus, env=env,
            kv_lease_s=settings.routing.kv_lease_s, kv_pull_timeout_s=settings.routing.kv_pull_timeout_s,
            pull_deadline=settings.routing.pull_deadline(),
            structured_output_compile_timeout_s=settings.limits.structured_output_compile_timeout_s,
        )
        self.num_outstanding_prompt_tokens = 0
        logger.info("starting %s engine %s (pid %d, env %s)", role, spec.engine_id, os.getpid(), env)
        self.engine = engine_class()(spec)
        await self.engine.start()
        logger.info("%s engine %s ready", role, spec.engine_id)

    def record_routing_stats(self) -> dict:
        """Polled by Serve in the background and shipped to the routers (deployments/routing/router.py)."""
        metrics().engine_info.set(1, tags={"model": self.engine.spec.served_model_name, "ReplicaId": self.replica,
                                           "role": self.role})
        return self.record_autoscaling_stats()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The pool's own load signal, pushed by Serve to its autoscaling policy (routing/autoscaling.py)."""
        return self.engine.load() | {"num_outstanding_prompt_tokens": self.num_outstanding_prompt_tokens}

    async def check_health(self) -> None:
        await self.engine.check_health()

    async def stats(self, route=None) -> EngineStats:
        """This engine's counters; ``route=RouteRequest(target=<replica id>)`` asks one replica in particular."""
        return self.engine.stats(self.replica, self.node)

    async def __del__(self):
        """Serve calls this once the replica has drained (no request in flight): stop the engine."""
        engine = getattr(self, "engine", None)
        if engine is not None:
            await self.before_engine_shutdown()
            await engine.shutdown()

    async def before_engine_shutdown(self) -> None:
        pass
