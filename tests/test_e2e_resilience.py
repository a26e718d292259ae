"""Routing and failure handling on the real cluster, with failures injected for real.

Runs after the output tests (file order): some tests kill replicas, and Serve takes ~1 min to replace them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
import ray

from deployments.kv import decode_request, prefill_request
from deployments.outcomes import Failure
from deployments.replies import HandoffFailed
from deployments.settings import RoutingSettings

from .conftest import AUTH, E2E_ROUTING
from .prompts import SHORT, long_prompt, tagged

pytestmark = pytest.mark.cluster
ROUTING = RoutingSettings(**E2E_ROUTING)
LONG = long_prompt(30)  # ~400 tokens: above min_remote_prefill_tokens, quick to prefill on one core


def _complete(base: str, model: str, prompt: str, max_tokens: int = 12, timeout: float = 120) -> httpx.Response:
    return httpx.post(base + "/completions", timeout=timeout, headers=AUTH,
                      json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})


def _ingress_log() -> str:
    """The pd app's ingress replica log(s) of the running Ray session."""
    logs = sorted(Path("/tmp/ray/session_latest/logs/serve").glob("replica_pdserve_Ingress_*.log"))
    return "".join(log.read_text() for log in logs)


def _text(resp: httpx.Response) -> str:
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["text"]


def test_short_prompt_prefills_locally_long_one_moves_kv(cluster):
    decode_ids = [r.id for r in cluster.replicas("DecodeServer")]
    transfers = lambda: sum(cluster.stats("DecodeServer", replica=r).get("vllm:nixl_xfer_time_seconds_count")  # noqa: E731
                            for r in decode_ids)
    before = transfers()
    short_prompt = tagged(uuid.uuid4().hex, SHORT)
    short = _complete(cluster.pd, cluster.model, short_prompt)
    assert short.headers["x-pdserve-route"] == "local_prefill"
    assert short.headers["x-pdserve-route-reason"] == "short_prompt"
    assert "x-pdserve-prefill-replica" not in short.headers
    time.sleep(1.5)
    assert transfers() == before  # no KV transfer for the short prompt
    prompt = tagged(uuid.uuid4().hex, LONG)
    long = _complete(cluster.pd, cluster.model, prompt)
    assert long.headers["x-pdserve-route"] == "disaggregated"
    assert long.headers["x-pdserve-prefill-replica"] and long.headers["x-pdserve-decode-replica"]
    deadline = time.monotonic() + 10
    while transfers() != before + 1:
        assert time.monotonic() < deadline, "the long prompt's KV transfer was not counted"
        time.sleep(0.3)
    assert _text(long) == _text(_complete(cluster.colocated, cluster.model, prompt))
    assert _text(short) == _text(_complete(cluster.colocated, cluster.model, short_prompt))
    # each request's route, reason and timing breakdown is one line of the ingress replica's log
    lines = {json.loads(m)["request_id"]: json.loads(m) for m in re.findall(r"request (\{.*\})", _ingress_log())}
    for resp, route in ((short, "local_prefill"), (long, "disaggregated")):
        line = lines[resp.headers["x-pdserve-request-id"]]
        assert line["route"] == route and line["status"] == 200 and line["e2e_s"] > 0, line


def test_prefix_affinity_keeps_a_shared_prefix_on_one_prefill_replica(cluster):
    prefix = tagged(uuid.uuid4().hex, LONG)
    chosen, before = set(), {r.id: cluster.stats("PrefillServer", replica=r.id).get("vllm:prefix_cache_hits_total")
                             for r in cluster.replicas("PrefillServer")}
    for i in range(4):
        resp = _complete(cluster.pd, cluster.model, prefix + f"\nQuestion {i}: which fact mentions granite?")
        assert resp.status_code == 200 and resp.headers["x-pdserve-route"] == "disaggregated", resp.text
        chosen.add(resp.headers["x-pdserve-prefill-replica"])
    assert len(chosen) == 1, chosen
    [replica] = chosen
    hits = cluster.stats("PrefillServer", replica=replica).get("vllm:prefix_cache_hits_total") - before[replica]
    assert hits >= 3 * 300, f"prefix cache hits on {replica}: {hits}"  # requests 2-4 reuse the ~400-token prefix


