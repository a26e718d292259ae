"""Routing and failure handling on the real cluster, where it needs real engines: KV moved or not, prefix caches,
engines freed after a disconnect, pulls that fail, and a prefill engine frozen under a pull (a real fault).

The ingress's fault handling (kills and freezes of either phase, overload, disconnects) runs over fake engines on
real Serve in test_serve_faults.py, in seconds.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import time
import uuid

import httpx
import pytest
import ray

from deployments.kv import Handoff, decode_request, prefill_request
from deployments.outcomes import Failure
from deployments.replies import HandoffFailed

from .conftest import AUTH
from .faults import complete, ingress_log, process_group, text
from .prompts import SHORT, long_prompt, tagged

pytestmark = pytest.mark.cluster
LONG = long_prompt(30)  # ~400 tokens: above min_remote_prefill_tokens, quick to prefill on one core


def test_short_prompt_prefills_locally_long_one_moves_kv(cluster):
    decode_ids = [r.id for r in cluster.replicas("DecodeServer")]
    transfers = lambda: sum(cluster.stats("DecodeServer", replica=r).get("vllm:nixl_xfer_time_seconds_count")  # noqa: E731
                            for r in decode_ids)
    before = transfers()
    short_prompt = tagged(uuid.uuid4().hex, SHORT)
    short = complete(cluster.pd, cluster.model, short_prompt)
    assert short.headers["x-pdserve-route"] == "local_prefill"
    assert short.headers["x-pdserve-route-reason"] == "short_prompt"
    assert "x-pdserve-prefill-replica" not in short.headers
    time.sleep(1.5)
    assert transfers() == before  # no KV transfer for the short prompt
    prompt = tagged(uuid.uuid4().hex, LONG)
    long = complete(cluster.pd, cluster.model, prompt)
    assert long.headers["x-pdserve-route"] == "disaggregated"
    assert long.headers["x-pdserve-prefill-replica"] and long.headers["x-pdserve-decode-replica"]
    deadline = time.monotonic() + 10
    while transfers() != before + 1:
        assert time.monotonic() < deadline, "the long prompt's KV transfer was not counted"
        time.sleep(0.3)
    assert text(long) == text(complete(cluster.colocated, cluster.model, prompt))
    assert text(short) == text(complete(cluster.colocated, cluster.model, short_prompt))
    # each request's route, reason and timing breakdown is one line of the ingress replica's log
    lines = {json.loads(m)["request_id"]: json.loads(m) for m in re.findall(r"request (\{.*\})", ingress_log())}
    for resp, route in ((short, "local_prefill"), (long, "disaggregated")):
        line = lines[resp.headers["x-pdserve-request-id"]]
        assert line["route"] == route and line["status"] == 200 and line["e2e_s"] > 0, line


def test_prefix_cache_of_the_prefill_engine_serves_a_shared_prefix(cluster):
    """Requests sharing a long prefix reuse it from the prefill engine's cache (the affinity that keeps them on one
    prefill replica of several is tested on the Serve tier)."""
    prefix = tagged(uuid.uuid4().hex, LONG)
    chosen, before = set(), {r.id: cluster.stats("PrefillServer", replica=r.id).get("vllm:prefix_cache_hits_total")
                             for r in cluster.replicas("PrefillServer")}
    for i in range(4):
        resp = complete(cluster.pd, cluster.model, prefix + f"\nQuestion {i}: which fact mentions granite?")
        assert resp.status_code == 200 and resp.headers["x-pdserve-route"] == "disaggregated", resp.text
        chosen.add(resp.headers["x-pdserve-prefill-replica"])
    assert len(chosen) == 1, chosen
    [replica] = chosen
    hits = cluster.stats("PrefillServer", replica=replica).get("vllm:prefix_cache_hits_total") - before[replica]
    assert hits >= 3 * 300, f"prefix cache hits on {replica}: {hits}"  # requests 2-4 reuse the ~400-token prefix


def test_client_disconnect_mid_stream_frees_both_engines(cluster, entry="pd"):
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
    ghost = Handoff.parse(params, "ghost", time.time() + 30, fingerprint)
    items = list(handle.generate.remote(decode_request("completions", body, ghost)))
    elapsed = time.monotonic() - t0
    reply = items[1]
    assert elapsed < 8 + 10, elapsed
    if isinstance(reply, HandoffFailed):
        assert reply.failure is Failure.KV_PULL_TIMEOUT
    else:
        assert reply.body["choices"][0]["text"] == text(complete(cluster.colocated, cluster.model, body["prompt"], 4))
    print(f"{channel} side channel: {type(reply).__name__} after {elapsed:.1f} s")


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
        reply = prefill.prefill.remote(prefill_request("completions", b), route=to_p).result()
        handoff = Handoff.parse(reply.kv_transfer_params, reply.prefill_replica, reply.kv_expires_at,
                                reply.kv_fingerprint)
        return b, decode_request("completions", b, handoff)

    _, warm = pd()  # decode handshakes with prefill
    assert type(list(decode.generate.remote(warm, route=to_d))[1]).__name__ == "JsonReply"
    _, frozen = pd()
    procs = process_group(prefill_replica.pid)
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
