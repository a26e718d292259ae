"""The request path on fakes (tests/fakes.py): retry, fallback, breaker, deadline and lease rules in milliseconds.

Each test drives the real ``Ingress.serve_request`` (not deployed) over fake prefill and decode pools whose
replicas answer, raise, stall or push back on script.
"""

from __future__ import annotations

import asyncio
import copy
import time

import pytest

from deployments.api.phases import DeadlineExceeded, Overloaded, Unresponsive
from deployments.api.requests import inspect
from deployments.api.trace import Trace
from deployments.outcomes import Failure, Route, RouteReason
from deployments.replies import ErrorReply, JsonReply
from deployments.routing import ReplicaLoad
from deployments.routing.breaker import BreakerState
from tests.fakes import (
    BACKPRESSURE,
    DIE,
    ERROR_4XX,
    ERROR_5XX,
    FAKE_DECODE_NODE,
    FAKE_PREFILL_NODE,
    FROZEN,
    KV_RECOMPUTED,
    KV_TIMEOUT,
    OK,
    PROMPT_TOO_LONG,
    QUEUED,
    SLOW_FIRST,
    SLOW_FIRST_S,
    STALL,
    STALL_MID_STREAM,
    FakePool,
    count,
    fake_ingress,
)

FAST = {"routing": {"prefill_deadline_base_s": 0.1, "prefill_deadline_factor": 1, "prefill_tokens_per_s": 1e6,
                    "prefill_timeout_s": 0.3, "replica_probe_timeout_s": 0.05, "breaker_cooldown_s": 0.3,
                    "breaker_failure_threshold": 1, "min_remote_prefill_tokens": 10, "kv_pull_timeout_s": 0.5,
                    "kv_lease_s": 1}}
LEAST_LOADED = FAST | {"routing": FAST["routing"] | {"prefill_policy": "least_loaded"}}
LONG = {"prompt": "word " * 400, "max_tokens": 4}  # ~500 tokens: disaggregated
SHORT = {"prompt": "Hi", "max_tokens": 4}


async def serve_async(ingress, body: dict, endpoint: str = "completions", timeout_s: float = 30,
                      request_id: str = "t"):
    """One request through serve_request, in the caller's event loop; returns (replies, trace)."""
    trace = Trace(request_id=request_id, model=ingress.model_name, timeout_s=timeout_s)
    req = inspect(endpoint, body, ingress.model_name, ingress.settings.limits, ingress.settings.engine.max_model_len)
    assert not isinstance(req, ErrorReply), req
    return [item async for item in ingress.serve_request(req, trace)], trace


def serve(ingress, body: dict, endpoint: str = "completions", timeout_s: float = 30):
    """Run one request through serve_request; returns (replies, trace)."""
    return asyncio.run(serve_async(ingress, body, endpoint, timeout_s))


def pools(num_prefill: int = 1, num_decode: int = 1):
    return FakePool([f"p{i}" for i in range(1, num_prefill + 1)]), FakePool([f"d{i}" for i in range(1, num_decode + 1)])


def test_long_prompt_is_disaggregated_and_the_client_body_is_not_changed():
    prefill, decode = pools()
    body = LONG | {"min_tokens": 2, "logprobs": 2, "stream": True, "stream_options": {"include_usage": True}}
    before = copy.deepcopy(body)
    replies, trace = serve(fake_ingress(prefill, decode, FAST), body)
    assert body == before
    assert trace.route is Route.DISAGGREGATED and trace.reason is RouteReason.LONG_PROMPT
    [(_, prefill_req)] = prefill.calls
    [(_, decode_req)] = decode.calls
    assert prefill_req.body["max_tokens"] == 1 and prefill_req.kv_transfer_params["do_remote_decode"]
    assert not {"min_tokens", "logprobs", "stream", "stream_options"} & set(prefill_req.body)
    assert decode_req.body == before and decode_req.kv_transfer_params["remote_engine_id"] == "e-p1"
    assert decode_req.handoff.expires_at is not None and decode_req.handoff.prefill_replica == "p1"
    assert replies[-1] == "data: [DONE]\n\n"
    assert (trace.prefill_node, trace.decode_node) == (FAKE_PREFILL_NODE, FAKE_DECODE_NODE)
    h = trace.headers()
    assert (h["x-pdserve-prefill-node"], h["x-pdserve-decode-node"]) == (FAKE_PREFILL_NODE, FAKE_DECODE_NODE)
    assert trace.timing()["prefill_node"] == FAKE_PREFILL_NODE