@pytest.mark.parametrize("entry", ["pd", "direct_pd"], ids=["via-proxy", "direct-ingress"])
def test_client_disconnect_mid_stream_frees_both_engines(cluster, entry):
    body = {"model": cluster.model, "prompt": tagged(uuid.uuid4().hex, LONG), "max_tokens": 1500,
            "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60, headers=AUTH) as client, \
            client.stream("POST", getattr(cluster, entry) + "/completions", json=body) as resp:
        assert resp.status_code == 200 and resp.headers["x-pdserve-route"] == "disaggregated"
        engines = [("DecodeServer", resp.headers["x-pdserve-decode-replica"]),
                   ("PrefillServer", resp.headers["x-pdserve-prefill-replica"])]
        for i, _ in enumerate(resp.iter_lines()):
            if i > 10:
                break  # leave with tokens still coming
    for deployment, replica in engines:
        deadline = time.monotonic() + 10
        while True:
            stats = cluster.stats(deployment, replica=replica)
            if (stats.get("vllm:num_requests_running") == 0 and stats.get("vllm:num_requests_waiting") == 0
                    and stats.get("vllm:kv_cache_usage_perc") < 0.05):
                break
            assert time.monotonic() < deadline, f"{deployment} still holds the abandoned request: {stats.values}"
            time.sleep(0.5)


def _burst(cluster, prompts, during=None) -> tuple[list[httpx.Response], list[float]]:
    def one(p):
        t0 = time.monotonic()
        r = _complete(cluster.pd, cluster.model, p, max_tokens=8, timeout=180)
        return r, time.monotonic() - t0

    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(one, p) for p in prompts]
        if during:
            during()
        results = [f.result() for f in futures]
    return [r for r, _ in results], [t for _, t in results]


def test_killed_prefill_replica_loses_no_request(cluster):
    prompts = [tagged(f"kill-{i}-{uuid.uuid4().hex[:6]}", LONG) for i in range(24)]
    expected = [_text(_complete(cluster.colocated, cluster.model, p, max_tokens=8)) for p in prompts[:4]]
    base_resps, base_times = _burst(cluster, [tagged(f"warm-{i}-{uuid.uuid4().hex[:6]}", LONG) for i in range(24)])
    assert all(r.status_code == 200 for r in base_resps), [r.text for r in base_resps if r.status_code != 200]
    time.sleep(11)  # a breaker the warm-up burst opened (prefill queued past its deadline) closes first
    victim = cluster.replicas("PrefillServer")[0]

    def kill():
        time.sleep(1.0)
        ray.kill(ray.get_actor(victim.actor_name, namespace="serve"), no_restart=False)

    resps, times = _burst(cluster, prompts, during=kill)
    failed = [r.text for r in resps if r.status_code != 200]
    assert not failed, failed
    assert [_text(r) for r in resps[:4]] == expected
    print(f"burst of 24 with a prefill replica killed: max {max(times):.1f} s, mean {sum(times) / 24:.1f} s; "
          f"without: max {max(base_times):.1f} s, mean {sum(base_times) / 24:.1f} s; "
          f"fallbacks: {[r.headers.get('x-pdserve-fallback') for r in resps if r.headers.get('x-pdserve-fallback')]}")
    cluster.wait_for_replicas("PrefillServer", 2)


def _process_group(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _signal(procs: list[psutil.Process], sig: int) -> None:
    """Each process that still lives (Serve force-stops a replica frozen past its health check timeout)."""
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)


def test_frozen_prefill_replica_hangs_no_request(cluster):
    """SIGSTOP a prefill replica and its engine (a hung node): requests finish via retry or local prefill."""
    victim = cluster.replicas("PrefillServer")[0]
    procs = _process_group(victim.pid)
    for p in procs:
        p.send_signal(signal.SIGSTOP)
    try:
        prompts = [tagged(f"freeze-{i}-{uuid.uuid4().hex[:6]}", LONG) for i in range(6)]
        resps, times = _burst(cluster, prompts)
        assert all(r.status_code == 200 for r in resps), [r.text for r in resps]
        assert max(times) < 30 + 8 + 60, times  # prefill deadline + pull deadline + the work itself
        print(f"frozen prefill replica: max {max(times):.1f} s, fallbacks "
              f"{[r.headers.get('x-pdserve-fallback') for r in resps]}")
    finally:
        for p in procs:
            p.send_signal(signal.SIGCONT)


