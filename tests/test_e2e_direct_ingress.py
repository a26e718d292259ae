"""The API on the Ingress replicas' own ports (``http.direct_ingress_port``, Serve's direct ingress).

The e2e cluster serves every application twice: through Serve's proxy and on its Ingress replica's own port. Both
entry points run the same ASGI app; these tests prove the second one is the same API: the key is checked, greedy
output and routing are the same, streams end as they should. Errors (test_e2e_errors.py), client disconnects and
overload (test_e2e_resilience.py) are tested through both entry points there.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid

import httpx
import pytest
import yaml

from .conftest import AUTH, E2E_APPS, E2E_DIRECT_INGRESS_PORT, PDSERVE, ROOT
from .prompts import SHORT, long_prompt, tagged

pytestmark = pytest.mark.cluster


def test_each_application_answers_on_its_own_port(cluster):
    assert set(cluster.direct) == set(E2E_APPS) and len(set(cluster.direct.values())) == len(E2E_APPS)
    for prefix, base in cluster.direct.items():
        assert httpx.get(f"{base}{prefix.rstrip('/')}/health", timeout=10).status_code == 200
    # the other application's routes are not served on this port
    assert httpx.get(f"{cluster.direct['/']}/colocated/health", timeout=10).status_code == 404


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer wrong-key"}], ids=["no-key", "wrong-key"])
def test_api_key_is_checked(cluster, headers):
    resp = httpx.post(cluster.direct_pd + "/completions", headers=headers, timeout=30,
                      json={"model": cluster.model, "prompt": SHORT, "max_tokens": 2})
    assert resp.status_code == 401 and resp.json()["error"]["code"] == 401, resp.text


@pytest.mark.parametrize("prompt", ["short", "long"])
def test_same_greedy_answer_as_through_the_proxy(cluster, http, prompt):
    text = SHORT if prompt == "short" else long_prompt()
    for proxy, direct in ((cluster.pd, cluster.direct_pd), (cluster.colocated, cluster.direct_colocated)):
        body = {"model": cluster.model, "prompt": tagged(uuid.uuid4().hex, text), "max_tokens": 16, "temperature": 0}
        via_direct = http.post(direct + "/completions", json=body)
        via_proxy = http.post(proxy + "/completions", json=body)
        assert via_proxy.status_code == via_direct.status_code == 200, (via_proxy.text, via_direct.text)
        assert via_direct.json()["choices"][0]["text"] == via_proxy.json()["choices"][0]["text"]
        if direct == cluster.direct_colocated:
            assert via_direct.headers["x-pdserve-route"] == "colocated"
        elif prompt == "long":  # the first of the two: a long prompt nobody has prefilled yet
            assert via_direct.headers["x-pdserve-route"] == "disaggregated", via_direct.headers


def test_chat_stream_ends_with_done_and_equals_the_whole_answer(cluster, http):
    body = {"model": cluster.model, "messages": [{"role": "user", "content": tagged(uuid.uuid4().hex, SHORT)}],
            "max_tokens": 12, "temperature": 0}
    whole = http.post(cluster.direct_pd + "/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    with httpx.Client(timeout=120, headers=AUTH) as client, \
            client.stream("POST", cluster.direct_pd + "/chat/completions", json=body | {"stream": True}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    streamed = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1]
                       if json.loads(e)["choices"])
    assert streamed == whole


def test_an_ingress_on_a_node_without_its_direct_ingress_port_refuses_and_up_says_why(cluster, tmp_path):
    """The cluster's nodes were started for direct ingress from 8010; an app asking for another port must not start
    silently without it: its Ingress replica refuses, and `pdserve up` prints the replica's reason."""
    from ray import serve

    doc = yaml.safe_load((ROOT / "cluster/local-colocated.yaml").read_text())
    name = f"misconfigured-{uuid.uuid4().hex[:6]}"
    app = doc["applications"][0] | {"name": name, "route_prefix": f"/{name}"}
    app["args"]["http"] |= {"direct_ingress_port": E2E_DIRECT_INGRESS_PORT + 500}
    app["args"]["colocated"] |= {"ray_resources": {"pdserve_nowhere": 1}}  # no engine starts: no node offers it
    # ... and its replica that never started is stopped in seconds (its graceful shutdown follows these)
    app["args"] |= {"request_timeout_s": 1, "routing": {"kv_lease_s": 2, "kv_pull_timeout_s": 1}}
    config = tmp_path / "misconfigured.yaml"
    config.write_text(yaml.safe_dump({"applications": [app]}))
    try:
        up = subprocess.run([PDSERVE, "up", "--config", str(config)], capture_output=True, text=True, timeout=300,
                            env=os.environ | {"HF_HUB_OFFLINE": "1"})
        assert up.returncode == 1, up.stdout + up.stderr
        assert f"Ingress: RuntimeError: http.direct_ingress_port is {E2E_DIRECT_INGRESS_PORT + 500}" in up.stderr
        assert f"RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT={E2E_DIRECT_INGRESS_PORT + 500}" in up.stderr
    finally:
        serve.delete(name)
    assert httpx.get(f"{cluster.direct['/']}/health", timeout=10).status_code == 200  # the others serve on
