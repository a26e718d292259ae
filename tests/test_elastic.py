"""Elastic mode: the pure pair choice (deployments/routing/elastic.py), the ingress's ledger, and the request path
over one fake pool whose engines play both phases (tests/fakes.py). The real-cluster test is in test_e2e_outputs."""

from __future__ import annotations

from dataclasses import replace

import pytest

from deployments.config import SettingsError, parse_settings
from deployments.outcomes import Failure, Route, RouteReason
from deployments.routing import ReplicaLoad
from deployments.routing.elastic import ElasticLimits, choose_pair
from deployments.routing.ledger import Ledger
from tests.fakes import DIE, KV_TIMEOUT, FakePool, fake_elastic_ingress
from tests.test_request_path import FAST, LONG, SHORT, serve

LIMITS = ElasticLimits(itl_target_s=0.1, ttft_target_s=5.0, min_remote_prefill_tokens=128, max_streams_per_engine=4)
SPEED = 1000.0  # prompt tokens per second


def load(running=0, waiting=0, tokens=0, kv=0.0) -> ReplicaLoad:
    """``running``: decoding streams (past their first token); ``waiting``: streams before it."""
    return ReplicaLoad(num_running=running, num_waiting=waiting, num_outstanding_prompt_tokens=tokens,
                       kv_cache_usage=kv)


def pair(d) -> tuple:
    return d.route, d.reason, d.prefill, d.decode


def test_short_prompts_are_packed_onto_the_busiest_engine_with_room():
    d = choose_pair(50, {"a": load(running=3), "b": load(running=1)}, SPEED, LIMITS)
    assert pair(d) == (Route.LOCAL_PREFILL, RouteReason.SHORT_PROMPT, None, "a")
    d = choose_pair(50, {"a": load(running=3, waiting=1), "b": load(running=1)}, SPEED, LIMITS)
    assert pair(d)[3] == "b", "a holds 4 streams, the most packing allows: the next engine takes it"
    d = choose_pair(50, {"a": load(running=2, kv=0.95), "b": load(running=1)}, SPEED, LIMITS)
    assert pair(d)[3] == "b", "a has no KV cache left"


def test_long_prompt_with_every_engine_idle_is_served_whole():
    d = choose_pair(1500, {"a": load(), "b": load()}, SPEED, LIMITS)
    assert pair(d) == (Route.LOCAL_PREFILL, RouteReason.NO_STREAMS_TO_STALL, None, "a")  # a tie: by name


def test_long_prompt_with_no_decoding_stream_anywhere_goes_to_the_engine_that_prefills_it_sooner():
    """b is busy prefilling another long prompt, a is idle: no stream is stalled either way, a is sooner."""
    d = choose_pair(1500, {"a": load(), "b": load(waiting=1, tokens=1300)}, SPEED, LIMITS)
    assert pair(d) == (Route.LOCAL_PREFILL, RouteReason.NO_STREAMS_TO_STALL, None, "a")


def test_long_prompt_is_prefilled_on_the_quietest_engine_and_decoded_where_streams_are_packed():
    """Prefilling where the streams run would stall them 1.5 s, past the 0.1 s ITL target: the engine with the
    fewest decoding streams prefills, the busiest one with room decodes."""
    d = choose_pair(1500, {"a": load(running=1), "b": load(running=3), "c": load(running=2)}, SPEED, LIMITS)
    assert pair(d) == (Route.DISAGGREGATED, RouteReason.ITL_PROTECTED, "a", "b")


def test_prefill_engine_ties_on_decoding_streams_go_to_the_one_that_finishes_sooner():
    """a and b each decode one stream; a is also prefilling 3000 tokens: b prefills, c (packed) decodes."""
    loads = {"a": load(running=1, tokens=3000), "b": load(running=1), "c": load(running=3)}
    assert pair(choose_pair(1000, loads, SPEED, LIMITS)) == (Route.DISAGGREGATED, RouteReason.ITL_PROTECTED, "b", "c")