@pytest.mark.parametrize("extra, why", [
    ({"prompt": ["word " * 400, "List the colours"]}, "several prompts"),
    ({"prompt": [[1, 2, 3] * 100, [4, 5]]}, "several prompts"),
    ({"n": 2}, "n > 1"),
    ({"use_beam_search": True, "n": 2}, "n > 1"),
    ({"use_beam_search": True}, "beam search"),
    ({"echo": True}, "echo"),
    ({"prompt_logprobs": 1}, "prompt logprobs"),
])
def test_requests_the_handoff_cannot_carry_are_prefilled_locally(extra, why):
    prefill, decode = pools()
    _, trace = serve(fake_ingress(prefill, decode, FAST), LONG | extra)
    assert trace.route is Route.LOCAL_PREFILL and trace.reason is RouteReason.NOT_TRANSFERABLE, why
    assert prefill.calls == [] and decode.calls[0][1].kv_transfer_params is None


def test_token_id_prompt_is_disaggregated():
    prefill, decode = pools()
    _, trace = serve(fake_ingress(prefill, decode, FAST), {"prompt": list(range(1, 300)), "max_tokens": 2})
    assert trace.route is Route.DISAGGREGATED


def test_frozen_prefill_costs_one_deadline_and_is_never_waited_on_twice():
    """One prefill replica (the default), frozen: one attempt, its deadline, a probe that gets no answer, then a
    local prefill on the decode replica: no second wait on the same replica."""
    prefill, decode = pools()
    prefill.script["p1"] = [STALL]
    ingress = fake_ingress(prefill, decode, FAST)
    t0 = time.monotonic()
    replies, trace = serve(ingress, LONG)
    took_s = time.monotonic() - t0
    assert count(prefill.calls) == {"p1": 1} and prefill.probes == ["p1"]
    assert trace.route is Route.LOCAL_PREFILL and trace.reason is RouteReason.PREFILL_FAILED
    assert trace.fallbacks == [Failure.PREFILL_TIMEOUT]
    prefill_route, _ = ingress.route(inspect("completions", LONG, ingress.model_name, ingress.settings.limits, 2048),
                                     Trace("x", "m"))
    expected_s = ingress.prefill.deadline_s(prefill_route)
    assert took_s < expected_s + 0.05 + 0.3  # deadline + probe + slack
    assert ingress.prefill.pool.breaker.state("p1") is BreakerState.OPEN
    assert isinstance(replies[0], JsonReply)


def test_prefill_deadline_grows_with_the_prompt_and_is_capped():
    prefill, decode = pools()
    prefill.loads["p1"] = ReplicaLoad(num_outstanding_prompt_tokens=10**6)  # a frozen replica's stale report
    ingress = fake_ingress(prefill, decode, {"routing": {"prefill_tokens_per_s": 1000, "prefill_timeout_s": 60}})
    from deployments.routing import RouteRequest

    small = ingress.prefill.deadline_s(RouteRequest(num_prompt_tokens=100))
    big = ingress.prefill.deadline_s(RouteRequest(num_prompt_tokens=4000))
    assert small == pytest.approx(2.0 + 4 * 0.1) and big == pytest.approx(2.0 + 4 * 4.0)
    assert ingress.prefill.deadline_s(RouteRequest(num_prompt_tokens=100, target="p1")) == pytest.approx(small)
    assert ingress.prefill.deadline_s(RouteRequest(num_prompt_tokens=10**6)) == 60


def test_prefill_speed_is_measured_from_replies():
    prefill, decode = pools()
    ingress = fake_ingress(prefill, decode, {"routing": {"prefill_tokens_per_s": 1.0}})
    serve(ingress, LONG)
    assert ingress.prefill.tokens_per_s > 1.0


