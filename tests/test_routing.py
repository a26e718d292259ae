"""Routing policies, conditional disaggregation and the circuit breaker on plain data (no cluster)."""

from deployments.routing import CircuitBreaker, ReplicaLoad, RouteRequest, decide_prefill
from deployments.routing.breaker import BreakerState
from deployments.routing.policies import (
    least_loaded,
    prefix_affinity,
    prefix_key,
    round_robin,
)

IDLE, BUSY = ReplicaLoad(), ReplicaLoad(num_running=6, num_waiting=3, kv_cache_usage=0.7)


def test_least_loaded_picks_the_idle_replica():
    stats = {"a": BUSY, "b": IDLE, "c": ReplicaLoad(num_running=1)}
    assert least_loaded(RouteRequest(), ["a", "b", "c"], stats) == ["b", "c", "a"]


def test_least_loaded_counts_outstanding_prompt_tokens():
    stats = {"a": ReplicaLoad(num_outstanding_prompt_tokens=4096), "b": ReplicaLoad(num_running=1)}
    assert least_loaded(RouteRequest(), ["a", "b"], stats)[0] == "b"


def test_round_robin_cycles_and_skips_excluded():
    picks = [round_robin(RouteRequest(seq=i), ["b", "a", "c"], {})[0] for i in range(6)]
    assert picks == ["a", "b", "c", "a", "b", "c"]
    assert round_robin(RouteRequest(seq=0, exclude=frozenset({"a"})), ["a", "b"], {}) == ["b"]


def test_prefix_affinity_sends_a_repeated_prefix_to_the_same_replica():
    candidates, stats = ["p1", "p2", "p3"], {"p1": IDLE, "p2": IDLE, "p3": IDLE}
    shared = "You are a support bot for ACME. Policy: " + "refunds within 30 days. " * 40
    keys = {prefix_key(shared + f"Question {i}?") for i in range(10)}
    assert len(keys) == 1  # the prefix, not the question, makes the key
    chosen = {prefix_affinity(RouteRequest(prefix_key=k), candidates, stats)[0] for k in keys}
    assert len(chosen) == 1
    spread = {prefix_affinity(RouteRequest(prefix_key=prefix_key(f"doc {i} " * 200)), candidates, stats)[0]
              for i in range(30)}
    assert spread == set(candidates)  # different prefixes spread over the pool


def test_prefix_affinity_yields_to_load_imbalance():
    key = prefix_key("some long shared system prompt " * 30)
    preferred = prefix_affinity(RouteRequest(prefix_key=key), ["a", "b"], {"a": IDLE, "b": IDLE})[0]
    other = "b" if preferred == "a" else "a"
    overloaded = ReplicaLoad(num_waiting=8, num_running=8)
    assert prefix_affinity(RouteRequest(prefix_key=key), ["a", "b"], {preferred: overloaded, other: IDLE})[0] == other



def test_decide_prefill():
    assert decide_prefill(20, [IDLE], 128, 8).reason == "short_prompt"
    assert decide_prefill(2000, [IDLE], 128, 8).route == "disaggregated"
    assert decide_prefill(2000, [], 128, 8).reason == "prefill_unavailable"
    assert decide_prefill(2000, [ReplicaLoad(num_waiting=9)], 128, 8).reason == "prefill_overloaded"
    assert decide_prefill(2000, [ReplicaLoad(num_waiting=9), IDLE], 128, 8).route == "disaggregated"


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_breaker_opens_after_threshold_and_probes_back():
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=2, cooldown_s=10, clock=clock)
    breaker.record_failure("p1")
    assert breaker.excluded() == frozenset()  # one failure is not a pattern
    breaker.record_failure("p1")
    assert breaker.excluded() == {"p1"} and breaker.is_open("p1")
    clock.now += 11
    assert breaker.excluded() == frozenset()  # cooldown over: p1 may be tried again ...
    assert breaker.excluded() == frozenset()  # ... and reading that twice takes no probe slot
    breaker.on_attempt("p1")  # an attempt really targets p1: it is the probe ...
    assert breaker.excluded() == {"p1"} and breaker.state("p1") is BreakerState.HALF_OPEN  # ... the others wait
    breaker.record_success("p1")
    assert breaker.excluded() == frozenset() and breaker.state("p1") is BreakerState.CLOSED


def test_breaker_probe_slot_not_taken_by_readers():
    """Regression: reading the live view (``excluded``) used to take the half-open slot, and the attempt that
    followed excluded the replica again, so a tripped replica never came back while another was healthy."""
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=5, clock=clock)
    breaker.record_failure("p1")
    clock.now += 6
    for _ in range(3):  # routing decisions and live-load views read the breaker several times per request
        assert "p1" not in breaker.excluded()
    breaker.on_attempt("p1")
    breaker.record_success("p1")
    assert breaker.state("p1") is BreakerState.CLOSED


def test_breaker_lost_probe_frees_its_slot():
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=5, clock=clock)
    breaker.record_failure("p1")
    clock.now += 6
    breaker.on_attempt("p1")  # the probe never reports back (its caller was cancelled)
    clock.now += 6
    assert "p1" not in breaker.excluded()
    breaker.on_attempt("p1")
    assert breaker.excluded() == {"p1"}


def test_breaker_failed_probe_reopens():
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=5, clock=clock)
    breaker.record_failure("d1")
    clock.now += 6
    assert "d1" not in breaker.excluded()
    breaker.on_attempt("d1")
    breaker.record_failure("d1")
    assert breaker.is_open("d1")