def test_an_engine_whose_streams_all_wait_for_their_first_token_takes_the_prompt_whole_within_the_ttft_target():
    """a's three streams are all still being prefilled: nothing there decodes, so it prefills this prompt too
    (done in 3 s behind its queue, within the TTFT target) and streams it, packed with its others; no KV moves.
    Behind 4500 queued tokens it would be done past the target: a takes it, b decodes (its streams are not
    stalled, and no pull waits on b)."""
    d = choose_pair(1000, {"a": load(waiting=3, tokens=2000), "b": load(running=2)}, SPEED, LIMITS)
    assert pair(d) == (Route.LOCAL_PREFILL, RouteReason.NO_STREAMS_TO_STALL, None, "a")
    d = choose_pair(1000, {"a": load(waiting=3, tokens=4500), "b": load(running=2)}, SPEED, LIMITS)
    assert pair(d)[:2] != (Route.LOCAL_PREFILL, RouteReason.NO_STREAMS_TO_STALL)


def test_prompt_whose_stall_is_within_the_itl_target_is_served_whole():
    d = choose_pair(200, {"a": load(running=2), "b": load(running=2)}, 10_000.0, LIMITS)
    assert pair(d)[:3] == (Route.LOCAL_PREFILL, RouteReason.STALL_WITHIN_SLO, None)


def test_moving_the_prefill_to_an_engine_with_as_many_decoding_streams_saves_no_stall():
    d = choose_pair(1000, {"a": load(running=2), "b": load(running=2)}, SPEED, LIMITS)
    assert pair(d) == (Route.LOCAL_PREFILL, RouteReason.NO_QUIETER_ENGINE, None, "a")


def test_a_quieter_engine_too_busy_to_prefill_in_time_keeps_the_prefill_local():
    """a is prefilling 5000 tokens: this prompt would be done there in 6 s, past the 5 s TTFT target and later than
    on b (1 s). At 2000 tokens queued (3 s) it is later than b but within the TTFT target: a takes it."""
    d = choose_pair(1000, {"a": load(running=1, tokens=5000), "b": load(running=2)}, SPEED, LIMITS)
    assert pair(d) == (Route.LOCAL_PREFILL, RouteReason.PREFILL_OVERLOADED, None, "b")
    d = choose_pair(1000, {"a": load(running=1, tokens=2000), "b": load(running=2)}, SPEED, LIMITS)
    assert pair(d) == (Route.DISAGGREGATED, RouteReason.ITL_PROTECTED, "a", "b")


def test_a_full_decode_engine_spills_onto_the_quieter_one():
    """b holds 4 streams, the most packing allows: a serves the request whole. With 3, b still decodes it."""
    d = choose_pair(1000, {"a": load(running=1), "b": load(running=4)}, SPEED, LIMITS)
    assert pair(d) == (Route.LOCAL_PREFILL, RouteReason.BALANCE_STREAMS, None, "a")
    d = choose_pair(1000, {"a": load(running=1), "b": load(running=3)}, SPEED, LIMITS)
    assert pair(d) == (Route.DISAGGREGATED, RouteReason.ITL_PROTECTED, "a", "b")


def test_an_engine_whose_streams_run_slow_takes_no_more_streams():
    """a holds 2 streams, under the count limit of 4, but they see 70 ms between tokens, past 0.6 of the 0.1 s ITL
    target: the next stream goes to b. At 50 ms a still has room and packing keeps it there."""
    slow = {"a": replace(load(running=2), itl_s=0.07), "b": load(running=1)}
    assert pair(choose_pair(50, slow, SPEED, LIMITS))[3] == "b"
    fast = {"a": replace(load(running=2), itl_s=0.05), "b": load(running=1)}
    assert pair(choose_pair(50, fast, SPEED, LIMITS))[3] == "a"
    # a long prompt whose decode engine is slow: the prefill engine takes it whole, as when the decode one is full
    d = choose_pair(1000, {"a": load(running=1), "b": replace(load(running=2), itl_s=0.08)}, SPEED, LIMITS)
    assert pair(d) == (Route.LOCAL_PREFILL, RouteReason.BALANCE_STREAMS, None, "a")


