"""Ingress checks of a client's request, the KV hand-off's request shaping, API keys and public error text,
on plain data (no cluster)."""

from __future__ import annotations

import pytest

from deployments.api import auth
from deployments.api.http import public
from deployments.api.requests import estimate_prompt_tokens, inspect, parse_json, prompt_text
from deployments.kv import internal_fields_in, not_transferable, prefill_request
from deployments.replies import ErrorReply
from deployments.settings import LimitSettings

LIMITS = LimitSettings()


def check(body, endpoint="completions"):
    return inspect(endpoint, body, "m", LIMITS, 2048)


@pytest.mark.parametrize("body, param", [
    ({"prompt": "Hi", "kv_transfer_params": {"do_remote_prefill": True}}, "kv_transfer_params"),
    ({"prompt": "Hi", "vllm_xargs": {"kv_transfer_params": 0}}, "vllm_xargs.kv_transfer_params"),
    ({"prompt": "Hi", "ec_transfer_params": {}}, "ec_transfer_params"),
    ({"prompt": "Hi", "vllm_xargs": {"ec_transfer_params": "x"}}, "vllm_xargs.ec_transfer_params"),
])
def test_internal_fields_are_refused_wherever_they_hide(body, param):
    err = check(body)
    assert isinstance(err, ErrorReply) and err.status == 400 and err.param == param


@pytest.mark.parametrize("body, param", [
    ({"prompt": "Hi", "n": 9}, "n"),
    ({"prompt": "Hi", "best_of": 100}, "best_of"),
    ({"prompt": "Hi", "logprobs": 21}, "logprobs"),
    ({"prompt": "Hi", "prompt_logprobs": 1000}, "prompt_logprobs"),
    ({"prompt": "Hi", "stop": ["x"] * 17}, "stop"),
    ({"prompt": "Hi", "stop_token_ids": list(range(17))}, "stop_token_ids"),
    ({"prompt": ["Hi"] * 17}, "prompt"),
    ({"prompt": "Hi", "max_tokens": 5000}, "max_tokens"),
])
def test_limits_answer_400_naming_the_field(body, param):
    err = check(body)
    assert isinstance(err, ErrorReply) and err.status == 400 and err.param == param, err


def test_chat_limits():
    err = check({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 50, "logprobs": True}, "chat")
    assert isinstance(err, ErrorReply) and err.param == "top_logprobs"
    err = check({"messages": [{"role": "user", "content": "x"}] * 600}, "chat")
    assert isinstance(err, ErrorReply) and err.param == "messages"


@pytest.mark.parametrize("body, status", [
    ([1, 2], 400), ("text", 400), (None, 400),
    ({"model": "other", "prompt": "Hi"}, 404), ({"model": ["x"], "prompt": "Hi"}, 404),
    ({"prompt": None}, 400), ({"prompt": 5}, 400), ({}, 400),
])
def test_malformed_bodies_are_client_errors(body, status):
    err = check(body)
    assert isinstance(err, ErrorReply) and err.status == status


@pytest.mark.parametrize("raw", [b'{"prompt": "\\ud800 hi"}', b'{"messages": [{"content": "\\udfff"}]}',
                                 b'{"stop": ["a\\ud83d"]}'])
def test_lone_surrogates_are_a_client_error(raw):
    """Regression: an escaped lone surrogate parsed, then broke the ingress's prefix hash: 500."""
    err = parse_json(raw)
    assert isinstance(err, ErrorReply) and err.status == 400


def test_parse_json():
    assert parse_json(b'{"prompt": "\\ud83d\\ude00 ok"}') == {"prompt": "\U0001f600 ok"}  # a valid pair
    for raw in (b"{oops", b"\xff\xfe", b"[" * 100_000):
        assert parse_json(raw).status == 400


def test_chat_needs_messages():
    assert check({"messages": "hi"}, "chat").status == 400


@pytest.mark.parametrize("content", [
    [{"type": "text", "text": None}], [{"type": "text"}], [None, 5, "x"], None, 5, {"text": "x"},
])
def test_odd_chat_content_never_breaks_the_ingress(content):
    """Regression: a text part ``{"text": null}`` crashed the ingress (bare 500); vLLM judges it instead."""
    req = check({"messages": [{"role": "user", "content": content}, "junk", {"content": "ok"}]}, "chat")
    assert not isinstance(req, ErrorReply)
    assert isinstance(prompt_text(req.body), str)


