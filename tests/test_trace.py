"""The per-request timing breakdown on plain timestamps (no cluster): its phases partition the request."""

from deployments.api.trace import Trace
from deployments.outcomes import Failure, Phase, Route, RouteReason


def _disaggregated() -> Trace:
    t = Trace(request_id="r", model="m", route=Route.DISAGGREGATED, arrived_at=100.0)
    t.prefill_started_at, t.prefill_finished_at, t.prefill_received_at = 100.2, 101.2, 101.25
    t.decode_started_at, t.first_token_at, t.finished_at = 101.4, 101.6, 103.6
    t.token_gaps_s = [0.1, 0.2, 0.3]
    return t


def test_disaggregated_phases_add_up_to_e2e():
    b = _disaggregated().breakdown()
    assert b["queue_s"] == 0.2 + 0.15 and b["prefill_s"] == 1.0
    assert round(b["transfer_s"], 6) == 0.05 + 0.2 and b["decode_s"] == 2.0
    assert round(b["queue_s"] + b["prefill_s"] + b["transfer_s"] + b["decode_s"], 6) == b["e2e_s"] == 3.6
    assert b["ttft_s"] == 1.6 and round(b["mean_itl_s"], 6) == 0.2


def test_local_prefill_has_no_transfer():
    t = Trace(request_id="r", model="m", route=Route.LOCAL_PREFILL, arrived_at=10.0)
    t.decode_started_at, t.first_token_at, t.finished_at = 10.1, 10.5, 11.0
    b = t.breakdown()
    assert (b["queue_s"], b["prefill_s"], b["transfer_s"], b["decode_s"]) == (0.1, 0.4, 0.0, 0.5)


def test_abandoned_handoff_counts_as_local_prefill():
    t = _disaggregated()
    t.prefill_locally(RouteReason.KV_PULL_FAILED)
    b = t.breakdown()
    assert t.route is Route.LOCAL_PREFILL and t.kv_bytes == 0 and t.prefill_replica is None
    assert b["transfer_s"] == 0.0 and round(b["queue_s"] + b["prefill_s"] + b["decode_s"], 6) == b["e2e_s"]


def test_unfinished_request_has_no_breakdown_and_headers_name_the_path():
    t = Trace(request_id="r", model="m", route=Route.DISAGGREGATED, reason=RouteReason.LONG_PROMPT,
              prefill_replica="p1", decode_replica="d1", attempts={Phase.PREFILL: 2, Phase.DECODE: 1},
              fallbacks=[Failure.PREFILL_TIMEOUT])
    assert t.breakdown() == {}
    assert t.headers() == {"x-pdserve-request-id": "r", "x-pdserve-route": "disaggregated",
                           "x-pdserve-route-reason": "long_prompt", "x-pdserve-retries": "1",
                           "x-pdserve-prefill-replica": "p1", "x-pdserve-decode-replica": "d1",
                           "x-pdserve-fallback": "prefill_timeout"}