def test_engine_without_kv_room_never_prefills_or_decodes_for_another():
    """a decodes nothing but its KV cache is full: it cannot hold a hand-off nor a stream, so b, the next quietest,
    prefills and c decodes."""
    loads = {"a": load(waiting=3, kv=0.95), "b": load(running=1), "c": load(running=2)}
    assert pair(choose_pair(1000, loads, SPEED, LIMITS)) == (Route.DISAGGREGATED, RouteReason.ITL_PROTECTED, "b", "c")
    full = {"a": load(running=1, kv=0.95), "b": load(running=2, kv=0.97)}
    assert pair(choose_pair(1000, full, SPEED, LIMITS)) == (Route.LOCAL_PREFILL, RouteReason.PREFILL_UNAVAILABLE,
                                                            None, "a")


def test_excluded_engines_are_never_chosen_and_no_engine_means_the_router_picks():
    loads = {"a": load(running=1), "b": load(running=2)}
    assert pair(choose_pair(1000, loads, SPEED, LIMITS, exclude={"b"})) == (
        Route.LOCAL_PREFILL, RouteReason.PREFILL_UNAVAILABLE, None, "a")
    assert pair(choose_pair(1000, loads, SPEED, LIMITS, exclude={"a", "b"})) == (
        Route.LOCAL_PREFILL, RouteReason.PREFILL_UNAVAILABLE, None, None)


def test_pool_drifts_into_a_prefill_engine_and_a_decode_engine_then_spills():
    """Replaying the rule on its own bookings: a run of long prompts, then short ones."""
    ledger, reported = Ledger(), {"a": load(), "b": load()}
    routes = []
    for tokens in [1500] * 6 + [50] * 3:
        d = choose_pair(tokens, ledger.loads(reported), SPEED, LIMITS)
        ledger.add(d.decode, streams=1)
        routes.append((d.prefill, d.decode))
    # the first is served whole (nothing to stall); then b prefills what a decodes, as static PD would, until a
    # holds 4 streams: from there b takes streams too, and short prompts pack onto b until it is full as well
    assert routes == [(None, "a"), ("b", "a"), ("b", "a"), ("b", "a"), (None, "b"), (None, "b"), (None, "b"),
                      (None, "b"), (None, "a")]
    assert ledger.streams == {"a": 5, "b": 4}  # both full: the least loaded (a tie, by name) takes the last one


def test_ledger_counts_streams_and_prompt_tokens_as_sent_and_kv_usage_as_reported():
    ledger = Ledger()
    ledger.add("a", streams=2, prompt_tokens=1500)
    loads = ledger.loads({"a": load(kv=0.3), "b": load(running=3, tokens=800)})  # b's report is stale
    assert (loads["a"].num_running, loads["a"].num_outstanding_prompt_tokens, loads["a"].kv_cache_usage) == (2, 1500,
                                                                                                           0.3)
    assert (loads["b"].num_running, loads["b"].num_outstanding_prompt_tokens) == (0, 0)
    # the fresh bookings make b the quiet engine: it prefills the next long prompt, a (packed) decodes it, its pull
    # waiting for a's 1500 queued tokens (1.5 s, within the TTFT target); past the target b would serve it whole
    assert pair(choose_pair(1000, loads, SPEED, LIMITS))[2:] == ("b", "a")
    late = loads | {"a": replace(loads["a"], num_outstanding_prompt_tokens=4500)}
    assert pair(choose_pair(1000, late, SPEED, LIMITS))[1:] == (RouteReason.PULL_WOULD_WAIT, None, "b")
    ledger.add("a", streams=1, waiting=1)  # a third stream, before its first token
    assert (ledger.loads({"a": load()})["a"].num_running, ledger.loads({"a": load()})["a"].num_waiting) == (2, 1)
    ledger.add("a", streams=-3, waiting=-1, prompt_tokens=-1500)
    ledger.add(None, streams=1)  # the router chose: nothing to book
    assert ledger.streams == {} and ledger.prompt_tokens == {}
    assert set(ledger.loads({"b": load()})) == {"b"}  # only live engines


