"""Odd-but-legal, hostile and unauthenticated requests against the real cluster (real engines, real HTTP).

Each case of the request-path issue: the request is served in disaggregated mode exactly as colocated (or
refused with a clear 4xx), and a plain request right after it answers 200 at once: no engine went down.
"""

from __future__ import annotations

import json
import socket
import time
import uuid

import httpx
import pytest

from .conftest import API_KEY
from .prompts import SHORT, long_prompt, tagged

pytestmark = pytest.mark.cluster
LONG = long_prompt(30)  # ~400 tokens: disaggregated by default


def _healthy_right_after(cluster, http) -> None:
    """A plain request answers 200 at once (a crashed engine would answer 500 until Serve replaced it)."""
    t0 = time.monotonic()
    resp = http.post(cluster.pd + "/completions", json={"model": cluster.model, "prompt": SHORT, "max_tokens": 2})
    assert resp.status_code == 200, resp.text
    assert time.monotonic() - t0 < 15


def _choices(resp: httpx.Response) -> list:
    assert resp.status_code == 200, resp.text
    return [(c.get("text"), c.get("index")) for c in resp.json()["choices"]]


LEGAL = {
    "list-prompt": lambda: {"prompt": [tagged(uuid.uuid4().hex, LONG), "List the colours of the rainbow."]},
    "token-id-prompt": lambda: {"prompt": list(range(1000, 1300))},
    "token-id-prompts": lambda: {"prompt": [list(range(1000, 1300)), [9906, 11, 1093]]},
    "n": lambda: {"prompt": tagged(uuid.uuid4().hex, LONG), "n": 2, "temperature": 0.8, "seed": 7},
    # beam search is not transferable whatever the prompt's length (a short one keeps vLLM's per-step runs quick)
    "beam-search": lambda: {"prompt": tagged(uuid.uuid4().hex, SHORT), "use_beam_search": True, "n": 2},
    "min-tokens": lambda: {"prompt": tagged(uuid.uuid4().hex, LONG), "min_tokens": 5},
    "echo": lambda: {"prompt": tagged(uuid.uuid4().hex, LONG), "echo": True},
    "prompt-logprobs": lambda: {"prompt": tagged(uuid.uuid4().hex, LONG), "prompt_logprobs": 1},
    "logprobs": lambda: {"prompt": tagged(uuid.uuid4().hex, LONG), "logprobs": 2},
}


@pytest.mark.parametrize("case", list(LEGAL))
def test_legal_request_in_disaggregated_mode_equals_colocated(cluster, http, case):
    body = {"model": cluster.model, "max_tokens": 8, "temperature": 0} | LEGAL[case]()
    pd = http.post(cluster.pd + "/completions", json=body)
    colo = http.post(cluster.colocated + "/completions", json=body)
    assert _choices(pd) == _choices(colo), (pd.json(), colo.json())
    for key in ("logprobs", "prompt_logprobs"):  # the same fields, present or absent alike
        present = [[c.get(key) is not None for c in r.json()["choices"]] for r in (pd, colo)]
        assert present[0] == present[1], key
    print(f"{case}: route {pd.headers['x-pdserve-route']} ({pd.headers['x-pdserve-route-reason']})")
    _healthy_right_after(cluster, http)


def test_chat_logprobs_and_min_tokens_on_a_long_prompt(cluster, http):
    body = {"model": cluster.model, "max_tokens": 6, "temperature": 0, "min_tokens": 4, "logprobs": True,
            "top_logprobs": 2, "messages": [{"role": "user", "content": tagged(uuid.uuid4().hex, LONG)}]}
    pd = http.post(cluster.pd + "/chat/completions", json=body)
    colo = http.post(cluster.colocated + "/chat/completions", json=body)
    assert pd.status_code == colo.status_code == 200, pd.text
    assert pd.headers["x-pdserve-route"] == "disaggregated"
    assert pd.json()["choices"][0]["message"] == colo.json()["choices"][0]["message"]
    assert pd.json()["choices"][0]["logprobs"]["content"]
    _healthy_right_after(cluster, http)


