"""Fakes for fast tests of the request path: a fake pool of replicas that answer, raise, stall or push back on
script, behind the same handle calls the ingress makes on Serve (``handle.prefill.remote``,
``handle.options(stream=True).generate.remote``). No Ray cluster, no engine: retry, fallback, breaker, deadline
and lease rules run in milliseconds. The real-cluster tests (``test_e2e_*``) check the same rules on real parts.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable

from ray.exceptions import RayError
from ray.serve.exceptions import BackPressureError

from deployments.api.orchestrator import Orchestrator, PoolSource
from deployments.outcomes import Failure
from deployments.replies import ErrorReply, HandoffFailed, JsonReply, PrefillReply, PullRecomputed, ReplicaTag
from deployments.roles import deployments_of
from deployments.routing import ReplicaLoad
from deployments.settings import PDServeSettings

# What a fake replica does with a call, by name: see FakePool.script.
FAKE_PREFILL_NODE, FAKE_DECODE_NODE = "10.9.0.1", "10.9.0.2"  # Ray node addresses the fake replicas report
FAKE_KV_FINGERPRINT = "fp-model-a"  # the decode replicas' KV layout; a prefill replica may report another
OK, DIE, STALL, BACKPRESSURE, ERROR_5XX, ERROR_4XX, KV_TIMEOUT, STALL_MID_STREAM, KV_RECOMPUTED = (
    "ok", "die", "stall", "backpressure", "error_5xx", "error_4xx", "kv_timeout", "stall_mid_stream", "kv_recomputed")
FROZEN = "frozen"  # decode: silent from the start (not even its tag), as a SIGSTOPped replica
QUEUED = "queued"  # decode: silent for SLOW_FIRST_S before its tag, as a call waiting in Serve's queue
SLOW_FIRST = "slow_first"  # decode: its first token after SLOW_FIRST_S (a long local prefill, a queue)
SLOW_FIRST_S = 0.4
PROMPT_TOO_LONG = "prompt_too_long"  # prefill: vLLM refuses the prompt itself (longer than the model takes)


class FakePool:
    """Replicas by id, each with a script: a list of behaviours consumed one per call (the last one repeats)."""

    def __init__(self, replicas: list[str], loads: dict[str, ReplicaLoad] | None = None):
        self.replicas = list(replicas)
        self.loads = loads or {}
        self.script: dict[str, list[str]] = {r: [OK] for r in replicas}
        self.calls: list[tuple[str, object]] = []  # (replica, the PhaseRequest it got)
        self.probe_answers: dict[str, int | None] = {}  # replica -> requests held; None: silent (frozen)
        self.probes: list[str] = []
        self.cancelled = 0
        self.cancelled_at_probe: list[int] = []  # how many calls had been cancelled when each probe was sent

    def behaviour(self, replica: str) -> str:
        steps = self.script[replica]
        return steps.pop(0) if len(steps) > 1 else steps[0]

    def view(self) -> dict[str, ReplicaLoad]:
        return {r: self.loads.get(r, ReplicaLoad()) for r in self.replicas}

    async def probe(self, replica: str, timeout_s: float) -> int | None:
        self.probes.append(replica)
        self.cancelled_at_probe.append(self.cancelled)
        answer = self.probe_answers.get(replica)
        if answer is None:
            await asyncio.sleep(timeout_s)
        return answer

    def target(self, route) -> str:
        return route.target if route and route.target else self.replicas[0]


class _Response:
    """A fake unary Serve response: awaitable, cancellable."""

    def __init__(self, pool: FakePool, coro):
        self._pool, self._coro = pool, coro

    def __await__(self):
        return self._coro.__await__()

    def cancel(self):
        self._pool.cancelled += 1


class FakePrefillHandle:
    def __init__(self, pool: FakePool, num_prompt_tokens: int = 500, kv_lease_s: float = 30,
                 kv_fingerprint: str = FAKE_KV_FINGERPRINT):
        self.pool, self.num_prompt_tokens, self.kv_lease_s = pool, num_prompt_tokens, kv_lease_s
        self.kv_fingerprint = kv_fingerprint
        self.prefill = self

    def remote(self, req, route=None):
        replica = self.pool.target(route)
        self.pool.calls.append((replica, req))
        return _Response(self.pool, self._run(replica, self.pool.behaviour(replica)))

    async def _run(self, replica: str, behaviour: str):
        started = time.time()
        if behaviour == STALL:
            await asyncio.sleep(3600)
        if behaviour == DIE:
            raise RayError(f"The actor died unexpectedly: replica {replica} at 10.1.2.3")
        if behaviour == BACKPRESSURE:
            raise BackPressureError(num_queued_requests=4, max_queued_requests=4)
        if behaviour == ERROR_5XX:
            return ErrorReply(500, "EngineCore encountered an issue (actor 4f2a at 10.1.2.3)", "InternalServerError")
        if behaviour == ERROR_4XX:
            return ErrorReply(400, "min_tokens must be less than or equal to max_tokens=1")
        if behaviour == PROMPT_TOO_LONG:
            return ErrorReply(400, "This model's maximum context length is 2048 tokens. However, your prompt contains "
                                   "9000 input tokens", param="input_tokens")
        finished = time.time()
        return PrefillReply(
            kv_transfer_params={"do_remote_prefill": True, "do_remote_decode": False,
                                "remote_engine_id": f"e-{replica}",
                                "remote_request_id": "r1", "remote_block_ids": [1, 2], "remote_host": "127.0.0.1",
                                "remote_port": 5600},
            num_prompt_tokens=self.num_prompt_tokens, prefill_replica=replica, prefill_node=FAKE_PREFILL_NODE,
            started_at=started,
            finished_at=finished, kv_bytes=1024, kv_expires_at=finished + self.kv_lease_s,
            kv_fingerprint=self.kv_fingerprint)


class _Stream:
    """A fake streaming Serve response: an async iterator, cancellable."""

    def __init__(self, pool: FakePool, agen):
        self._pool, self._agen = pool, agen

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self._agen.__anext__()

    def cancel(self):
        self._pool.cancelled += 1


class FakeDecodeHandle:
    def __init__(self, pool: FakePool, chunks: int = 3):
        self.pool, self.chunks = pool, chunks
        self.generate = self

    def options(self, **kwargs):
        return self

    def remote(self, req, route=None):
        replica = self.pool.target(route)
        self.pool.calls.append((replica, req))
        return _Stream(self.pool, self._run(replica, self.pool.behaviour(replica), req))

    async def _run(self, replica: str, behaviour: str, req):
        if behaviour == BACKPRESSURE:
            raise BackPressureError(num_queued_requests=4, max_queued_requests=4)
        if behaviour == DIE:
            raise RayError(f"ActorDiedError: replica {replica} at 10.1.2.3")
        if behaviour == FROZEN:
            await asyncio.sleep(3600)
        if behaviour == QUEUED:
            await asyncio.sleep(SLOW_FIRST_S)
        yield ReplicaTag(replica, time.time(), FAKE_DECODE_NODE)
        if behaviour == STALL:
            await asyncio.sleep(3600)
        if behaviour == SLOW_FIRST:
            await asyncio.sleep(SLOW_FIRST_S)
        if behaviour == ERROR_5XX:
            yield ErrorReply(500, "EngineCore encountered an issue", "InternalServerError")
            return
        if behaviour == ERROR_4XX:
            yield ErrorReply(400, "This model's maximum context length is 2048 tokens")
            return
        if behaviour == KV_TIMEOUT and req.kv_transfer_params is not None:
            yield HandoffFailed(Failure.KV_PULL_TIMEOUT)
            return
        if behaviour == KV_RECOMPUTED and req.kv_transfer_params is not None:  # vLLM's recompute policy
            yield PullRecomputed(num_prompt_tokens=500, num_cached_tokens=0)
        if req.handoff is not None and time.time() >= req.handoff.expires_at:
            yield HandoffFailed(Failure.KV_LEASE_EXPIRED)
            return
        if req.handoff is not None and not req.handoff.compatible_with(FAKE_KV_FINGERPRINT):  # as DecodeServer
            yield HandoffFailed(Failure.KV_INCOMPATIBLE)
            return
        if not req.body.get("stream"):
            yield JsonReply({"choices": [{"text": "fake"}], "served_by": replica})
            return
        for i in range(self.chunks):
            yield f'data: {{"choices":[{{"text":"t{i}"}}]}}\n\n'
            if behaviour == STALL_MID_STREAM:
                await asyncio.sleep(3600)
        yield "data: [DONE]\n\n"


def fake_source(mode: str, prefill: FakePool | None, decode: FakePool) -> PoolSource:
    """The fake pools behind the deployment names of ``mode``, as the orchestrator sees pools over Serve."""
    by_name = dict(zip(deployments_of(mode), (prefill, decode), strict=True))
    return PoolSource(view=lambda name: by_name[name].view(),
                      probe=lambda name, replica, timeout_s: by_name[name].probe(replica, timeout_s))


def fake_ingress(prefill: FakePool | None, decode: FakePool, settings: dict | None = None,
                 prefill_handle: Callable[[FakePool], object] = FakePrefillHandle) -> Orchestrator:
    """The real request path (``Orchestrator``, as the ingress runs it) over fake pools."""
    args = {"mode": "disaggregated", "prefill": {}, "decode": {}} if prefill else {"mode": "colocated", "colocated": {}}
    settings = PDServeSettings.model_validate(_merge(args, settings or {}))
    return Orchestrator(settings, prefill_handle(prefill) if prefill else None, FakeDecodeHandle(decode),
                        fake_source(settings.mode, prefill, decode))


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def count(calls: list[tuple[str, object]]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for replica, _ in calls:
        out[replica] += 1
    return dict(out)


class FakeElasticHandle:
    """One fake pool whose replicas answer both phases, as an elastic deployment does."""

    def __init__(self, pool: FakePool, **kwargs):
        self.pool = pool
        self.prefill = FakePrefillHandle(pool, **kwargs)
        self._decode = FakeDecodeHandle(pool)
        self.generate = self._decode

    def options(self, **kwargs):
        return self


def fake_elastic_ingress(pool: FakePool, settings: dict | None = None) -> Orchestrator:
    """The real request path in elastic mode over one fake pool."""
    handle = FakeElasticHandle(pool)
    settings = PDServeSettings.model_validate(_merge({"mode": "elastic", "elastic": {}}, settings or {}))
    return Orchestrator(settings, handle, handle, fake_source("elastic", pool, pool))