def test_prompt_estimates():
    assert estimate_prompt_tokens({"prompt": "x" * 4000}) == 1000
    assert estimate_prompt_tokens({"prompt": list(range(300))}) == 300
    assert estimate_prompt_tokens({"prompt": [[1, 2], [3]]}) == 3
    assert prompt_text({"messages": [{"role": "user", "content": "ab"},
                                     {"role": "user", "content": [{"type": "text", "text": "cd"}]}]}) == "ab\ncd"


@pytest.mark.parametrize("body, transferable", [
    ({"prompt": "x"}, True), ({"prompt": ["x"]}, True), ({"prompt": [1, 2, 3]}, True), ({"prompt": [[1, 2]]}, True),
    ({"prompt": ["x", "y"]}, False), ({"prompt": [[1], [2]]}, False), ({"prompt": "x", "n": 2}, False),
    ({"prompt": "x", "n": 1}, True), ({"prompt": "x", "best_of": 2}, False),
    ({"prompt": "x", "use_beam_search": True}, False),
    ({"prompt": "x", "echo": True}, False), ({"prompt": "x", "prompt_logprobs": 0}, False),
    ({"prompt": "x", "logprobs": 3}, True), ({"prompt": "x", "min_tokens": 5}, True),
])
def test_what_the_handoff_can_carry(body, transferable):
    assert (not_transferable("completions", body) is None) == transferable


def test_prefill_request_is_a_copy_shaped_for_one_token():
    body = {"prompt": "x", "max_tokens": 50, "min_tokens": 5, "n": 1, "logprobs": 3, "stream": True,
            "stream_options": {"include_usage": True}, "response_format": {"type": "json_object"},
            "stop": ["a"], "vllm_xargs": {"custom": 1}, "add_special_tokens": False, "cache_salt": "s"}
    before = dict(body)
    req = prefill_request("completions", body)
    assert body == before and req.body is not body and req.body["vllm_xargs"] is not body["vllm_xargs"]
    assert req.body == {"prompt": "x", "max_tokens": 1, "vllm_xargs": {"custom": 1}, "add_special_tokens": False,
                        "cache_salt": "s"}
    assert req.kv_transfer_params["do_remote_decode"] is True


def test_chat_prefill_keeps_what_shapes_the_prompt():
    body = {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 9, "tools": [{"type": "function"}],
            "chat_template_kwargs": {"a": 1}, "add_generation_prompt": True, "logprobs": True, "top_logprobs": 2}
    shaped = prefill_request("chat", body).body
    assert shaped == {"messages": body["messages"], "tools": body["tools"], "chat_template_kwargs": {"a": 1},
                      "add_generation_prompt": True, "max_tokens": 1}


def test_internal_fields_in_ignores_other_xargs():
    assert internal_fields_in({"vllm_xargs": {"custom": 1}}) == [] and internal_fields_in({"vllm_xargs": 3}) == []


def test_api_key_check():
    assert auth.check(None, None) is None  # no key configured: open
    assert auth.check("Bearer s3cret", ("s3cret",)) is None
    assert auth.check("bearer s3cret", ("s3cret",)) is None
    assert auth.check("Bearer new", ("old", "new")) is None  # several keys: rotation
    assert auth.check("Bearer x", ()).status == 401  # a key file with no key refuses everything
    for header in (None, "", "Bearer", "Bearer wrong", "Basic s3cret", "s3cret", "Bearer s3cret2"):
        err = auth.check(header, ("s3cret",))
        assert err.status == 401 and err.body()["error"]["code"] == 401
    assert auth.needs_key("/v1/completions") and auth.needs_key("/v1/models") and auth.needs_key("/v1")
    assert not auth.needs_key("/health") and not auth.needs_key("/v10")