def test_frozen_prefill_with_a_second_replica_goes_there():
    prefill, decode = pools(num_prefill=2)
    prefill.script["p1"] = [STALL]
    prefill.loads["p2"] = ReplicaLoad(num_running=1)  # least loaded picks p1 first
    _, trace = serve(fake_ingress(prefill, decode, LEAST_LOADED), LONG)
    assert [r for r, _ in prefill.calls] == ["p1", "p2"]
    assert trace.route is Route.DISAGGREGATED and trace.prefill_replica == "p2"


def test_timeout_while_queueing_is_not_a_replica_failure():
    prefill, decode = pools()
    prefill.script["p1"] = [STALL]
    prefill.probe_answers["p1"] = 7  # alive, holding 7 requests: ours waited in its queue
    ingress = fake_ingress(prefill, decode, FAST)
    _, trace = serve(ingress, LONG)
    assert trace.fallbacks == [Failure.PREFILL_QUEUED] and trace.route is Route.LOCAL_PREFILL
    assert ingress.prefill.pool.breaker.state("p1") is BreakerState.CLOSED


def test_timed_out_prefill_is_probed_before_it_is_cancelled():
    """The probe's count must still include the timed-out request: cancelled first, a replica busy with two
    prompts (ours and one more) would answer 1 and be taken for a slow replica, a breaker failure."""
    prefill, decode = pools()
    prefill.script["p1"] = [STALL]
    prefill.probe_answers["p1"] = 2
    ingress = fake_ingress(prefill, decode, FAST)
    _, trace = serve(ingress, LONG)
    assert prefill.cancelled_at_probe == [0] and prefill.cancelled == 1
    assert trace.fallbacks == [Failure.PREFILL_QUEUED]


def test_a_burst_timing_out_together_on_a_live_replica_is_queueing():
    """Four prompts sent together, all past their deadline on a replica that answers holding them: queueing, not a
    breaker failure, and later deadlines stay as measured (lengthened per timeout, they climbed to the 60 s cap in
    one overload test, and a replica that froze after it cost each request the cap)."""
    prefill, decode = pools()
    prefill.script["p1"] = [STALL]
    prefill.probe_answers["p1"] = 4
    ingress = fake_ingress(prefill, decode, FAST)
    before = ingress.prefill.tokens_per_s

    async def burst():
        return await asyncio.gather(*(serve_async(ingress, LONG, request_id=f"t{i}") for i in range(4)))

    results = asyncio.run(burst())
    assert [trace.fallbacks for _, trace in results] == [[Failure.PREFILL_QUEUED]] * 4
    assert ingress.prefill.pool.breaker.state("p1") is BreakerState.CLOSED
    assert ingress.prefill.tokens_per_s == before


def test_prefill_client_error_is_not_a_replica_failure_and_decode_judges_the_request():
    prefill, decode = pools()
    prefill.script["p1"] = [ERROR_4XX]
    ingress = fake_ingress(prefill, decode, FAST)
    replies, trace = serve(ingress, LONG)
    assert isinstance(replies[0], JsonReply) and trace.route is Route.LOCAL_PREFILL
    assert trace.fallbacks == [Failure.PREFILL_REFUSED] and count(prefill.calls) == {"p1": 1}
    assert trace.reason is RouteReason.PREFILL_REFUSED
    assert ingress.prefill.pool.breaker.state("p1") is BreakerState.CLOSED


def test_prompt_the_prefill_engine_refuses_as_too_long_is_answered_without_a_decode_attempt():
    """A prompt longer than the model takes is the client's error whatever the phase: answered from the prefill
    engine's refusal (vLLM checks its characters before tokenizing), never tokenized again on a decode engine."""
    prefill, decode = pools()
    prefill.script["p1"] = [PROMPT_TOO_LONG]
    ingress = fake_ingress(prefill, decode, FAST)
    replies, trace = serve(ingress, LONG)
    assert isinstance(replies[0], ErrorReply) and replies[0].status == 400 and replies[0].param == "input_tokens"
    assert decode.calls == [] and count(prefill.calls) == {"p1": 1} and trace.fallbacks == []
    assert ingress.prefill.pool.breaker.state("p1") is BreakerState.CLOSED