def test_frozen_prefill_pool_costs_one_deadline_then_local_prefill(cluster):
    """Every prefill replica frozen (as the default single prefill replica can be): a long prompt waits at most
    its prefill deadline per replica (derived from its size and the measured speed: seconds, not the 60 s cap),
    the probe gets no answer, and the decode replica prefills it. No replica is waited on twice for one request."""
    procs = [p for r in cluster.replicas("PrefillServer") for p in _process_group(r.pid)]
    _signal(procs, signal.SIGSTOP)
    try:
        for i in range(4):
            t0 = time.monotonic()
            resp = _complete(cluster.pd, cluster.model, tagged(f"frozen-pool-{i}-{uuid.uuid4().hex[:6]}", LONG),
                             max_tokens=4)
            took_s = time.monotonic() - t0
            assert resp.status_code == 200, resp.text
            assert resp.headers["x-pdserve-route"] == "local_prefill"
            waits = [(m.group(1), float(m.group(2))) for m in re.finditer(
                re.escape(resp.headers["x-pdserve-request-id"]) + r": prefill on (\S+) past its ([\d.]+) s deadline",
                _ingress_log())]
            replicas = [r for r, _ in waits]
            assert len(replicas) == len(set(replicas)) <= 2, waits  # never the same replica twice
            assert all(deadline < 20 for _, deadline in waits), waits  # derived from the prompt, not the cap
            assert took_s < sum(deadline + 1.5 for _, deadline in waits) + 15, (took_s, waits)
            print(f"frozen prefill pool, request {i}: {took_s:.1f} s, waits {waits}, "
                  f"{resp.headers['x-pdserve-route-reason']}")
    finally:
        _signal(procs, signal.SIGCONT)
    cluster.wait_for_replicas("PrefillServer", 2)


@pytest.fixture
def silent_side_channel():
    """A port that accepts TCP connections and never answers: a frozen prefill engine's NIXL side channel."""
    server = socket.socket()
    server.bind((ray.util.get_node_ip_address(), 0))
    server.listen(16)
    yield server.getsockname()
    server.close()


@pytest.mark.parametrize("channel", ["unreachable", "silent"])
def test_failed_kv_pull_is_bounded_and_falls_back(cluster, silent_side_channel, channel):
    """A decode engine handed KV params it cannot pull: recomputed (unreachable) or aborted at the deadline
    (silent); either way the request ends in bounded time and the engine is left idle."""
    from ray import serve

    host, port = silent_side_channel
    if channel == "unreachable":
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]  # closed again: nothing listens there
    params = {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [[1, 2, 3]],
              "remote_engine_id": f"ghost-{uuid.uuid4().hex[:6]}", "remote_request_id": "ghost",
              "remote_host": host, "remote_port": port, "tp_size": 1, "remote_num_tokens": 40}
    body = {"model": cluster.model, "prompt": tagged(uuid.uuid4().hex, SHORT), "max_tokens": 4, "temperature": 0}
    handle = serve.get_deployment_handle("DecodeServer", "pdserve").options(stream=True)
    t0 = time.monotonic()
    fingerprint = cluster.stats("DecodeServer").kv_fingerprint  # a hand-off from an engine like the decode ones
    items = list(handle.generate.remote(decode_request("completions", body, params, time.time() + 30, fingerprint)))
    elapsed = time.monotonic() - t0
    reply = items[1]
    assert elapsed < 8 + 10, elapsed
    if isinstance(reply, HandoffFailed):
        assert reply.failure is Failure.KV_PULL_TIMEOUT
    else:
        assert reply.body["choices"][0]["text"] == _text(_complete(cluster.colocated, cluster.model, body["prompt"], 4))
    print(f"{channel} side channel: {type(reply).__name__} after {elapsed:.1f} s")


def test_killed_decode_replica_before_first_token_is_retried(cluster):
    victim = cluster.replicas("DecodeServer")[0]
    os.kill(victim.pid, signal.SIGKILL)
    prompts = [tagged(f"dkill-{i}-{uuid.uuid4().hex[:6]}", SHORT) for i in range(6)]
    resps, _ = _burst(cluster, prompts)
    assert all(r.status_code == 200 for r in resps), [r.text for r in resps]
    assert all(r.headers["x-pdserve-decode-replica"] != victim.id for r in resps)
    cluster.wait_for_replicas("DecodeServer", 2)