def test_api_key_middleware_refuses_before_the_app_and_streams_through_untouched(monkeypatch):
    """The ingress's ASGI middleware on a stand-in app: 401 without reaching it; with the key (or on /health, or
    under a route prefix) the app's streamed body passes chunk by chunk."""
    from starlette.responses import StreamingResponse
    from starlette.testclient import TestClient

    from deployments.api.http import RequireApiKey
    from deployments.settings import API_KEY_ENV

    reached = []

    async def app(scope, receive, send):
        reached.append(scope["path"])
        await StreamingResponse(iter(["a", "b", "c"]), media_type="text/event-stream")(scope, receive, send)

    monkeypatch.setenv(API_KEY_ENV, "s3cret")
    client = TestClient(RequireApiKey(app))
    refused = client.post("/v1/completions", json={})
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer" and reached == []
    assert refused.json()["error"]["type"] == "AuthenticationError"
    ok = client.post("/v1/completions", json={}, headers={"authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and ok.text == "abc"
    assert client.get("/health").status_code == 200
    assert TestClient(RequireApiKey(app), root_path="/colocated").get("/colocated/v1/models").status_code == 401
    assert reached == ["/v1/completions", "/health"]


def test_server_errors_hide_internal_text():
    leaky = ErrorReply(500, "ActorDiedError: actor 4f2a9c at 10.1.2.3:4321 died", "InternalServerError")
    shown = public(leaky, "req-1")
    assert "10.1.2.3" not in shown.message and "Actor" not in shown.message and "req-1" in shown.message
    assert shown.status == 500
    own = public(ErrorReply(503, "no decode replica could serve the request", "ServiceUnavailable"), "req-2")
    assert own.message == "no decode replica could serve the request (request id req-2)"
    client = ErrorReply(400, "max_tokens must be at least 1", param="max_tokens")
    assert public(client, "req-1") == client


def test_api_keys_from_a_file_are_reread_when_it_changes_and_fail_closed(tmp_path):
    """PDSERVE_API_KEY_FILE: one key per line, comments ignored; rotation without a restart; a missing or empty file
    refuses every request instead of opening the API."""
    import os

    path = tmp_path / "keys"
    path.write_text("# pdserve keys\nold-key\n\n")
    keys = auth.ApiKeys({"PDSERVE_API_KEY_FILE": str(path), "PDSERVE_API_KEY": "ignored"})
    assert keys.current() == ("old-key",)
    path.write_text("old-key\nnew-key\n")
    os.utime(path, (1, 1))  # a new mtime even within the file system's clock resolution
    assert keys.current() == ("old-key", "new-key")
    path.write_text("")
    os.utime(path, (2, 2))
    assert keys.current() == ()
    path.unlink()
    assert keys.current() == ()
    assert auth.ApiKeys({"PDSERVE_API_KEY": "a, b"}).current() == ("a", "b")
    assert auth.ApiKeys({}).current() is None
    path.write_text("first\nsecond\n")
    assert auth.client_key({"PDSERVE_API_KEY_FILE": str(path)}) == "first"


@pytest.mark.parametrize("field", ["n", "best_of", "max_tokens", "max_completion_tokens", "logprobs",
                                   "top_logprobs", "prompt_logprobs", "min_tokens"])
@pytest.mark.parametrize("value", ["64", 64.0, True, "1", [1], {"n": 1}])
def test_integer_fields_given_as_another_json_type_are_refused(field, value):
    """vLLM coerces "64", 64.0 and true into ints (a string n gave 64 choices past the cap of 8): only a JSON
    integer passes, so every cap reads the number vLLM would use."""
    err = check({"prompt": "Hi", field: value})
    assert isinstance(err, ErrorReply) and err.status == 400 and err.param == field, err
    assert "must be an integer" in err.message


def test_integer_fields_capped_and_chat_logprobs_stays_a_boolean():
    assert isinstance(check({"prompt": "Hi", "min_tokens": 3000}), ErrorReply)
    assert isinstance(check({"prompt": "Hi", "prompt_logprobs": -1}), ErrorReply)  # -1: the whole vocabulary
    assert not isinstance(check({"prompt": "Hi", "n": 8, "max_tokens": 16, "min_tokens": 2}), ErrorReply)
    chat = {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 5}
    assert not isinstance(check(chat, "chat"), ErrorReply)


@pytest.mark.parametrize("depth, ok", [(60, True), (65, False), (600, False), (100_000, False)])
def test_deep_json_is_refused_without_recursion(depth, ok):
    """600 levels answered 500 (a RecursionError with a 1,000-frame traceback per request); past the parser's own
    limit it is malformed JSON; both are 400 now."""
    raw = ('{"prompt": "x", "vllm_xargs": ' + '[' * depth + ']' * depth + '}').encode()
    body = parse_json(raw, LIMITS)
    assert isinstance(body, dict) if ok else (isinstance(body, ErrorReply) and body.status == 400)


def test_json_with_too_many_values_is_refused():
    raw = ('{"prompt": "x", "stop": [' + ",".join(['"a"'] * 300_000) + ']}').encode()
    err = parse_json(raw, LIMITS)
    assert isinstance(err, ErrorReply) and err.status == 400 and "values" in err.message


@pytest.mark.parametrize("body, param", [
    ({"structured_outputs": {"regex": "(a|b)*" * 10_000}}, "structured_outputs"),
    ({"structured_outputs": {"choice": [str(i) for i in range(300)]}}, "structured_outputs"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {
        "type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(2000)}}}}}, "response_format"),
    ({"structured_outputs": {"grammar": "root ::= " + " | ".join(f'"w{i}"' for i in range(5000))}},
     "structured_outputs"),
])
def test_structured_output_specs_are_bounded(body, param):
    err = check({"messages": [{"role": "user", "content": "x"}]} | body, "chat")
    assert isinstance(err, ErrorReply) and err.status == 400 and err.param == param, err
    assert not isinstance(check({"messages": [{"role": "user", "content": "x"}],
                                 "structured_outputs": {"regex": "[a-z]{1,8}"}}, "chat"), ErrorReply)


def test_token_prompt_longer_than_the_model_is_refused_before_any_engine():
    err = check({"prompt": list(range(3000))})
    assert isinstance(err, ErrorReply) and err.param == "prompt" and "2048" in err.message
    assert isinstance(check({"prompt": [[1] * 10, [2] * 2049]}), ErrorReply)
    assert not isinstance(check({"prompt": list(range(2000))}), ErrorReply)


def test_header_guard_drops_serves_control_headers_and_keeps_the_clients_id_apart():
    """Serve's proxy reads x-request-disconnect-disabled (a request that outlives its client), the timeout and
    routing headers, and takes x-request-id as its own id: the guard in front of it drops the first and hands the
    client's id over under its own name."""
    from starlette.testclient import TestClient

    from deployments.api.guard import HeaderGuard

    seen = []

    async def app(scope, receive, send):
        seen.append({k.decode().lower(): v.decode() for k, v in scope["headers"]})
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    client = TestClient(HeaderGuard(app))
    client.post("/v1/completions", headers={
        "x-request-disconnect-disabled": "?1", "X-Request-Timeout-Seconds": "9999", "serve_multiplexed_model_id": "m",
        "x-session-id": "s", "x-request-id": "client-7", "x-pdserve-client-request-id": "forged",
        "authorization": "Bearer k"})
    [headers] = seen
    assert headers["x-pdserve-client-request-id"] == "client-7" and headers["authorization"] == "Bearer k"
    assert not {"x-request-disconnect-disabled", "x-request-timeout-seconds", "serve_multiplexed_model_id",
                "x-session-id", "x-request-id"} & set(headers)


def test_header_guard_caps_requests_in_flight():
    import asyncio

    from deployments.api.guard import HeaderGuard

    release = asyncio.Event()

    async def app(scope, receive, send):
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def run():
        guard, sent = HeaderGuard(app, max_concurrent=2), []

        async def one():
            async def send(message):
                sent.append(message)
            await guard({"type": "http", "headers": []}, None, send)

        tasks = [asyncio.create_task(one()) for _ in range(2)]
        await asyncio.sleep(0.01)
        await one()  # the third: refused at once
        refused = [m for m in sent if m["type"] == "http.response.start"]
        release.set()
        await asyncio.gather(*tasks)
        return refused, guard.num_in_flight

    refused, left = asyncio.run(run())
    assert [m["status"] for m in refused] == [503] and (b"retry-after", b"1") in refused[0]["headers"]
    assert left == 0