# ---- predictions: TTFT, stalls, pulls that would wait (issue: elastic at least as good as its static shapes) ----

def test_no_hand_off_to_a_decode_engine_busy_with_its_own_prefill_past_the_ttft_target():
    """a decodes 3 streams and is prefilling another 4500 tokens (4.5 s): a pull to a would wait behind that, past
    what this prompt's 1 s prefill leaves of the 5 s TTFT target (the old rule sent the hand-off there anyway;
    measured: pulls p90 3.2 s). b, idle, serves the prompt whole; with a third engine c decoding and free of
    prefill work, b prefills and c pulls. Behind 2000 tokens (2 s) the first token still comes in time: b
    prefills, a pulls, and the streams stay packed on a (refusing every wait spreads them over both engines,
    where each one's local prefills stall the other's: run K)."""
    busy = {"a": load(running=3, tokens=4500), "b": load()}
    assert pair(choose_pair(1000, busy, SPEED, LIMITS)) == (Route.LOCAL_PREFILL, RouteReason.PULL_WOULD_WAIT,
                                                            None, "b")
    three = busy | {"c": load(running=2)}
    assert pair(choose_pair(1000, three, SPEED, LIMITS)) == (Route.DISAGGREGATED, RouteReason.ITL_PROTECTED, "b",
                                                             "c")
    near = {"a": load(running=3, tokens=2000), "b": load()}
    assert pair(choose_pair(1000, near, SPEED, LIMITS)) == (Route.DISAGGREGATED, RouteReason.ITL_PROTECTED, "b", "a")
    strict = replace(LIMITS, max_pull_wait_s=0.5)  # routing.elastic_max_pull_wait_s: a fixed bound instead
    assert pair(choose_pair(1000, near, SPEED, strict)) == (Route.LOCAL_PREFILL, RouteReason.PULL_WOULD_WAIT, None,
                                                            "b")


def test_of_several_prefill_engines_the_one_with_the_soonest_first_token_is_chosen():
    """b and c decode nothing but both hold prefill work (2 s and 0.5 s): c's prefill is done sooner."""
    loads = {"a": load(running=2), "b": load(tokens=2000), "c": load(tokens=500)}
    assert pair(choose_pair(1000, loads, SPEED, LIMITS))[2:] == ("c", "a")


def test_the_predicted_pull_time_counts_toward_the_ttft():
    """a decodes 2 streams, b none. A hand-off whose pull takes 0.2 s keeps a's streams smooth: b prefills, a
    pulls. One whose pull alone takes 4.5 s would miss the 5 s TTFT target: b serves the prompt whole instead.
    The pull time comes from a's own measured pull speed, or, before a measured any, the assumed ``transfer_s``."""
    loads = {"a": load(running=2), "b": load()}
    assert pair(choose_pair(1000, loads, SPEED, LIMITS, transfer_s=0.2)) == (Route.DISAGGREGATED,
                                                                             RouteReason.ITL_PROTECTED, "b", "a")
    assert pair(choose_pair(1000, loads, SPEED, LIMITS, transfer_s=4.5)) == (Route.LOCAL_PREFILL,
                                                                             RouteReason.NO_STREAMS_TO_STALL, None,
                                                                             "b")
    slow_link = loads | {"a": replace(load(running=2), kv_pull_tokens_per_s=200.0)}  # 5 s for 1000 tokens
    assert pair(choose_pair(1000, slow_link, SPEED, LIMITS, transfer_s=0.2))[3] == "b"
    fast_link = loads | {"a": replace(load(running=2), kv_pull_tokens_per_s=20_000.0)}
    assert pair(choose_pair(1000, fast_link, SPEED, LIMITS, transfer_s=4.5))[2:] == ("b", "a")