def test_killed_decode_replica_mid_stream_ends_the_stream_cleanly(cluster):
    body = {"model": cluster.model, "prompt": tagged(uuid.uuid4().hex, SHORT), "max_tokens": 1500,
            "temperature": 0, "stream": True, "ignore_eos": True}
    lines: list[str] = []
    with httpx.Client(timeout=60, headers=AUTH) as client, \
            client.stream("POST", cluster.pd + "/completions", json=body) as resp:
        victim = next(r for r in cluster.replicas("DecodeServer") if r.id == resp.headers["x-pdserve-decode-replica"])
        killer = threading.Timer(2.0, os.kill, (victim.pid, signal.SIGKILL))
        t0 = time.monotonic()
        killer.start()
        lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
        closed_after = time.monotonic() - t0
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][len("data: "):])
    assert error["error"]["code"] == 503 and "interrupted" in error["error"]["message"]
    assert not re.search(r"Actor|Error\b|\d+\.\d+\.\d+\.\d+", error["error"]["message"]), error  # no internals
    assert len(lines) > 3 and closed_after < 30
    cluster.wait_for_replicas("DecodeServer", 2)


def _unanswered_queue_probes(replica: str) -> int:
    """Serve's router asked ``replica`` for its queue length before sending it a call and got no answer in time
    (it then sends the call elsewhere): its warnings in the ingress log."""
    return _ingress_log().count(f"Failed to get queue length from Replica(id='{replica}'")


def test_frozen_decode_replica_before_first_token_hangs_no_request(cluster):
    """SIGSTOP a decode replica and its engine (a hung node): a request routed there is not held until its
    end-to-end deadline. Either Serve's router finds it silent first (it asks a replica for its queue length when
    its last answer is old, and sends the call elsewhere), or the call reaches it and its silent stream gets the
    replica probed: no answer, so the request is retried on the other replica within one probe interval and one
    probe timeout."""
    probe_s = ROUTING.decode_probe_interval_s + ROUTING.replica_probe_timeout_s
    victim = cluster.replicas("DecodeServer")[0]
    procs = _process_group(victim.pid)
    queue_probes_before = _unanswered_queue_probes(victim.id)
    _signal(procs, signal.SIGSTOP)
    try:
        prompts = [tagged(f"dfreeze-{i}-{uuid.uuid4().hex[:6]}", SHORT if i % 2 else LONG) for i in range(6)]
        resps, times = _burst(cluster, prompts)
        assert all(r.status_code == 200 for r in resps), [r.text for r in resps]
        served_by = [(r.headers["x-pdserve-decode-replica"], r.headers.get("x-pdserve-fallback")) for r in resps]
        assert all(replica != victim.id for replica, _ in served_by), (victim, served_by)
        retried = [r for r in resps if "decode_replica_unresponsive" in r.headers.get("x-pdserve-fallback", "")]
        queue_probes = _unanswered_queue_probes(victim.id) - queue_probes_before
        assert retried or queue_probes, f"nothing was routed to the frozen replica {victim.id}: {served_by}"
        assert max(times) < 2 * probe_s + 30, times  # at most two probes (breaker threshold), then the work itself
        print(f"frozen decode replica: {len(retried)} of 6 retried after a probe, {queue_probes} queue-length "
              f"probes of Serve's router unanswered, max {max(times):.1f} s")
    finally:
        _signal(procs, signal.SIGCONT)
    cluster.wait_for_replicas("DecodeServer", 2)


def test_decode_replica_frozen_mid_stream_ends_the_stream_cleanly(cluster):
    """SIGSTOP the decode replica of a running stream: the stream ends with an error event and [DONE] within one
    probe interval and one probe timeout, not at the request's end-to-end deadline."""
    probe_s = ROUTING.decode_probe_interval_s + ROUTING.replica_probe_timeout_s
    time.sleep(ROUTING.breaker_cooldown_s)  # the previous test's frozen replica is back in rotation
    body = {"model": cluster.model, "prompt": tagged(uuid.uuid4().hex, SHORT), "max_tokens": 1500,
            "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60, headers=AUTH) as client, \
            client.stream("POST", cluster.pd + "/completions", json=body) as resp:
        victim = next(r for r in cluster.replicas("DecodeServer") if r.id == resp.headers["x-pdserve-decode-replica"])
        procs = _process_group(victim.pid)
        freezer = threading.Timer(2.0, _signal, (procs, signal.SIGSTOP))
        t0 = time.monotonic()
        freezer.start()
        try:
            lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
            closed_after = time.monotonic() - t0
        finally:
            freezer.join()
            _signal(procs, signal.SIGCONT)
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][len("data: "):])
    assert error["error"]["code"] == 503 and "interrupted" in error["error"]["message"]
    assert len(lines) > 3 and closed_after < 2.0 + probe_s + 5, closed_after
    print(f"decode replica frozen mid-stream: stream closed {closed_after - 2.0:.1f} s after the freeze")
    cluster.wait_for_replicas("DecodeServer", 2)


