"""Bad input gets an OpenAI-style JSON error with the right 4xx status, and the server stays healthy."""

from __future__ import annotations

import pytest

from .prompts import SHORT, long_prompt

pytestmark = pytest.mark.cluster


def _chat(model, **extra):
    return {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4} | extra


CASES = {
    "malformed-json": (lambda m: b'{"model": "x", "messages": [', 400, "malformed JSON"),
    "not-an-object": (lambda m: b"[1, 2]", 400, "JSON object"),
    "lone-surrogate": (lambda m: b'{"prompt": "\\ud800 hi", "max_tokens": 2}', 400, "Unicode"),
    "missing-messages": (lambda m: {"model": m, "max_tokens": 4}, 400, "messages"),
    "unknown-field": (lambda m: _chat(m, temperatur=0.5), 400, "temperatur"),
    "internal-field": (lambda m: _chat(m, kv_transfer_params={"do_remote_prefill": True}), 400, "kv_transfer_params"),
    "wrong-type": (lambda m: _chat(m, max_tokens="many"), 400, "max_tokens"),
    "wrong-model": (lambda m: _chat("no-such-model"), 404, "no-such-model"),
    "max-tokens-over-limit": (lambda m: _chat(m, max_tokens=100_000), 400, "max_tokens"),
    "prompt-over-max-model-len": (
        lambda m: {"model": m, "prompt": long_prompt(400), "max_tokens": 4}, 400, "maximum context length"),
    "oversized-body": (lambda m: {"model": m, "prompt": "x" * (5 * 1024 * 1024)}, 413, "bytes"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("base_attr", ["pd", "colocated", "direct_pd", "direct_colocated"])
def test_bad_input_is_a_clear_4xx(cluster, http, case, base_attr):
    make, status, needle = CASES[case]
    payload = make(cluster.model)
    path = "/completions" if isinstance(payload, dict) and "prompt" in payload else "/chat/completions"
    url = getattr(cluster, base_attr) + path
    if isinstance(payload, bytes):
        resp = http.post(url, content=payload, headers={"content-type": "application/json"})
    else:
        resp = http.post(url, json=payload)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["code"] == status and needle in error["message"], error
    assert error["type"]
    if case == "prompt-over-max-model-len" and base_attr in ("pd", "direct_pd"):  # refused by the prefill engine:
        assert "x-pdserve-fallback" not in resp.headers, resp.headers  # no decode engine tokenized it again


def test_server_healthy_after_bad_input(cluster, http):
    for base in (cluster.pd, cluster.colocated, cluster.direct_pd, cluster.direct_colocated):
        http.post(base + "/chat/completions", content=b"{oops")
        assert http.get(base.removesuffix("/v1") + "/health").status_code == 200
        resp = http.post(base + "/completions", json={"model": cluster.model, "prompt": SHORT, "max_tokens": 4})
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 4
