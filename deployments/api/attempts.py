"""One attempt executor for both phases: which replica to try next, what to record, when to stop.

The phase passes in what one attempt does and how its result reads (an ``AttemptResult``); the executor owns
the rest: replica choice (never a replica this request already failed on, never one the breaker holds out),
the breaker's half-open probe slot, the attempt count and the failures recorded on the trace.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from enum import Enum
from typing import Generic, TypeVar

from ..outcomes import Failure, Phase
from ..routing import CircuitBreaker, ReplicaLoad, RouteRequest
from ..routing.ledger import Ledger
from ..routing.policies import POLICIES
from .trace import Trace

T = TypeVar("T")


class Verdict(Enum):
    DONE = "done"  # the replica served the attempt: stop
    REFUSED = "refused"  # the request itself is invalid (4xx): stop, the replica did nothing wrong
    RETRY = "retry"  # try another replica
    STOP = "stop"  # stop without a result (pool full, deadline passed): the caller falls back


@dataclass(frozen=True)
class AttemptResult(Generic[T]):
    verdict: Verdict
    value: T | None = None
    failure: Failure | None = None  # recorded on the trace (x-pdserve-fallback, pdserve_fallbacks_total)
    replica_at_fault: bool = False  # counted by the circuit breaker
    replica: str | None = None  # the replica that answered, where the router chose it


class Pool:
    """A pool of engine replicas as the ingress sees it: live view, policy, breaker, and a liveness probe.

    ``view`` returns the live replicas and their loads as they last reported them (None before the pool's router
    exists in this process); ``probe`` asks one replica directly, past Serve's queues, how many requests it holds
    (None: no answer). ``ledger``: what this ingress has in flight on each replica (the phases book their
    attempts there), which the policy ranks by instead of the reports' lagging counts.
    """

    def __init__(self, policy: str, breaker: CircuitBreaker, view: Callable[[], dict[str, ReplicaLoad] | None],
                 probe: Callable[[str, float], Awaitable[int | None]], suspect_fallback: bool, ledger: Ledger):
        self.policy, self.breaker, self.ledger = policy, breaker, ledger
        self.view, self.probe = view, probe
        self.suspect_fallback = suspect_fallback  # every replica excluded: try the least suspect one anyway

    def live_loads(self) -> list[ReplicaLoad] | None:
        view = self.view()
        if view is None:
            return None
        excluded = self.breaker.excluded()
        return [load for rid, load in view.items() if rid not in excluded]

    def choose(self, route: RouteRequest, tried: set[str], held_out: frozenset[str]) -> tuple[bool, str | None]:
        """(go, target): whether to attempt at all, and on which replica (None: Serve's router chooses). A replica in
        ``held_out`` (by the breaker, when the request started), and then one in ``tried`` (this request failed there,
        or must avoid it), only as a last resort, where the pool allows it. A replica the ingress already chose for
        the request (``route.target``, elastic mode) comes first while it may be tried."""
        view = self.view()
        if view is None:  # no routing data yet in this process: Serve's router picks
            return True, None
        avoid = tried | held_out
        if route.target is not None and route.target in view and route.target not in avoid:
            return True, route.target
        loads = self.ledger.loads(view)
        ranked = POLICIES[self.policy](replace(route, exclude=frozenset(avoid)), list(view), loads)
        if ranked:
            return True, ranked[0]
        if not self.suspect_fallback:
            return False, None
        # Every replica held out by the breaker: better a suspect replica than no answer at all. Named, so that a
        # silent stream there gets it probed. None (Serve's router picks, even a replica this request already tried)
        # only when no other is left: a replica blamed for a probe it answered late gets its second chance.
        suspects = POLICIES[self.policy](replace(route, exclude=frozenset(tried)), list(view), loads)
        return True, suspects[0] if suspects else None


async def run_attempts(pool: Pool, phase: Phase, num_attempts: int, route: RouteRequest, trace: Trace,
                       attempt: Callable[[RouteRequest], Awaitable[AttemptResult[T]]]) -> AttemptResult[T] | None:
    """Up to ``num_attempts`` attempts, on distinct replicas while the pool has them, none of ``route.exclude``
    where the pool refuses suspects. None: no attempt succeeded or none was possible."""
    tried, held_out = set(route.exclude), pool.breaker.excluded()  # held out for the whole request, as it started
    for _ in range(num_attempts):
        if trace.remaining_s() <= 0:
            trace.fallbacks.append(Failure.DEADLINE_EXCEEDED)
            return AttemptResult(Verdict.STOP, failure=Failure.DEADLINE_EXCEEDED)
        go, target = pool.choose(route, tried, held_out)
        if not go:
            return None
        if target is not None:
            pool.breaker.on_attempt(target)
        trace.attempts[phase] += 1
        result = await attempt(replace(route, exclude=frozenset(tried | held_out), target=target))
        if result.failure is not None:
            trace.fallbacks.append(result.failure)
        target = target or result.replica
        if target is not None:
            if result.verdict in (Verdict.DONE, Verdict.REFUSED):
                pool.breaker.record_success(target)
            elif result.replica_at_fault:
                pool.breaker.record_failure(target)
            tried.add(target)
        if result.verdict is not Verdict.RETRY:
            return result
    return None
