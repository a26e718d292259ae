"""Circuit breaker per replica: a replica that keeps failing is taken out of rotation, then probed back.

    CLOSED ──threshold failures──▶ OPEN ──cooldown over──▶ (available) ──an attempt targets it──▶ HALF_OPEN
      ▲                                                                                            │
      └──────────────────────────────── success ◀──────────────────────────────────────────────────┤
                                        failure: OPEN for another cooldown ◀───────────────────────┘

Reading which replicas are out (``excluded``) changes nothing; only an attempt that really targets a replica
(``on_attempt``) takes its half-open probe slot, so a replica whose cooldown ended comes back even while
other replicas are healthy and win every ranking.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum


class BreakerState(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class _Replica:
    state: BreakerState = BreakerState.CLOSED
    consecutive_failures: int = 0
    until: float = 0.0  # OPEN: end of the cooldown; HALF_OPEN: end of the probe's slot


class CircuitBreaker:
    def __init__(self, failure_threshold: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic):
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._replicas: dict[str, _Replica] = {}

    def state(self, replica: str) -> BreakerState:
        r = self._replicas.get(replica)
        return r.state if r else BreakerState.CLOSED

    def record_success(self, replica: str) -> None:
        self._replicas.pop(replica, None)

    def record_failure(self, replica: str) -> None:
        r = self._replicas.setdefault(replica, _Replica())
        r.consecutive_failures += 1
        if r.state is BreakerState.HALF_OPEN or r.consecutive_failures >= self.failure_threshold:
            r.state, r.until = BreakerState.OPEN, self._clock() + self.cooldown_s

    def on_attempt(self, replica: str) -> None:
        """An attempt targets ``replica`` now: if its cooldown is over, this attempt is its probe."""
        r = self._replicas.get(replica)
        if r is not None and r.state is not BreakerState.CLOSED and r.until <= self._clock():
            r.state, r.until = BreakerState.HALF_OPEN, self._clock() + self.cooldown_s

    def excluded(self) -> frozenset[str]:
        """Replicas out of rotation now: open and cooling down, or half-open with their probe in flight.
        A probe that never reports back frees its slot after another cooldown."""
        now = self._clock()
        return frozenset(rid for rid, r in self._replicas.items()
                         if r.state is not BreakerState.CLOSED and r.until > now)

    def is_open(self, replica: str) -> bool:
        r = self._replicas.get(replica)
        return bool(r and r.state is BreakerState.OPEN and r.until > self._clock())
