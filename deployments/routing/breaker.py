"""Circuit breaker per replica: a replica that keeps failing is taken out of rotation, then probed back."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _State:
    consecutive_failures: int = 0
    open_until: float = 0.0
    probe_until: float = 0.0  # a probe request is in flight until then


class CircuitBreaker:
    def __init__(self, failure_threshold: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic):
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._states: dict[str, _State] = {}

    def record_success(self, replica: str) -> None:
        self._states.pop(replica, None)

    def record_failure(self, replica: str) -> None:
        state = self._states.setdefault(replica, _State())
        state.consecutive_failures += 1
        state.probe_until = 0.0
        if state.consecutive_failures >= self.failure_threshold:
            state.open_until = self._clock() + self.cooldown_s

    def excluded(self) -> frozenset[str]:
        """Replicas out of rotation now. After the cooldown one request may probe a replica (half-open):
        success closes the breaker, failure opens it for another cooldown."""
        now, out = self._clock(), set()
        for replica, state in self._states.items():
            if state.open_until > now or state.probe_until > now:
                out.add(replica)
            elif state.open_until:
                state.probe_until = now + self.cooldown_s  # this caller is the probe; others wait for it
        return frozenset(out)

    def is_open(self, replica: str) -> bool:
        state = self._states.get(replica)
        return bool(state and state.open_until > self._clock())