def test_when_no_option_meets_both_targets_the_fewest_predicted_misses_win():
    """a decodes 3 streams; b decodes 1 and holds 4500 tokens of prefill: served whole on a, 3 streams stall past
    the ITL target; prefilled on b, the first token comes at 5.5 s (a TTFT miss) and b's one stream stalls: 2
    misses. The hand-off wins (the old rule kept it on a: prefill_overloaded)."""
    loads = {"a": load(running=3), "b": load(running=1, tokens=4500)}
    assert pair(choose_pair(1000, loads, SPEED, LIMITS)) == (Route.DISAGGREGATED, RouteReason.ITL_PROTECTED, "b",
                                                             "a")


def test_a_stall_within_a_streams_measured_slack_is_no_miss_when_the_budget_share_is_set():
    """a's 2 streams see 20 ms between tokens against the 100 ms target, over 64 output tokens on average: with
    half their slack as budget (2.56 s) a 2 s prefill there costs nothing, so a serves it whole. Without the share
    (the default), or on an engine nearer the target (50 ms: 1.6 s of budget), the prompt is prefilled elsewhere."""
    slack = replace(LIMITS, mean_output_tokens=64, stall_budget_share=0.5)
    loads = {"a": replace(load(running=2), itl_s=0.02), "b": load()}
    assert pair(choose_pair(2000, loads, SPEED, slack)) == (Route.LOCAL_PREFILL, RouteReason.STALL_WITHIN_SLO, None,
                                                            "a")
    assert pair(choose_pair(2000, loads, SPEED, LIMITS))[:3] == (Route.DISAGGREGATED, RouteReason.ITL_PROTECTED, "b")
    near = {"a": replace(load(running=2), itl_s=0.05), "b": load()}
    assert pair(choose_pair(2000, near, SPEED, slack))[:3] == (Route.DISAGGREGATED, RouteReason.ITL_PROTECTED, "b")


def test_observed_speeds_are_moving_averages_of_what_requests_measured():
    from deployments.routing.elastic import Observed

    seen = Observed()
    seen.record_output(64)
    seen.record_output(0)  # nothing streamed: not an observation
    assert seen.mean_output_tokens == 64
    seen.record_output(14)
    assert seen.mean_output_tokens == pytest.approx(54)


def test_elastic_settings_need_their_one_pool():
    s = parse_settings({"mode": "elastic", "elastic": {"num_replicas": 2}})
    assert s.elastic.num_replicas == 2
    with pytest.raises(SettingsError, match="pool 'prefill' is not valid with mode 'elastic'"):
        parse_settings({"mode": "elastic", "elastic": {}, "prefill": {}})


# ---- the request path on one fake pool ---------------------------------------------------------------------

# Prefill speed assumed by the path tests: 1000 tokens/s, so a ~500-token prompt stalls streams 0.5 s (> ITL 0.1 s).
PATH = {"routing": FAST["routing"] | {"prefill_tokens_per_s": 1000, "prefill_timeout_s": 1.0},
        "slo": {"itl_s": 0.1}}


BUSY = {"e1": 1, "e2": 4, "e3": 2}  # streams per engine: a long prompt is prefilled on e1 and decoded on e2


def elastic(streams: dict[str, int]):
    """A fake pool and an elastic ingress whose ledger already holds ``streams`` (other clients' requests)."""
    pool = FakePool(list(streams))
    ingress = fake_elastic_ingress(pool, PATH)
    for replica, n in streams.items():
        ingress.ledger.add(replica, streams=n)
    return pool, ingress


def settled(ingress, streams: dict[str, int]) -> bool:
    """The ledger is back to what it held before the test's requests: nothing booked was left behind."""
    return ingress.ledger.streams == streams and ingress.ledger.waiting == {} and ingress.ledger.prompt_tokens == {}


def prefills(pool: FakePool) -> list[str]:
    return [r for r, req in pool.calls if req.kv_transfer_params and req.kv_transfer_params.get("do_remote_decode")]


def decodes(pool: FakePool) -> list[tuple[str, str | None]]:
    """(replica, the engine its hand-off came from; None: it prefilled the prompt itself)."""
    return [(r, (req.kv_transfer_params or {}).get("remote_engine_id")) for r, req in pool.calls
            if not (req.kv_transfer_params or {}).get("do_remote_decode")]


