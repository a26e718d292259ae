"""Elastic mode on the shared cluster (the application at /elastic): two kv_both engines (one core each) that
prefill for each other or serve requests whole, as the ingress's policy chooses, over real HTTP and real NIXL, and
the colocated baseline (one engine, one core) at /colocated.

Outputs equal colocated token for token (float32, one thread per engine, greedy), whichever route a request
took; the policy's routes follow from the ingress's own bookings (with an ITL target no engine here comes near), so
they are deterministic while the other applications are idle. The last test kills an engine: it runs with the real
faults, after the other modules' tests (conftest's module order)."""

from __future__ import annotations

import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from .conftest import AUTH
from .prompts import SHORT, long_prompt, tagged
from .test_e2e_outputs import _body, _call

pytestmark = pytest.mark.cluster
APP = "elastic"
MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def api(cluster):
    with httpx.Client(base_url=f"{cluster.base}/elastic", timeout=300, headers=AUTH) as client:
        yield client


def _long_stream(api: httpx.Client, started: threading.Event, done: list) -> None:
    """A short prompt with a long answer: one stream on one engine for the length of the test's next request."""
    body = {"model": MODEL, "prompt": tagged(uuid.uuid4().hex, SHORT), "max_tokens": 200, "temperature": 0,
            "stream": True, "ignore_eos": True}
    with api.stream("POST", "/v1/completions", json=body) as resp:
        done.append(resp.headers.get("x-pdserve-decode-replica"))
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                started.set()
    done.append(resp.status_code)


def _routed(api: httpx.Client, endpoint: str, text: str, stream: bool) -> tuple[tuple, dict]:
    """(text, finish, usage) through the elastic app, and the route headers it answered with."""
    headers: dict = {}
    out = _call(api, "/v1", endpoint, _body(endpoint, text, stream, MODEL), headers)
    return out, headers


@pytest.mark.parametrize("endpoint,stream", [("chat", True)])
def test_elastic_routes_equal_colocated(cluster, api, endpoint, stream):
    """Idle pool: a long prompt is served whole by one engine. Three streams are then packed onto one engine; the
    next long prompt is prefilled on the other, quiet engine and decoded on the busy one, which pulls its KV over
    NIXL. Both answers equal the colocated engine's."""
    texts = [tagged(f"elastic-{endpoint}-{i}-{uuid.uuid4().hex[:6]}", long_prompt(40)) for i in range(2)]
    colo = [_call(api, cluster.colocated, endpoint, _body(endpoint, t, stream, MODEL)) for t in texts]

    whole, h = _routed(api, endpoint, texts[0], stream)
    assert (h["x-pdserve-route"], h["x-pdserve-route-reason"]) == ("local_prefill", "no_streams_to_stall"), h
    assert whole == colo[0]

    background = []
    for _ in range(3):  # one at a time: each is packed onto the engine that already runs streams
        started, done = threading.Event(), []
        thread = threading.Thread(target=_long_stream, args=(api, started, done))
        thread.start()
        background.append((thread, done))
        assert started.wait(120), "a background stream never started"
    try:
        (out, headers) = _routed(api, endpoint, texts[1], stream)
    finally:
        for thread, _ in background:
            thread.join(300)
    engines = [done[0] for _, done in background]
    busier = max(set(engines), key=engines.count)
    assert len(set(engines)) == 1, engines
    assert headers["x-pdserve-route"] == "disaggregated", {k: v for k, v in headers.items() if "pdserve" in k}
    assert headers["x-pdserve-route-reason"] == "itl_protected"
    assert headers["x-pdserve-decode-replica"] == busier, "the quieter engine prefills, the other decodes"
    assert headers["x-pdserve-prefill-replica"] != busier
    assert "x-pdserve-fallback" not in headers, headers
    assert all(done[-1] == 200 for _, done in background)
    assert out == colo[1]
    assert out[2]["prompt_tokens"] > 400 and out[2]["completion_tokens"] > 0


def test_elastic_short_prompt_is_served_whole(cluster, api):
    text = tagged(uuid.uuid4().hex, SHORT)
    out, h = _routed(api, "completions", text, False)
    assert (h["x-pdserve-route"], h["x-pdserve-route-reason"]) == ("local_prefill", "short_prompt")
    assert out == _call(api, cluster.colocated, "completions", _body("completions", text, False, MODEL))


def _routing_stats() -> dict[str, dict]:
    """Replica id -> what each elastic engine reports to the routers now (Serve's own call)."""
    import ray

    from loadtests.engines import serve_replicas

    return {r.replica: ray.get(ray.get_actor(r.actor_name, namespace="serve").record_routing_stats.remote(),
                               timeout=60) for r in serve_replicas(APP, "ElasticServer")}


def test_engines_report_the_inter_token_latency_their_streams_see(api):
    """The packing bound reads each engine's measured ITL from its load report: the engine streaming reports the
    gap between its tokens (tens of ms on one core), the idle one reports none."""
    started, done = threading.Event(), []
    streamer = threading.Thread(target=_long_stream, args=(api, started, done))
    streamer.start()
    try:
        assert started.wait(120)
        time.sleep(1.5)  # a whole report period of tokens
        stats = _routing_stats()
    finally:
        streamer.join()
    busy = done[0]
    assert 0.001 < stats[busy]["itl_s"] < 1.0, stats
    assert all(s["itl_s"] == 0.0 for replica, s in stats.items() if replica != busy), stats


def _engine_pids(cluster) -> dict[str, int]:
    """Replica id -> pid of the elastic engines."""
    return {r.id: r.pid for r in cluster.replicas("ElasticServer", APP)}


def test_killed_elastic_engine_loses_no_request(cluster, api):
    """A mixed burst while one of the two engines is killed: every request is answered (a dead prefill engine or
    a dead decode engine before the first token are retried on the other one, or prefilled locally there)."""
    import signal

    pids = _engine_pids(cluster)
    victim = sorted(pids)[0]
    prompts = [tagged(f"ekill-{i}-{uuid.uuid4().hex[:6]}", long_prompt(40) if i % 2 else SHORT) for i in range(10)]

    def one(prompt: str) -> httpx.Response:
        return api.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 16,
                                                 "temperature": 0})

    engine_procs = psutil.Process(pids[victim]).children(recursive=True)  # vLLM's EngineCore and Worker
    assert engine_procs, "the replica runs its engine in processes of its own"
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(one, p) for p in prompts]
        time.sleep(3)
        os.kill(pids[victim], signal.SIGKILL)
        resps = [f.result() for f in futures]
    # the dead replica's engine processes die with it (deployments/engine/lifetime.py), not orphaned with its memory
    _, alive = psutil.wait_procs(engine_procs, timeout=10)
    assert not alive, [p.pid for p in alive]
    assert [r.status_code for r in resps] == [200] * len(prompts), [r.text[:200] for r in resps if r.status_code != 200]
    survivors = {r.headers.get("x-pdserve-decode-replica") for r in resps if r.headers.get("x-pdserve-fallback")}
    assert victim not in survivors  # a request that failed over ended on the other engine