@pytest.mark.parametrize("body", [
    {"prompt": "Hi", "vllm_xargs": {"kv_transfer_params": 0}},
    {"prompt": "Hi", "vllm_xargs": {"kv_transfer_params": {"do_remote_prefill": True, "remote_host": "10.0.0.1"}}},
    {"prompt": "Hi", "vllm_xargs": {"ec_transfer_params": [1]}},
    {"prompt": "Hi", "kv_transfer_params": 0},
    {"prompt": "Hi", "ec_transfer_params": {}},
])
def test_internal_fields_are_refused_and_no_engine_goes_down(cluster, http, body):
    for base in (cluster.pd, cluster.colocated):
        resp = http.post(base + "/completions", json={"model": cluster.model} | body)
        assert resp.status_code == 400 and "reserved" in resp.json()["error"]["message"], resp.text
    _healthy_right_after(cluster, http)


@pytest.mark.parametrize("content", [[{"type": "text", "text": None}], [{"type": "text"}], [{"type": "image_url"}],
                                     [5], None])
def test_odd_chat_content_gets_a_json_4xx(cluster, http, content):
    resp = http.post(cluster.pd + "/chat/completions",
                     json={"model": cluster.model, "messages": [{"role": "user", "content": content}], "max_tokens": 2})
    assert resp.status_code < 500, resp.text
    if resp.status_code != 200:
        assert resp.json()["error"]["code"] == resp.status_code
    _healthy_right_after(cluster, http)


def test_limits_are_clear_400s(cluster, http):
    for extra, param in (({"n": 50}, "n"), ({"logprobs": 50}, "logprobs"), ({"stop": ["x"] * 40}, "stop")):
        resp = http.post(cluster.pd + "/completions", json={"model": cluster.model, "prompt": "Hi"} | extra)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text


def test_content_length_is_checked_before_the_body_is_read(cluster):
    """A client announcing 50 MiB gets 413 at once, before it sent the body."""
    with socket.create_connection(("127.0.0.1", 8000), timeout=15) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: 52428800\r\n\r\n{\"prompt\": \"")
        head = s.recv(4096).decode(errors="replace")
    assert head.startswith("HTTP/1.1 413"), head


def test_chunked_body_is_capped_while_streaming(cluster, http):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(6):
            yield b"x" * (1024 * 1024)
        yield b'"}'

    resp = http.post(cluster.pd + "/completions", content=chunks(), headers={"content-type": "application/json"})
    assert resp.status_code == 413, resp.text


def test_api_key_is_required_on_v1_routes_only(cluster):
    base = cluster.pd
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": API_KEY}):
        for method, path in (("POST", "/completions"), ("POST", "/chat/completions"), ("GET", "/models")):
            resp = httpx.request(method, base + path, headers=headers, timeout=30,
                                 json={"model": cluster.model, "prompt": "Hi", "max_tokens": 1})
            assert resp.status_code == 401, (headers, path, resp.text)
            assert resp.json()["error"]["code"] == 401 and API_KEY not in resp.text
    assert httpx.get(base.removesuffix("/v1") + "/health", timeout=30).status_code == 200
    assert httpx.get(cluster.colocated.removesuffix("/v1") + "/health", timeout=30).status_code == 200


def test_openai_client_raises_authentication_error(cluster):
    import openai

    client = openai.OpenAI(base_url=cluster.pd, api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.completions.create(model=cluster.model, prompt="Hi", max_tokens=1)


def test_errors_are_openai_json_and_hide_internals(cluster, http):
    for method, url in (("GET", cluster.pd + "/completions"), ("POST", cluster.pd + "/no-such-route"),
                        ("GET", cluster.pd.removesuffix("/v1") + "/nothing-here")):
        resp = http.request(method, url)
        assert resp.status_code in (404, 405), resp.text
        assert json.loads(resp.text)["error"]["code"] == resp.status_code


# requests the fuzzer (loadtests/reliability/fuzz.py) found answered 503: vLLM refuses them while parsing
FUZZ_FINDINGS = {
    "tool-choice-without-tools": ("/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                        "tool_choice": "auto"}),
    "logprob-token-ids-without-logprobs": ("/completions", {"prompt": "Hi", "logprob_token_ids": [1, 2]}),
    "bad-repetition-detection": ("/completions", {"prompt": "Hi", "repetition_detection": {
        "max_pattern_size": 1, "min_pattern_size": 5}}),
    "empty-structured-outputs": ("/completions", {"prompt": "Hi", "structured_outputs": {}}),
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("case", list(FUZZ_FINDINGS))
def test_requests_vllm_refuses_while_parsing_are_400_not_503(cluster, http, case, stream):
    path, body = FUZZ_FINDINGS[case]
    resp = http.post(cluster.pd + path, json={"model": cluster.model, "max_tokens": 2, "stream": stream} | body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == 400 and "x-pdserve-fallback" not in resp.headers
    _healthy_right_after(cluster, http)