def _routing_retry_counts() -> list[int]:
    """Serve's "Failed to route request after N attempts" warnings in the ingress replica's log: N each."""
    return [int(m) for m in re.findall(r"Failed to route request after (\d+) attempts", _ingress_log())]


@pytest.mark.parametrize("entry", ["pd", "direct_pd"], ids=["via-proxy", "direct-ingress"])
def test_overload_answers_429_and_recovers(cluster, entry):
    body = lambda i: {"model": cluster.model, "prompt": tagged(f"load-{i}", SHORT), "max_tokens": 48,  # noqa: E731
                      "temperature": 0, "ignore_eos": True}
    num_retry_warnings = len(_routing_retry_counts())
    with ThreadPoolExecutor(64) as pool:
        t0 = time.monotonic()
        resps = list(pool.map(lambda i: httpx.post(getattr(cluster, entry) + "/completions", json=body(i),
                                                   timeout=300, headers=AUTH), range(64)))
    statuses = [r.status_code for r in resps]
    rejected = [r for r in resps if r.status_code == 429]
    assert rejected and set(statuses) <= {200, 429}, statuses
    assert all(r.headers.get("retry-after") and r.json()["error"]["code"] == 429 for r in rejected)
    burst_s = time.monotonic() - t0
    print(f"overload: {len(rejected)} of 64 rejected with 429, burst done in {burst_s:.1f} s")
    # Queued requests wait with backoff (at most 0.5 s between tries), not in a loop that spins the ingress's
    # core: a spinning router logs hundreds of attempts per second.
    retries = _routing_retry_counts()[num_retry_warnings:]
    assert max(retries, default=0) <= 4 * burst_s + 50, f"routing retried {max(retries)} times in {burst_s:.0f} s"
    assert _complete(cluster.pd, cluster.model, SHORT).status_code == 200


def test_kv_pull_from_a_frozen_prefill_engine_hits_the_deadline(cluster):
    """Prefill answers, then freezes before decode pulls (a hung node): vLLM would wait forever; the decode
    replica aborts the pull at kv_pull_timeout_s and reports the hand-off failed (the ingress then prefills
    locally), and its engine is left idle."""
    from ray import serve

    from deployments.routing import RouteRequest

    prefill_replica, decode_replica = cluster.replicas("PrefillServer")[0], cluster.replicas("DecodeServer")[0]
    prefill = serve.get_deployment_handle("PrefillServer", "pdserve")
    decode = serve.get_deployment_handle("DecodeServer", "pdserve").options(stream=True)
    to_p, to_d = RouteRequest(target=prefill_replica.id), RouteRequest(target=decode_replica.id)

    def body():
        return {"model": cluster.model, "prompt": tagged(uuid.uuid4().hex, LONG), "max_tokens": 4, "temperature": 0}

    def pd(handoff_body=None):
        b = handoff_body or body()
        handoff = prefill.prefill.remote(prefill_request("completions", b), route=to_p).result()
        return b, decode_request("completions", b, handoff.kv_transfer_params, handoff.kv_expires_at,
                                  handoff.kv_fingerprint)

    _, warm = pd()  # decode handshakes with prefill
    assert type(list(decode.generate.remote(warm, route=to_d))[1]).__name__ == "JsonReply"
    _, frozen = pd()
    procs = _process_group(prefill_replica.pid)
    for p in procs:
        p.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        items = list(decode.generate.remote(frozen, route=to_d))
        elapsed = time.monotonic() - t0
    finally:
        for p in procs:
            p.send_signal(signal.SIGCONT)
    reply = items[1]
    print(f"frozen prefill engine: {type(reply).__name__} after {elapsed:.1f} s")
    assert isinstance(reply, HandoffFailed) and reply.failure is Failure.KV_PULL_TIMEOUT, reply
    assert elapsed < 8 + 5
    stats = cluster.stats("DecodeServer", replica=decode_replica.id)
    assert stats.get("vllm:num_requests_running") == 0 and stats.get("vllm:num_requests_waiting") == 0
