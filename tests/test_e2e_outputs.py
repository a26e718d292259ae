"""Disaggregated output equals colocated output token for token, over real HTTP, real NIXL transfer."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from .conftest import API_KEY
from .prompts import MEDIUM, SHORT, long_prompt, tagged

pytestmark = pytest.mark.cluster
MAX_TOKENS = 24
SIZES = {"short": SHORT, "medium": MEDIUM, "long": long_prompt()}


def _body(endpoint: str, text: str, stream: bool, model: str) -> dict:
    body = {"model": model, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def _call(http, base: str, endpoint: str, body: dict, headers: dict | None = None) -> tuple[str, str, dict]:
    """(text, finish_reason, usage) of one request, streamed or not; its response headers go into ``headers``."""
    path = "/chat/completions" if endpoint == "chat" else "/completions"
    headers = {} if headers is None else headers
    if not body["stream"]:
        resp = http.post(base + path, json=body)
        headers.update(resp.headers)
        assert resp.status_code == 200, resp.text
        choice = resp.json()["choices"][0]
        text = choice["message"]["content"] if endpoint == "chat" else choice["text"]
        return text, choice["finish_reason"], resp.json()["usage"]
    parts, finish, usage = [], None, None
    with http.stream("POST", base + path, json=body) as resp:
        headers.update(resp.headers)
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        chunk = json.loads(line[len("data: "):])
        assert "error" not in chunk, chunk
        usage = chunk.get("usage") or usage
        for choice in chunk["choices"]:
            delta = choice["delta"].get("content") if endpoint == "chat" else choice["text"]
            parts.append(delta or "")
            finish = choice.get("finish_reason") or finish
    return "".join(parts), finish, usage


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
@pytest.mark.parametrize("size", list(SIZES))
def test_disaggregated_equals_colocated(cluster, http, endpoint, stream, size):
    text = tagged(f"{endpoint}-{stream}-{size}", SIZES[size])
    pd = _call(http, cluster.pd, endpoint, _body(endpoint, text, stream, cluster.model))
    colo = _call(http, cluster.colocated, endpoint, _body(endpoint, text, stream, cluster.model))
    assert pd == colo
    if size == "long":
        assert pd[2]["prompt_tokens"] > 1000
    if endpoint == "chat":
        assert pd[0].strip(), "a chat answer should not be empty"
    assert pd[2]["completion_tokens"] > 0


def _wait_for(predicate, timeout_s: float = 10):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.2)


def test_kv_cache_moves_instead_of_being_recomputed(cluster, http):
    """The decode engine pulls every prompt token's KV over NIXL; it recomputes none of the prompt."""
    snapshot = lambda: {(dep, r.id): cluster.stats(dep, replica=r.id)  # noqa: E731
                        for dep in ("PrefillServer", "DecodeServer") for r in cluster.replicas(dep)}
    before = snapshot()
    body = _body("completions", tagged(uuid.uuid4().hex, long_prompt(30)), False, cluster.model)
    resp = http.post(cluster.pd + "/completions", json=body)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-pdserve-route"] == "disaggregated"
    num_prompt = resp.json()["usage"]["prompt_tokens"]
    p_key = ("PrefillServer", resp.headers["x-pdserve-prefill-replica"])
    d_key = ("DecodeServer", resp.headers["x-pdserve-decode-replica"])
    count = "vllm:nixl_xfer_time_seconds_count"
    _wait_for(lambda: cluster.stats(d_key[0], replica=d_key[1]).get(count) > before[d_key].get(count))
    after = snapshot()
    delta = lambda key, name: after[key].get(name) - before[key].get(name)  # noqa: E731
    assert delta(p_key, "vllm:prompt_tokens_total") == num_prompt  # prefill computed the prompt
    assert delta(d_key, "vllm:external_prefix_cache_hits_total") == num_prompt  # decode pulled all of it
    assert delta(d_key, "vllm:prefix_cache_hits_total") == 0  # none of it came from decode's own cache
    assert delta(d_key, count) == 1
    assert delta(d_key, "vllm:nixl_bytes_transferred_sum") > 0
    assert delta(d_key, "vllm:nixl_num_failed_transfers_total") == 0
    assert resp.json()["usage"]["completion_tokens"] >= 1  # (a raw completion may be EOS at once)


def test_openai_client_unchanged(cluster):
    from openai import OpenAI

    client = OpenAI(base_url=cluster.pd, api_key=API_KEY)
    assert [m.id for m in client.models.list()] == [cluster.model]
    chat = client.chat.completions.create(model=cluster.model, max_tokens=16, temperature=0,
                                          messages=[{"role": "user", "content": "Name a colour."}])
    assert chat.choices[0].message.content and chat.usage.completion_tokens > 0
    comp = client.completions.create(model=cluster.model, prompt=SHORT, max_tokens=8, temperature=0)
    assert comp.choices[0].finish_reason in ("length", "stop")
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=cluster.model, max_tokens=16, temperature=0, stream=True,
        messages=[{"role": "user", "content": "Name a colour."}]) if c.choices]
    assert "".join(pieces) == chat.choices[0].message.content
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=cluster.model, prompt=SHORT, max_tokens=8, temperature=0, stream=True))
    assert streamed == comp.choices[0].text
