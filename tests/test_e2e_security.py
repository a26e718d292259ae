"""The cluster plane on the shared e2e cluster, started as `pdserve up` starts it with an API key: Ray refuses callers
without its token, nothing listens beyond loopback, the API key is in no Ray process, file or status, and hostile
requests and connections get clear answers without slowing a well-behaved client.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest

from deployments.credentials import SINGLE_NODE_ENV

from .conftest import API_KEY, AUTH, E2E_BODY_READ_TIMEOUT_S, PDSERVE

pytestmark = pytest.mark.cluster

RAY_SESSION = Path("/tmp/ray/session_latest")


def _ray_processes() -> list[psutil.Process]:
    """Every process of the local Ray cluster: its GCS, raylet and their descendants (workers, agents, engines)."""
    roots = [p for p in psutil.process_iter(["name"]) if p.info["name"] in ("gcs_server", "raylet")]
    procs = {p.pid: p for p in roots}
    for root in roots:
        procs |= {c.pid: c for c in root.children(recursive=True)}
    return list(procs.values())


def test_ray_refuses_a_job_submission_and_a_driver_without_its_token(cluster, tmp_path):
    # Ray's job agent on this node: a job posted without the token is refused and runs nothing
    marker = tmp_path / "pwned"
    resp = httpx.post("http://127.0.0.1:52365/api/job_agent/jobs/", timeout=10,
                      json={"entrypoint": f"touch {marker}", "submission_id": uuid.uuid4().hex})
    assert resp.status_code in (401, 403), resp.text
    # a driver without the token (another user's home: no token file; token mode not asked for) cannot join
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | {
        "HOME": str(tmp_path), SINGLE_NODE_ENV: "0"}
    code = "import ray; ray.init(address='127.0.0.1:6379', log_to_driver=False); print('JOINED')"
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=45)
        out, err = done.stdout, done.stderr
    except subprocess.TimeoutExpired as exc:  # Ray's client retries an unauthenticated GCS: it never gets in
        out, err = exc.stdout or b"", exc.stderr or b""
    assert b"JOINED" not in out and not marker.exists(), err[-800:]
    assert b"Unauthenticated" in err or b"AuthenticationError" in err or b"auth" in err.lower(), err[-800:]


def test_nothing_pdserve_started_listens_beyond_loopback(cluster):
    """`ss` as a user would run it: the NIXL side channels (5600+, 5700+, 5900+), the API, the metrics target and
    Ray's own ports are on loopback. Serve's inter-deployment gRPC server binds every address in Ray itself (it
    requires Ray's token, tested above through the GCS): the only exception, by process and port."""
    ours = {p.pid for p in _ray_processes()}
    listeners = [c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.pid in ours]
    assert listeners, "no listener of the Ray cluster found"
    side_channels = [c for c in listeners if any(base <= c.laddr.port < base + 64 for base in (5600, 5700, 5900))]
    assert len(side_channels) >= 4, listeners  # the prefill, the decode and the two elastic engines
    serve_grpc = {p.pid for p in _ray_processes() if "ServeReplica" in " ".join(p.cmdline()[:1])}
    open_ = [(c.laddr, psutil.Process(c.pid).name()) for c in listeners
             if not c.laddr.ip.removeprefix("::ffff:").startswith("127.")
             and not (c.laddr.ip in ("::", "0.0.0.0") and c.pid in serve_grpc)]
    assert open_ == [], open_
    out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout
    for port in {c.laddr.port for c in side_channels}:
        assert f"127.0.0.1:{port} " in out, out


def test_the_api_key_is_in_no_ray_process_file_or_status(cluster):
    leaks = []
    for proc in _ray_processes():
        try:
            if API_KEY in " ".join(f"{k}={v}" for k, v in proc.environ().items()):
                leaks.append(f"environment of {proc.pid} {proc.name()}")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for path in RAY_SESSION.resolve().rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000 and API_KEY.encode() in path.read_bytes():
            leaks.append(str(path))
    from ray.serve.context import _get_global_client

    details = json.dumps(_get_global_client().get_serve_details())
    assert "PDSERVE_API_KEY_FILE" in details  # the ingress is told where the key file is, not the key
    if API_KEY in details:
        leaks.append("Serve's application details")
    status = subprocess.run([PDSERVE, "status"], capture_output=True, text=True, timeout=120)
    if API_KEY in status.stdout + status.stderr:
        leaks.append("pdserve status")
    assert leaks == []


@pytest.mark.parametrize("field, value", [("n", "64"), ("n", 64.0), ("best_of", "8"), ("max_tokens", "16"),
                                          ("logprobs", 2.0), ("min_tokens", True)])
def test_numeric_fields_of_another_json_type_are_refused(cluster, http, field, value):
    resp = http.post(f"{cluster.pd}/completions", json={"prompt": "Hi", "max_tokens": 4} | {field: value})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == field, resp.text


def test_deeply_nested_json_is_a_400_not_a_500(cluster, http):
    raw = '{"prompt": "Hi", "max_tokens": 2, "vllm_xargs": {"x": ' + "[" * 600 + "]" * 600 + "}}"
    resp = http.post(f"{cluster.pd}/completions", content=raw, headers={"content-type": "application/json"})
    assert resp.status_code == 400 and "nested" in resp.json()["error"]["message"], resp.text


def _decode_idle(cluster, replica: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = cluster.stats("DecodeServer", replica=replica)
        if stats.get("vllm:num_requests_running") == 0 and stats.get("vllm:num_requests_waiting") == 0:
            return {}
        if time.monotonic() > deadline:
            return stats.values
        time.sleep(0.5)


def test_serves_disconnect_header_from_a_client_is_ignored(cluster):
    """`x-request-disconnect-disabled: ?1` kept a request running after its client hung up; the header guard drops
    it: the engine is idle within seconds of the hang-up."""
    body = {"model": cluster.model, "prompt": f"{uuid.uuid4().hex} Count to a thousand.", "max_tokens": 1000,
            "min_tokens": 1000, "temperature": 0}
    headers = AUTH | {"x-request-disconnect-disabled": "?1", "x-request-id": "client-hangs-up"}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{cluster.pd}/completions", json=body, headers=headers, timeout=3)
    replicas = [r.id for r in cluster.replicas("DecodeServer")]
    busy = {r: _decode_idle(cluster, r, 15) for r in replicas}
    assert not any(busy.values()), busy


def test_slow_header_flood_does_not_delay_a_keyed_client(cluster, http):
    socks = []
    try:
        for _ in range(300):
            s = socket.create_connection(("127.0.0.1", 8000), timeout=5)
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # headers never finished
            socks.append(s)
        t0 = time.monotonic()
        resp = http.get(f"{cluster.pd}/models")
        took = time.monotonic() - t0
    finally:
        for s in socks:
            s.close()
    assert resp.status_code == 200 and took < 1.0, took


def test_a_body_that_never_finishes_gets_408(cluster):
    """A client that sends its headers and then trickles (here: stops) its body is answered 408 after the body read
    timeout, instead of holding the ingress slot as long as it likes."""
    s = socket.create_connection(("127.0.0.1", 8000), timeout=60)
    try:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + API_KEY.encode()
                  + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\": ")
        t0 = time.monotonic()
        answer = s.recv(4096).decode(errors="replace")
    finally:
        s.close()
    assert answer.startswith("HTTP/1.1 408"), answer[:300]
    assert E2E_BODY_READ_TIMEOUT_S - 1 < time.monotonic() - t0 < E2E_BODY_READ_TIMEOUT_S + 10


@pytest.mark.parametrize("entry", ["pd", "colocated"])
def test_structured_outputs_compile_off_the_loop_and_still_bind(cluster, http, entry):
    """The engine compiles a spec in a worker thread first; vLLM's own check then skips the compile (a choice list
    is still rewritten into its grammar): the answer keeps to the spec, the first time and when it is remembered."""
    base = getattr(cluster, entry)
    choices = [f"answer-{uuid.uuid4().hex[:6]}", f"other-{uuid.uuid4().hex[:6]}"]
    for _ in range(2):
        resp = http.post(f"{base}/completions", json={
            "model": cluster.model, "prompt": "Pick one:", "max_tokens": 12, "temperature": 0,
            "structured_outputs": {"choice": choices}})
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["text"] in choices
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    resp = http.post(f"{base}/chat/completions", json={
        "model": cluster.model, "messages": [{"role": "user", "content": "Is water wet? JSON."}], "max_tokens": 32,
        "temperature": 0, "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}})
    assert resp.status_code == 200, resp.text
    assert isinstance(json.loads(resp.json()["choices"][0]["message"]["content"])["ok"], bool)
    resp = http.post(f"{base}/completions", json={"model": cluster.model, "prompt": "x", "max_tokens": 4,
                                                   "structured_outputs": {"regex": "(unclosed"}})
    assert resp.status_code == 400 and "Traceback" not in resp.text and ".cc:" not in resp.text, resp.text