@pytest.mark.parametrize("behaviour, failure", [(ERROR_5XX, Failure.PREFILL_ERROR),
                                                (DIE, Failure.PREFILL_REPLICA_DIED)])
def test_prefill_server_failure_retries_elsewhere_and_counts_against_the_replica(behaviour, failure):
    prefill, decode = pools(num_prefill=2)
    prefill.script["p1"] = [behaviour]
    prefill.loads["p2"] = ReplicaLoad(num_running=1)
    ingress = fake_ingress(prefill, decode, LEAST_LOADED)
    _, trace = serve(ingress, LONG)
    assert trace.fallbacks == [failure] and trace.route is Route.DISAGGREGATED and trace.prefill_replica == "p2"
    assert ingress.prefill.pool.breaker.state("p1") is BreakerState.OPEN


def test_prefill_backpressure_means_local_prefill_without_blame():
    prefill, decode = pools()
    prefill.script["p1"] = [BACKPRESSURE]
    ingress = fake_ingress(prefill, decode, FAST)
    _, trace = serve(ingress, LONG)
    assert trace.reason is RouteReason.PREFILL_BACKPRESSURE
    assert ingress.prefill.pool.breaker.state("p1") is BreakerState.CLOSED


def test_tripped_prefill_replica_comes_back_after_cooldown_while_another_is_healthy():
    prefill, decode = pools(num_prefill=2)
    prefill.script["p1"] = [ERROR_5XX, OK]
    prefill.loads["p2"] = ReplicaLoad(num_running=1)  # p1 is always the first choice
    settings = FAST | {"routing": FAST["routing"] | {"prefill_policy": "least_loaded"}}
    ingress = fake_ingress(prefill, decode, settings)
    serve(ingress, LONG)
    assert ingress.prefill.pool.breaker.state("p1") is BreakerState.OPEN
    time.sleep(0.35)  # cooldown over
    served_by = {serve(ingress, LONG)[1].prefill_replica for _ in range(4)}
    assert "p1" in served_by and ingress.prefill.pool.breaker.state("p1") is BreakerState.CLOSED


def test_decode_server_error_before_first_token_is_retried():
    prefill, decode = pools(num_decode=2)
    decode.script["d1"] = [ERROR_5XX]
    decode.loads["d2"] = ReplicaLoad(num_running=1)
    ingress = fake_ingress(prefill, decode, FAST)
    replies, trace = serve(ingress, SHORT)
    assert isinstance(replies[0], JsonReply) and replies[0].body["served_by"] == "d2"
    assert trace.fallbacks == [Failure.DECODE_ERROR] and ingress.decode.pool.breaker.state("d1") is BreakerState.OPEN


@pytest.mark.parametrize("behaviour, failure", [(DIE, Failure.DECODE_REPLICA_DIED), (ERROR_5XX, Failure.DECODE_ERROR)])
def test_decode_failure_after_the_handoff_went_out_retries_with_a_local_prefill(behaviour, failure):
    """One pull per hand-off: the failed attempt may have pulled the KV, and vLLM frees the prefill engine's blocks
    on the first completed pull, so the retry prefills locally instead of pulling the same blocks again."""
    prefill, decode = pools(num_decode=2)
    decode.script["d1"] = [behaviour]
    decode.loads["d2"] = ReplicaLoad(num_running=1)
    ingress = fake_ingress(prefill, decode, FAST)
    replies, trace = serve(ingress, LONG)
    assert [r for r, _ in decode.calls] == ["d1", "d2"]
    assert decode.calls[0][1].kv_transfer_params is not None and decode.calls[1][1].kv_transfer_params is None
    assert isinstance(replies[0], JsonReply) and replies[0].body["served_by"] == "d2"
    assert trace.route is Route.LOCAL_PREFILL and trace.reason is RouteReason.KV_HANDOFF_SPENT
    assert trace.fallbacks == [failure] and trace.headers()["x-pdserve-route-reason"] == "kv_handoff_spent"
    assert ingress.prefill.pool.breaker.state("p1") is BreakerState.CLOSED  # the prefill replica did nothing wrong
    assert len(prefill.calls) == 1  # no second prefill either: the decode replica computes the prompt itself


PROBED = {"routing": FAST["routing"] | {"decode_probe_interval_s": 0.05}}