def test_elastic_pair_prefills_on_one_engine_and_decodes_on_another():
    pool, ingress = elastic(BUSY)
    replies, trace = serve(ingress, LONG | {"stream": True})
    assert (trace.route, trace.reason) == (Route.DISAGGREGATED, RouteReason.ITL_PROTECTED)
    assert prefills(pool) == ["e1"] and decodes(pool) == [("e2", "e-e1")]
    h = trace.headers()
    assert (h["x-pdserve-prefill-replica"], h["x-pdserve-decode-replica"]) == ("e1", "e2")
    assert h["x-pdserve-route-reason"] == "itl_protected"
    assert replies[-1] == "data: [DONE]\n\n"
    assert settled(ingress, BUSY)


def test_elastic_short_prompt_is_served_whole_by_one_engine():
    pool, ingress = elastic(BUSY)
    _, trace = serve(ingress, SHORT)
    assert (trace.route, trace.reason) == (Route.LOCAL_PREFILL, RouteReason.SHORT_PROMPT)
    assert prefills(pool) == [] and decodes(pool) == [("e2", None)]  # packed onto the busiest engine


def test_elastic_prefill_engine_dying_retries_on_another_engine_but_never_the_decode_one():
    pool, ingress = elastic(BUSY)
    pool.script["e1"] = [DIE]
    _, trace = serve(ingress, LONG)
    assert prefills(pool) == ["e1", "e3"] and decodes(pool) == [("e2", "e-e3")]
    assert trace.fallbacks == [Failure.PREFILL_REPLICA_DIED] and trace.route is Route.DISAGGREGATED
    # one breaker for both phases: the dead engine is out as a decode engine too
    assert "e1" in ingress.decode.pool.breaker.excluded()
    assert settled(ingress, BUSY)


def test_elastic_every_other_engine_failing_prefills_on_the_decode_engine():
    pool, ingress = elastic({"e1": 1, "e2": 2})
    pool.script["e1"] = [DIE]
    _, trace = serve(ingress, LONG)
    assert prefills(pool) == ["e1"] and decodes(pool) == [("e2", None)]
    assert (trace.route, trace.reason) == (Route.LOCAL_PREFILL, RouteReason.PREFILL_FAILED)


def test_elastic_decode_engine_dying_before_its_first_token_is_retried_with_a_local_prefill():
    """One pull per hand-off: the engine that died may have pulled the KV, so the retry prefills itself."""
    pool, ingress = elastic(BUSY)
    pool.script["e2"] = [DIE]
    _, trace = serve(ingress, LONG)
    assert prefills(pool) == ["e1"]
    [(first, source_first), (second, source)] = decodes(pool)
    assert first == "e2" and source_first == "e-e1" and second != "e2" and source is None
    assert trace.fallbacks == [Failure.DECODE_REPLICA_DIED]
    assert (trace.route, trace.reason) == (Route.LOCAL_PREFILL, RouteReason.KV_HANDOFF_SPENT)
    assert settled(ingress, BUSY)


def test_elastic_failed_pull_prefills_on_the_decode_engine_and_blames_the_prefill_engine():
    pool, ingress = elastic(BUSY)
    pool.script["e2"] = [KV_TIMEOUT, "ok"]
    _, trace = serve(ingress, LONG)
    assert decodes(pool) == [("e2", "e-e1"), ("e2", None)]
    assert (trace.route, trace.reason) == (Route.LOCAL_PREFILL, RouteReason.KV_PULL_FAILED)
    assert ingress.prefill.pool.breaker is ingress.decode.pool.breaker
    assert "e1" in ingress.decode.pool.breaker.excluded()  # threshold 1 in these tests


def test_recent_mean_is_the_mean_of_what_was_observed_since_the_last_reading():
    from deployments.engine.vllm_engine import RecentMean

    itl = RecentMean()
    assert itl.update(0.0, 0) == 0.0
    assert itl.update(1.0, 10) == pytest.approx(0.1)
    assert itl.update(1.0, 10) == 0.0, "no token since the last reading: nothing to report"
    assert itl.update(2.0, 30) == pytest.approx(0.05)
