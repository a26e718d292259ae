"""The KV pull deadline: the pure formula, and the engine-client wrapper that applies it (with a fake client)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from deployments.config import parse_settings
from deployments.engine.vllm_engine import PULL, KVPullTimeout, PullOutcome, _KVPullDeadline
from deployments.kv import Handoff, PullDeadline, decode_request

GB = 1e9


def test_deadline_grows_with_bytes_and_the_first_handshake_and_stops_at_the_cap():
    d = PullDeadline(base_s=2, factor=4, assumed_bytes_per_s=1 * GB, first_handshake_s=5, cap_s=60)
    assert d.seconds(0, None, first_contact=False) == 2
    assert d.seconds(int(2.5 * GB), None, first_contact=False) == pytest.approx(12)  # 2 + 4 x 2.5 s
    assert d.seconds(int(2.5 * GB), None, first_contact=True) == pytest.approx(17)
    assert d.seconds(int(2.5 * GB), 10 * GB, first_contact=False) == pytest.approx(3)  # measured: 10 GB/s
    assert d.seconds(int(100 * GB), None, first_contact=True) == 60


def test_settings_build_the_deadline_and_keep_its_cap_below_the_lease():
    routing = {"kv_pull_timeout_s": 50, "kv_lease_s": 120, "kv_pull_bytes_per_s": 5e9}
    d = parse_settings({"mode": "colocated", "colocated": {}, "routing": routing}).routing.pull_deadline()
    assert (d.cap_s, d.assumed_bytes_per_s, d.base_s, d.first_handshake_s) == (50, 5e9, 5.0, 5.0)


class FakeEngineClient:
    """Stands in for vLLM's AsyncLLM: each generation yields its first output after ``delay_s``."""

    def __init__(self, delay_s: float):
        self.delay_s = delay_s

    async def _gen(self):
        await asyncio.sleep(self.delay_s)
        yield "first"
        yield "second"

    def generate(self, prompt, sampling_params, request_id):
        return self._gen()


def _pull(engine: str, num_blocks: int) -> PullOutcome:
    """A request's context as VLLMEngine.generate sets it for a decode request with this hand-off."""
    raw = {"do_remote_prefill": True, "remote_engine_id": engine, "remote_request_id": "r",
           "remote_block_ids": list(range(num_blocks)), "remote_host": "10.0.0.2", "remote_port": 5600}
    return PullOutcome(handoff=Handoff.parse(raw, "p1", expires_at=time.time() + 60, fingerprint="fp"))


SAMPLING = SimpleNamespace(extra_args=None)  # the hand-off reaches the client through the request's PullOutcome


async def _collect(agen) -> list:
    return [x async for x in agen]


async def _in_request(outcome: PullOutcome, generate) -> list:
    """As VLLMEngine.generate runs a request: its pull outcome set in its context, then vLLM calls the client."""
    PULL.set(outcome)
    return await _collect(generate())


def test_wrapper_gives_a_first_pull_its_handshake_allowance_then_measures_the_link():
    stats = {"vllm:nixl_bytes_transferred_sum": 0.0, "vllm:nixl_xfer_time_seconds_sum": 0.0}
    deadline = PullDeadline(base_s=0.05, factor=1, assumed_bytes_per_s=1e12, first_handshake_s=0.3, cap_s=5)
    client = _KVPullDeadline(FakeEngineClient(delay_s=0.2), deadline, kv_bytes_per_block=1000,
                             read_stats=lambda: stats)
    # First pull from engine P1: 0.05 s + the handshake allowance covers the 0.2 s first output.
    stats.update({"vllm:nixl_bytes_transferred_sum": 4e6, "vllm:nixl_xfer_time_seconds_sum": 0.002})
    assert asyncio.run(_in_request(_pull("P1", 4), lambda: client.generate("p", SAMPLING, "req-1"))) == [
        "first", "second"]
    assert client.known_engines == {"P1"} and client.bytes_per_s == pytest.approx(2e9)
    # P1 is known now: no allowance, and 0.05 s is too short for the same 0.2 s.
    outcome = _pull("P1", 4)
    with pytest.raises(KVPullTimeout):
        asyncio.run(_in_request(outcome, lambda: client.generate("p", SAMPLING, "req-2")))
    assert outcome.timed_out and outcome.recomputed is None


class FakeOutput:
    """The first RequestOutput vLLM yields: prompt token ids and how many of them were not computed here."""

    def __init__(self, num_prompt_tokens: int, num_cached_tokens: int):
        self.prompt_token_ids, self.num_cached_tokens = list(range(num_prompt_tokens)), num_cached_tokens


class FakeRecomputingClient(FakeEngineClient):
    def __init__(self, num_cached_tokens: int):
        super().__init__(delay_s=0)
        self.num_cached_tokens = num_cached_tokens

    async def _gen(self):
        yield FakeOutput(1000, self.num_cached_tokens)


@pytest.mark.parametrize("cached, delivered", [(1000, True), (999, True), (968, True), (64, False), (0, False)])
def test_a_pull_that_left_the_prompt_to_compute_is_reported_as_recomputed(cached, delivered):
    client = _KVPullDeadline(FakeRecomputingClient(cached), PullDeadline(), 1000, dict, block_size=32)
    outcome, other = _pull("P1", 32), _pull("P1", 32)
    asyncio.run(_in_request(outcome, lambda: client.generate("p", SAMPLING, "cmpl-req-0")))
    assert (outcome.recomputed is None) is delivered
    assert ("P1" in client.known_engines) is delivered  # only a delivered pull proves the handshake
    if not delivered:
        assert outcome.recomputed == (1000, cached)
    assert (other.recomputed, other.timed_out) == (None, False) and not outcome.timed_out  # this request only


def test_the_decode_hand_off_drops_the_prefill_sides_cached_token_count():
    handoff = Handoff.parse({
        "do_remote_prefill": True, "remote_engine_id": "e", "remote_request_id": "r", "remote_block_ids": [1],
        "remote_host": "h", "remote_port": 5600, "remote_prefill_cached_tokens": 512}, "p1", 0.0, "fp")
    assert "remote_prefill_cached_tokens" not in handoff.for_engine()
    assert decode_request("completions", {}, handoff).kv_transfer_params == handoff.for_engine()


def test_requests_without_a_handoff_are_not_wrapped():
    client = _KVPullDeadline(FakeEngineClient(delay_s=0), PullDeadline(cap_s=0.001), 1000, dict)
    assert asyncio.run(_collect(client.generate("p", SAMPLING, "req"))) == ["first", "second"]
    assert asyncio.run(_in_request(PullOutcome(), lambda: client.generate("p", SAMPLING, "req"))) == [
        "first", "second"]