def test_frozen_decode_replica_before_first_token_is_probed_then_retried_with_a_local_prefill():
    """A decode replica frozen before it even tags the stream (SIGSTOP, a hung node): after one probe interval of
    silence its probe gets no answer; the request goes to another replica, not after the end-to-end deadline, and
    prefills there (the frozen one may have pulled the KV: one pull per hand-off)."""
    prefill, decode = pools(num_decode=2)
    decode.script["d1"] = [FROZEN]
    decode.loads["d2"] = ReplicaLoad(num_running=1)
    ingress = fake_ingress(prefill, decode, PROBED)
    t0 = time.monotonic()
    replies, trace = serve(ingress, LONG, timeout_s=30)
    assert time.monotonic() - t0 < 0.05 + 0.05 + 0.5  # interval + probe + slack
    assert isinstance(replies[0], JsonReply) and replies[0].body["served_by"] == "d2"
    assert [r for r, _ in decode.calls] == ["d1", "d2"] and decode.calls[1][1].kv_transfer_params is None
    assert decode.probes == ["d1"] and decode.cancelled >= 1
    assert trace.route is Route.LOCAL_PREFILL and trace.reason is RouteReason.KV_HANDOFF_SPENT
    assert trace.fallbacks == [Failure.DECODE_REPLICA_UNRESPONSIVE]
    assert ingress.decode.pool.breaker.state("d1") is BreakerState.OPEN


def test_slow_decode_replica_that_answers_its_probes_is_waited_for():
    """A replica slow to its first token (a long local prefill, a queue) but alive: probed while silent, it answers,
    so the request stays there: no retry, no breaker failure."""
    prefill, decode = pools(num_decode=2)
    decode.script["d1"] = [SLOW_FIRST]
    decode.probe_answers["d1"] = 3
    ingress = fake_ingress(prefill, decode, PROBED)
    replies, trace = serve(ingress, SHORT, timeout_s=30)
    assert isinstance(replies[0], JsonReply) and replies[0].body["served_by"] == "d1"
    assert len(decode.probes) >= SLOW_FIRST_S / 0.05 / 2 and set(decode.probes) == {"d1"}
    assert [r for r, _ in decode.calls] == ["d1"] and trace.fallbacks == []
    assert ingress.decode.pool.breaker.state("d1") is BreakerState.CLOSED


def _no_view_until_the_first_call(ingress, decode: FakePool) -> None:
    """The ingress's first request: no routing view in its process yet, so Serve's router places the call (the fake
    places it on the pool's first replica)."""
    ingress.decode.pool.view = lambda: decode.view() if decode.calls else None


def test_frozen_decode_replica_placed_by_serves_router_is_found_by_probing_the_pool():
    """A call Serve's router placed on a frozen replica, which never tags the stream: after one probe interval of
    silence every replica of the pool is probed, and the one that does not answer is taken out; the request goes to
    another, not held until Serve's own health check removes the replica."""
    prefill, decode = pools(num_decode=2)
    decode.script["d1"] = [FROZEN]
    decode.probe_answers["d2"] = 0
    ingress = fake_ingress(prefill, decode, PROBED)
    _no_view_until_the_first_call(ingress, decode)
    t0 = time.monotonic()
    replies, trace = serve(ingress, SHORT, timeout_s=30)
    assert time.monotonic() - t0 < 0.05 + 0.05 + 0.5  # interval + probe + slack
    assert isinstance(replies[0], JsonReply) and replies[0].body["served_by"] == "d2"
    assert [r for r, _ in decode.calls] == ["d1", "d2"] and sorted(decode.probes) == ["d1", "d2"]
    assert trace.fallbacks == [Failure.DECODE_REPLICA_UNRESPONSIVE]
    assert ingress.decode.pool.breaker.state("d1") is BreakerState.OPEN


