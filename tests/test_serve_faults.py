"""The Serve tier: real Ray, real Serve (proxy, router, direct ingress), the real ingress, breaker and probes, over
fake engines (``tests/fake_engine.py``: no vLLM, a replica starts in about a second). Faults are real: replicas are
killed and frozen with signals, Serve replaces them (its health check every 2 s here, a setting), clients hang up
and overload the pools. Each test takes seconds; what needs a real engine (KV bytes, outputs, engine gauges) is in
the test_e2e_* modules.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import ray
import yaml

from deployments.servers.base import ENGINE_CLASS_ENV
from deployments.settings import RoutingSettings

from .conftest import API_KEY, AUTH, E2E_APPS, PDSERVE, ROOT, Cluster, _combined_config, direct_ingress_bases
from .fake_engine import ITL_ENV, fake_words
from .faults import (
    burst,
    complete,
    ingress_log,
    process_group,
    routing_retry_counts,
    signal_all,
    text,
    unanswered_queue_probes,
)
from .prompts import SHORT, long_prompt, tagged

pytestmark = pytest.mark.serve_tier

# Short deadlines, probes and cooldowns: the rules are the ones of the real tier, the waits are seconds.
FAKE_ROUTING = {"kv_pull_timeout_s": 4, "breaker_cooldown_s": 3, "max_queued_requests": 8,
                "decode_probe_interval_s": 1.0, "replica_probe_timeout_s": 0.5, "stream_idle_cap_s": 2.0}
ROUTING = RoutingSettings(**FAKE_ROUTING)
# Serve's health check: a frozen replica is replaced after period + timeout (~22 s), after the freeze tests ran.
HEALTH_CHECK = {"health_check_period_s": 2, "health_check_timeout_s": 20}
LONG = long_prompt(30)  # ~400 tokens by the ingress's estimate: disaggregated


def _fake_config(tmp) -> str:
    config = yaml.safe_load(_combined_config(tmp).read_text())
    for app in config["applications"]:
        args = app["args"]
        args["routing"] = dict(FAKE_ROUTING)
        args["engine"]["max_num_seqs"] = 4
        for pool in ("prefill", "decode", "colocated", "elastic"):
            if pool in args:
                args[pool] |= HEALTH_CHECK | {"num_cpus": 0.1, "cpu_bind": [], "env": {ITL_ENV: "0.05"}}
        for pool in ("prefill", "decode"):  # two replicas per pool: one to kill or freeze, one to go on
            if pool in args:
                args[pool]["num_replicas"] = 2
    path = tmp / "fake.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The e2e cluster's applications (pd, here with two replicas per pool; colocated; elastic; direct ingress) on
    fake engines."""
    env = os.environ | {"PDSERVE_API_KEY": API_KEY, ENGINE_CLASS_ENV: "tests.fake_engine:FakeEngine",
                        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    up = subprocess.run([PDSERVE, "up", "--config", _fake_config(tmp_path_factory.mktemp("fake"))], env=env,
                        timeout=300, capture_output=True, text=True)
    try:
        assert up.returncode == 0, f"pdserve up failed:\n{up.stdout[-2000:]}\n{up.stderr[-3000:]}"
        ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
        yield Cluster(base="http://127.0.0.1:8000", model="smollm2-135m-instruct",
                      direct=direct_ingress_bases(len(E2E_APPS)))
    finally:
        try:
            if ray.is_initialized():  # this process's Serve client, handles and routers point at this cluster:
                from ray import serve  # none may outlive it (the real cluster's tests would reach dead actors)

                serve.shutdown()
        finally:
            ray.shutdown()
            subprocess.run([PDSERVE, "down"], env=env, timeout=300)


def _stream_body(cluster, prompt: str) -> dict:
    return {"model": cluster.model, "prompt": tagged(uuid.uuid4().hex, prompt), "max_tokens": 1500,
            "temperature": 0, "stream": True, "ignore_eos": True}


def test_fake_engines_answer_alike_on_every_route(cluster):
    """The tier's own check: both routes and the colocated app give the fake model's answer, and the long prompt
    takes the disaggregated route with a hand-off, the short one the local route."""
    for prompt, route in ((tagged(uuid.uuid4().hex, LONG), "disaggregated"), (SHORT, "local_prefill")):
        resp = complete(cluster.pd, cluster.model, prompt, max_tokens=5)
        assert resp.headers["x-pdserve-route"] == route, resp.headers
        assert text(resp) == "".join(fake_words(prompt, 5)) == text(complete(cluster.colocated, cluster.model,
                                                                              prompt, max_tokens=5))
    assert httpx.post(cluster.pd + "/completions", json={"model": cluster.model, "prompt": "x"}).status_code == 401


def test_prefix_affinity_keeps_a_shared_prefix_on_one_prefill_replica(cluster):
    prefix = tagged(uuid.uuid4().hex, LONG)
    chosen = set()
    for i in range(6):
        resp = complete(cluster.pd, cluster.model, prefix + f"\nQuestion {i}: which fact mentions granite?", 4)
        assert resp.status_code == 200 and resp.headers["x-pdserve-route"] == "disaggregated", resp.text
        chosen.add(resp.headers["x-pdserve-prefill-replica"])
    assert len(chosen) == 1, chosen
    others = {complete(cluster.pd, cluster.model, tagged(uuid.uuid4().hex, LONG), 4).headers[
        "x-pdserve-prefill-replica"] for _ in range(8)}
    assert len(others) == 2, others  # other prefixes spread over both replicas


@pytest.mark.parametrize("entry", ["pd", "direct_pd"], ids=["via-proxy", "direct-ingress"])
def test_client_disconnect_mid_stream_frees_the_decode_engine(cluster, entry):
    with httpx.Client(timeout=60, headers=AUTH) as client, \
            client.stream("POST", getattr(cluster, entry) + "/completions", json=_stream_body(cluster, LONG)) as resp:
        assert resp.status_code == 200 and resp.headers["x-pdserve-route"] == "disaggregated"
        replica = resp.headers["x-pdserve-decode-replica"]
        for i, _ in enumerate(resp.iter_lines()):
            if i > 10:
                break  # leave with tokens still coming
    deadline = time.monotonic() + 5
    while cluster.stats("DecodeServer", replica=replica).get("vllm:num_requests_running"):
        assert time.monotonic() < deadline, "the decode engine still runs the abandoned stream"
        time.sleep(0.2)


def test_killed_prefill_replica_loses_no_request(cluster):
    prompts = [tagged(f"kill-{i}-{uuid.uuid4().hex[:6]}", LONG) for i in range(24)]
    victim = cluster.replicas("PrefillServer")[0]

    def kill():
        time.sleep(0.3)
        ray.kill(ray.get_actor(victim.actor_name, namespace="serve"), no_restart=False)

    resps, times = burst(cluster, prompts, during=kill)
    assert all(r.status_code == 200 for r in resps), [r.text for r in resps if r.status_code != 200]
    assert [text(r) for r in resps] == ["".join(fake_words(p, 8)) for p in prompts]
    print(f"burst of 24 with a prefill replica killed: max {max(times):.1f} s, fallbacks: "
          f"{[r.headers.get('x-pdserve-fallback') for r in resps if r.headers.get('x-pdserve-fallback')]}")
    cluster.wait_for_replicas("PrefillServer", 2, timeout_s=60)


def test_frozen_prefill_replica_hangs_no_request(cluster):
    victim = cluster.replicas("PrefillServer")[0]
    procs = process_group(victim.pid)
    signal_all(procs, signal.SIGSTOP)
    try:
        resps, times = burst(cluster, [tagged(f"freeze-{i}-{uuid.uuid4().hex[:6]}", LONG) for i in range(6)])
        assert all(r.status_code == 200 for r in resps), [r.text for r in resps]
        assert max(times) < 15, times  # a prefill deadline and a probe, then the other replica or a local prefill
    finally:
        signal_all(procs, signal.SIGCONT)
    cluster.wait_for_replicas("PrefillServer", 2, timeout_s=60)


def test_frozen_prefill_pool_costs_one_deadline_then_local_prefill(cluster):
    """Every prefill replica frozen: a long prompt waits at most its prefill deadline per replica (derived from its
    size and the measured speed), the probe gets no answer, and the decode replica prefills it. No replica is waited
    on twice for one request."""
    time.sleep(ROUTING.breaker_cooldown_s)  # breakers the last test opened are closed again
    procs = [p for r in cluster.replicas("PrefillServer") for p in process_group(r.pid)]
    signal_all(procs, signal.SIGSTOP)
    try:
        for i in range(3):
            t0 = time.monotonic()
            resp = complete(cluster.pd, cluster.model, tagged(f"frozen-pool-{i}-{uuid.uuid4().hex[:6]}", LONG), 4)
            took_s = time.monotonic() - t0
            assert resp.status_code == 200 and resp.headers["x-pdserve-route"] == "local_prefill", resp.headers
            waits = [(m.group(1), float(m.group(2))) for m in re.finditer(
                re.escape(resp.headers["x-pdserve-request-id"]) + r": prefill on (\S+) past its ([\d.]+) s deadline",
                ingress_log())]
            replicas = [r for r, _ in waits]
            assert len(replicas) == len(set(replicas)) <= 2, waits  # never the same replica twice
            assert all(deadline < 10 for _, deadline in waits), waits  # derived from the prompt, not the cap
            assert took_s < sum(deadline + 1.5 for _, deadline in waits) + 5, (took_s, waits)
    finally:
        signal_all(procs, signal.SIGCONT)
    cluster.wait_for_replicas("PrefillServer", 2, timeout_s=60)


def test_killed_decode_replica_before_first_token_is_retried(cluster):
    victim = cluster.replicas("DecodeServer")[0]
    os.kill(victim.pid, signal.SIGKILL)
    resps, _ = burst(cluster, [tagged(f"dkill-{i}-{uuid.uuid4().hex[:6]}", SHORT) for i in range(6)])
    assert all(r.status_code == 200 for r in resps), [r.text for r in resps]
    assert all(r.headers["x-pdserve-decode-replica"] != victim.id for r in resps)
    cluster.wait_for_replicas("DecodeServer", 2, timeout_s=60)


def _stream_until(cluster, fault, after_s: float = 1.0) -> tuple[list[str], float]:
    """A long stream whose decode replica gets ``fault(replica)`` after ``after_s``: its data lines and how long
    after the fault the stream closed."""
    with httpx.Client(timeout=60, headers=AUTH) as client, \
            client.stream("POST", cluster.pd + "/completions", json=_stream_body(cluster, SHORT)) as resp:
        victim = next(r for r in cluster.replicas("DecodeServer") if r.id == resp.headers["x-pdserve-decode-replica"])
        timer = threading.Timer(after_s, fault, (victim,))
        t0 = time.monotonic()
        timer.start()
        lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
        timer.join()
        return lines, time.monotonic() - t0 - after_s


def _ends_with_a_clean_error(lines: list[str]) -> None:
    assert lines[-1] == "data: [DONE]" and len(lines) > 3
    error = json.loads(lines[-2][len("data: "):])
    assert error["error"]["code"] == 503 and "interrupted" in error["error"]["message"]
    assert not re.search(r"Actor|Error\b|\d+\.\d+\.\d+\.\d+", error["error"]["message"]), error  # no internals


def test_killed_decode_replica_mid_stream_ends_the_stream_cleanly(cluster):
    lines, closed_after_s = _stream_until(cluster, lambda victim: os.kill(victim.pid, signal.SIGKILL))
    _ends_with_a_clean_error(lines)
    assert closed_after_s < 10, closed_after_s
    cluster.wait_for_replicas("DecodeServer", 2, timeout_s=60)


def test_frozen_decode_replica_before_first_token_hangs_no_request(cluster):
    """A frozen decode replica: Serve's router finds it silent first, or the call reaches it and its silent stream
    gets the replica probed, and the request is retried on the other replica within a probe interval and timeout."""
    probe_s = ROUTING.decode_probe_interval_s + ROUTING.replica_probe_timeout_s
    victim = cluster.replicas("DecodeServer")[0]
    procs = process_group(victim.pid)
    queue_probes_before = unanswered_queue_probes(victim.id)
    signal_all(procs, signal.SIGSTOP)
    try:
        prompts = [tagged(f"dfreeze-{i}-{uuid.uuid4().hex[:6]}", SHORT if i % 2 else LONG) for i in range(6)]
        resps, times = burst(cluster, prompts)
        assert all(r.status_code == 200 for r in resps), [r.text for r in resps]
        served_by = [(r.headers["x-pdserve-decode-replica"], r.headers.get("x-pdserve-fallback")) for r in resps]
        assert all(replica != victim.id for replica, _ in served_by), (victim, served_by)
        retried = [r for r in resps if "decode_replica_unresponsive" in r.headers.get("x-pdserve-fallback", "")]
        queue_probes = unanswered_queue_probes(victim.id) - queue_probes_before
        assert retried or queue_probes, f"nothing was routed to the frozen replica {victim.id}: {served_by}"
        assert max(times) < 2 * probe_s + 10, times
    finally:
        signal_all(procs, signal.SIGCONT)
    cluster.wait_for_replicas("DecodeServer", 2, timeout_s=60)


def test_decode_replica_frozen_mid_stream_ends_the_stream_cleanly(cluster):
    probe_s = ROUTING.stream_idle_cap_s + ROUTING.replica_probe_timeout_s  # silence past the first token
    time.sleep(ROUTING.breaker_cooldown_s)  # the last test's frozen replica is back in rotation
    frozen: list = []

    def freeze(victim):
        frozen.extend(process_group(victim.pid))
        signal_all(frozen, signal.SIGSTOP)

    try:
        lines, closed_after_s = _stream_until(cluster, freeze)
    finally:
        signal_all(frozen, signal.SIGCONT)
    _ends_with_a_clean_error(lines)
    assert closed_after_s < probe_s + 5, closed_after_s
    cluster.wait_for_replicas("DecodeServer", 2, timeout_s=60)


@pytest.mark.parametrize("entry", ["pd", "direct_pd"], ids=["via-proxy", "direct-ingress"])
def test_overload_answers_429_and_recovers(cluster, entry):
    body = lambda i: {"model": cluster.model, "prompt": tagged(f"load-{i}", SHORT), "max_tokens": 48,  # noqa: E731
                      "temperature": 0, "ignore_eos": True}
    num_retry_warnings = len(routing_retry_counts())
    with ThreadPoolExecutor(64) as pool:
        t0 = time.monotonic()
        resps = list(pool.map(lambda i: httpx.post(getattr(cluster, entry) + "/completions", json=body(i),
                                                   timeout=120, headers=AUTH), range(64)))
    statuses = [r.status_code for r in resps]
    rejected = [r for r in resps if r.status_code == 429]
    assert rejected and set(statuses) <= {200, 429}, statuses
    assert all(r.headers.get("retry-after") and r.json()["error"]["code"] == 429 for r in rejected)
    burst_s = time.monotonic() - t0
    retries = routing_retry_counts()[num_retry_warnings:]  # queued requests back off, they do not spin the ingress
    assert max(retries, default=0) <= 4 * burst_s + 50, f"routing retried {max(retries)} times in {burst_s:.0f} s"
    assert complete(cluster.pd, cluster.model, SHORT).status_code == 200