def test_call_waiting_in_serves_queue_is_waited_for_while_every_replica_answers():
    """Silent before its tag only because it waits in Serve's queue: every replica answers its probe, so the call is
    left where it is: no retry, no breaker failure."""
    prefill, decode = pools(num_decode=2)
    decode.script["d1"] = [QUEUED]
    decode.probe_answers |= {"d1": 4, "d2": 4}
    ingress = fake_ingress(prefill, decode, PROBED)
    _no_view_until_the_first_call(ingress, decode)
    replies, trace = serve(ingress, SHORT, timeout_s=30)
    assert isinstance(replies[0], JsonReply) and replies[0].body["served_by"] == "d1"
    assert set(decode.probes) == {"d1", "d2"} and [r for r, _ in decode.calls] == ["d1"] and trace.fallbacks == []
    assert ingress.decode.pool.breaker.excluded() == frozenset()


def test_every_decode_replica_held_out_by_the_breaker_means_a_named_suspect_that_is_probed():
    """Every decode replica out of rotation: the request still goes to one, the least loaded, named by the ingress
    (not left to Serve's router), so that a frozen one is probed and the request moves on to the other."""
    prefill, decode = pools(num_decode=2)
    decode.script["d1"] = [FROZEN]
    decode.loads["d2"] = ReplicaLoad(num_running=1)
    ingress = fake_ingress(prefill, decode, PROBED)
    for replica in ("d1", "d2"):
        ingress.decode.pool.breaker.record_failure(replica)
    replies, trace = serve(ingress, SHORT, timeout_s=30)
    assert isinstance(replies[0], JsonReply) and replies[0].body["served_by"] == "d2"
    assert [r for r, _ in decode.calls] == ["d1", "d2"] and decode.probes == ["d1"]
    assert trace.fallbacks == [Failure.DECODE_REPLICA_UNRESPONSIVE]


def test_decode_replica_frozen_mid_stream_ends_the_stream_and_counts_against_it():
    """Past its first token a stream's silence is judged by its replica's measured inter-token latency (20 ms here:
    probed after 0.4 s), not by decode_probe_interval_s (5 s, for a first token that may wait on a long prefill)."""
    prefill, decode = pools()
    decode.script["d1"] = [STALL_MID_STREAM]
    decode.loads["d1"] = ReplicaLoad(itl_s=0.02)
    ingress = fake_ingress(prefill, decode, {"routing": PROBED["routing"] | {"decode_probe_interval_s": 5}})
    t0 = time.monotonic()
    with pytest.raises(Unresponsive):
        serve(ingress, SHORT | {"stream": True}, timeout_s=30)
    assert 0.4 <= time.monotonic() - t0 < 1.5
    assert decode.probes == ["d1"] and ingress.decode.pool.breaker.state("d1") is BreakerState.OPEN


def test_stream_idle_timeout_follows_the_measured_inter_token_latency_within_floor_and_cap():
    prefill, decode = pools()
    ingress = fake_ingress(prefill, decode, {"routing": FAST["routing"] | {"stream_idle_floor_s": 1.0,
                                                                          "stream_idle_cap_s": 5.0}})
    phase = ingress.decode
    for itl_s, idle_s in ((0.0, 5.0), (0.01, 1.0), (0.1, 2.0), (0.5, 5.0)):  # none measured: the cap
        decode.loads["d1"] = ReplicaLoad(itl_s=itl_s)
        assert phase.stream_idle_s("d1") == pytest.approx(idle_s), itl_s
    assert phase.stream_idle_s(None) == 5.0  # replica unknown


def test_decode_client_error_goes_to_the_client_once():
    prefill, decode = pools(num_decode=2)
    decode.script = {"d1": [ERROR_4XX], "d2": [ERROR_4XX]}
    ingress = fake_ingress(prefill, decode, FAST)
    replies, trace = serve(ingress, SHORT)
    assert isinstance(replies[0], ErrorReply) and replies[0].status == 400 and len(decode.calls) == 1
    assert ingress.decode.pool.breaker.excluded() == frozenset()


def test_decode_everywhere_failing_answers_503():
    prefill, decode = pools(num_decode=2)
    decode.script = {"d1": [DIE], "d2": [DIE]}
    replies, _ = serve(fake_ingress(prefill, decode, FAST), SHORT)
    assert isinstance(replies[0], ErrorReply) and replies[0].status == 503


def test_kv_pull_timeout_prefills_locally_and_blames_the_prefill_replica():
    prefill, decode = pools()
    decode.script["d1"] = [KV_TIMEOUT]
    ingress = fake_ingress(prefill, decode, FAST)
    replies, trace = serve(ingress, LONG)
    assert isinstance(replies[0], JsonReply)
    assert trace.route is Route.LOCAL_PREFILL and trace.reason is RouteReason.KV_PULL_FAILED and trace.kv_bytes == 0
    assert trace.prefill_node is None and "x-pdserve-prefill-node" not in trace.headers()
    assert decode.calls[1][1].kv_transfer_params is None
    assert trace.fallbacks == [Failure.KV_PULL_TIMEOUT]
    assert ingress.prefill.pool.breaker.state("p1") is BreakerState.OPEN  # threshold 1 here


def test_pull_recomputed_by_vllm_is_labelled_as_a_local_prefill():
    """vLLM's recompute policy answers after a failed pull as if nothing happened; the decode replica says so
    and the request is labelled honestly: local prefill, reason kv_recomputed, no KV bytes, prefill replica
    blamed. The stream itself goes on (nothing is sent twice)."""
    prefill, decode = pools()
    decode.script["d1"] = [KV_RECOMPUTED]
    ingress = fake_ingress(prefill, decode, FAST)
    replies, trace = serve(ingress, LONG | {"stream": True})
    assert replies[-1] == "data: [DONE]\n\n" and len(decode.calls) == 1
    assert trace.route is Route.LOCAL_PREFILL and trace.reason is RouteReason.KV_RECOMPUTED
    assert trace.fallbacks == [Failure.KV_RECOMPUTED] and trace.kv_bytes == 0 and trace.prefill_replica is None
    assert trace.headers()["x-pdserve-fallback"] == "kv_recomputed"
    assert ingress.prefill.pool.breaker.state("p1") is BreakerState.OPEN


def test_handoff_from_an_engine_with_another_kv_layout_is_not_pulled():
    """Prefill and decode engines that disagree on the model or KV layout (a misconfigured pool): the decode
    replica refuses the hand-off before any pull (as DecodeServer does), the request is prefilled locally and the
    prefill replica is held out of rotation."""
    from tests.fakes import FakePrefillHandle

    prefill, decode = pools()
    ingress = fake_ingress(prefill, decode, FAST,
                           prefill_handle=lambda p: FakePrefillHandle(p, kv_fingerprint="fp-model-b"))
    replies, trace = serve(ingress, LONG)
    assert isinstance(replies[0], JsonReply)
    assert trace.route is Route.LOCAL_PREFILL and trace.reason is RouteReason.KV_INCOMPATIBLE
    assert trace.fallbacks == [Failure.KV_INCOMPATIBLE] and decode.calls[1][1].kv_transfer_params is None
    assert ingress.prefill.pool.breaker.state("p1") is BreakerState.OPEN


def test_handoff_past_its_lease_is_not_used():
    """The fake decode replica refuses a hand-off at or past ``kv_expires_at``, as the real one does
    (DecodeServer.generate): the request is prefilled locally instead of reading reused blocks."""
    from tests.fakes import FakePrefillHandle

    prefill, decode = pools()
    ingress = fake_ingress(prefill, decode, FAST, prefill_handle=lambda p: FakePrefillHandle(p, kv_lease_s=-1))
    replies, trace = serve(ingress, LONG)
    assert isinstance(replies[0], JsonReply)
    assert trace.reason is RouteReason.KV_LEASE_EXPIRED and trace.fallbacks == [Failure.KV_LEASE_EXPIRED]
    assert ingress.prefill.pool.breaker.state("p1") is BreakerState.CLOSED


def test_handoff_usable_only_while_a_pull_can_finish_inside_the_lease():
    from deployments.kv import Handoff

    raw = {"do_remote_prefill": True, "remote_engine_id": "e", "remote_request_id": "r", "remote_block_ids": [1],
           "remote_host": "h", "remote_port": 5600}
    handoff = Handoff.parse(raw, "p1", expires_at=100.0, fingerprint="fp")
    assert handoff.usable(now=80.0, kv_pull_timeout_s=10)
    assert not handoff.usable(now=90.0, kv_pull_timeout_s=10)
    assert handoff.compatible_with("fp") and not handoff.compatible_with("fp-other")


def test_decode_overloaded_raises_for_429():
    prefill, decode = pools()
    decode.script["d1"] = [BACKPRESSURE]
    with pytest.raises(Overloaded):
        serve(fake_ingress(prefill, decode, FAST), SHORT)


def test_end_to_end_deadline_covers_the_whole_stream():
    prefill, decode = pools()
    decode.script["d1"] = [STALL_MID_STREAM]
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        serve(fake_ingress(prefill, decode, FAST), SHORT | {"stream": True}, timeout_s=0.3)
    assert time.monotonic() - t0 < 1.0


def test_deadline_before_first_token_answers_504_without_blame():
    prefill, decode = pools()
    decode.script["d1"] = [STALL]
    ingress = fake_ingress(prefill, decode, FAST)
    replies, trace = serve(ingress, SHORT, timeout_s=0.2)
    assert isinstance(replies[0], ErrorReply) and replies[0].status == 504
    assert ingress.decode.pool.breaker.state("d1") is BreakerState.CLOSED


def test_colocated_mode_has_one_path():
    _, decode = pools()
    replies, trace = serve(fake_ingress(None, decode, FAST), LONG)
    assert trace.route is Route.COLOCATED and isinstance(replies[0], JsonReply)


def test_router_shipped_by_value_registers_where_the_ingress_looks():
    """Serve ships the request router class by value (its config cloudpickles the router's module by value).
    Regression: the router registered itself in a module-level dict of that copy, so the ingress never saw its
    pools (every attempt went untargeted: no probe, no queue-aware deadline, a second wait on a frozen replica)."""
    import types

    from ray.serve.config import RequestRouterConfig

    from deployments.routing import pools

    config = RequestRouterConfig(request_router_class="deployments.routing.router:PDRequestRouter")
    shipped = config.get_request_router_class()  # what Serve's handles instantiate
    stub = types.SimpleNamespace(_deployment_id=types.SimpleNamespace(name="PrefillServer"),
                                 pool_view=lambda: {"p-live": ReplicaLoad()})
    try:
        shipped.initialize_state(stub, policy="least_loaded")
        assert pools.pool_view("PrefillServer") == {"p-live": ReplicaLoad()}
    finally:
        pools.ROUTERS.pop("PrefillServer", None)


def test_router_gives_each_call_the_replica_chosen_for_it():
    """Regression (seen in CI): with Serve's FIFOMixin a replica chosen for one call went to whichever call had
    waited longest, so under contention a call the ingress sent to a healthy replica ran on a frozen one (held ~100 s,
    while the ingress probed the healthy one) or on a dead one (its failure blamed on the healthy one). Serve's base
    router hands the replica to the call it was chosen for."""
    from ray.serve.request_router import FIFOMixin, RequestRouter

    from deployments.routing.router import PDRequestRouter

    assert not issubclass(PDRequestRouter, FIFOMixin)
    assert PDRequestRouter._fulfill_next_pending_request is RequestRouter._fulfill_next_pending_request


def test_requests_between_two_load_reports_are_spread_not_sent_to_one_replica():
    """Replicas report their load once a second; every request sent since is missing from the reports. The pool's
    policy ranks by what the ingress itself has in flight, so a burst of streams alternates between two idle
    replicas instead of all going to the one that looked least loaded at the last report."""
    _, decode = pools(num_decode=2)
    ingress = fake_ingress(None, decode, FAST)

    async def go():
        opened = []
        for _ in range(4):  # each stream stays open (its first reply read) while the next one is routed
            trace = Trace(request_id="t", model=ingress.model_name, timeout_s=30)
            req = inspect("completions", SHORT | {"stream": True}, ingress.model_name, ingress.settings.limits,
                          ingress.settings.engine.max_model_len)
            stream = ingress.serve_request(req, trace)
            await anext(stream)
            opened.append(stream)
        assert ingress.ledger.streams == {"d1": 2, "d2": 2}
        for stream in opened:
            await stream.aclose()
        assert ingress.ledger.streams == {}, "a closed stream leaves the ledger"

    asyncio.run(go())
    assert [replica for replica, _ in decode.calls] == ["d1", "d2", "d1", "d2"]
