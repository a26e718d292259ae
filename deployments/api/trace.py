"""One request's record: the route it took, the replicas that served it, failures survived, and its timeline.

The timeline is wall-clock (``time.time()``) stamps taken at the ingress and on the replicas; its four phases
partition the request exactly, so queue + prefill + transfer + decode equals the ingress's end-to-end time:

    arrived ─queue─▶ prefill started ─prefill─▶ finished ─transfer─▶ received ─queue─▶ decode started
            ─transfer (KV pull + first step)─▶ first token ─decode─▶ finished

With local prefill (short prompt, colocated mode, or a failed hand-off) the decode replica's time to its first
token is prefill and there is no transfer. Time spent on failed attempts counts as queue.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from ..outcomes import Failure, Phase, Route, RouteReason


@dataclass
class Trace:
    request_id: str
    model: str
    timeout_s: float = 600.0  # the end-to-end deadline, from arrival
    client_request_id: str | None = None  # the id the client sent (x-request-id): recorded, never pdserve's own
    route: Route = Route.COLOCATED
    reason: RouteReason = RouteReason.COLOCATED_MODE
    prefill_replica: str | None = None
    decode_replica: str | None = None
    prefill_node: str | None = None  # Ray node addresses of the replicas above
    decode_node: str | None = None
    attempts: dict[Phase, int] = field(default_factory=lambda: dict.fromkeys(Phase, 0))
    fallbacks: list[Failure] = field(default_factory=list)
    arrived_at: float = field(default_factory=time.time)
    prefill_started_at: float | None = None
    prefill_finished_at: float | None = None
    prefill_received_at: float | None = None
    decode_started_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    kv_bytes: int = 0
    token_gaps_s: list[float] = field(default_factory=list)
    engine_mean_itl_s: float | None = None  # non-streaming: the decode engine's own mean inter-token latency

    def remaining_s(self) -> float:
        """Seconds left before the request's end-to-end deadline."""
        return self.arrived_at + self.timeout_s - time.time()

    def prefill_locally(self, reason: RouteReason) -> None:
        """The prompt is prefilled on the decode replica: from the start, or after the hand-off was abandoned."""
        self.route, self.reason = Route.LOCAL_PREFILL, reason
        self.prefill_started_at = self.prefill_finished_at = self.prefill_received_at = None
        self.prefill_replica, self.prefill_node, self.kv_bytes = None, None, 0

    @property
    def num_retries(self) -> int:
        return sum(max(0, n - 1) for n in self.attempts.values())

    def headers(self) -> dict[str, str]:
        h = {"x-pdserve-request-id": self.request_id, "x-pdserve-route": str(self.route),
             "x-pdserve-route-reason": str(self.reason), "x-pdserve-retries": str(self.num_retries)}
        if self.prefill_replica:
            h["x-pdserve-prefill-replica"] = self.prefill_replica
        if self.decode_replica:
            h["x-pdserve-decode-replica"] = self.decode_replica
        if self.prefill_node:
            h["x-pdserve-prefill-node"] = self.prefill_node
        if self.decode_node:
            h["x-pdserve-decode-node"] = self.decode_node
        if self.client_request_id:
            h["x-pdserve-client-request-id"] = self.client_request_id
        if self.fallbacks:
            h["x-pdserve-fallback"] = ",".join(map(str, self.fallbacks))
        return h

    def breakdown(self) -> dict[str, float]:
        """Seconds per phase; empty until the request finished."""
        if self.finished_at is None or self.decode_started_at is None:
            return {}
        first = self.first_token_at or self.finished_at
        out = {"e2e_s": self.finished_at - self.arrived_at, "ttft_s": first - self.arrived_at,
               "decode_s": self.finished_at - first}
        if self.prefill_started_at is not None:
            out["queue_s"] = ((self.prefill_started_at - self.arrived_at)
                              + (self.decode_started_at - self.prefill_received_at))
            out["prefill_s"] = self.prefill_finished_at - self.prefill_started_at
            out["transfer_s"] = (self.prefill_received_at - self.prefill_finished_at) + (first - self.decode_started_at)
        else:
            out["queue_s"] = self.decode_started_at - self.arrived_at
            out["prefill_s"] = first - self.decode_started_at
            out["transfer_s"] = 0.0
        if self.token_gaps_s:
            out["mean_itl_s"] = sum(self.token_gaps_s) / len(self.token_gaps_s)
        elif self.engine_mean_itl_s is not None:
            out["mean_itl_s"] = self.engine_mean_itl_s
        return {k: round(max(v, 0.0), 6) for k, v in out.items()}

    def timing(self) -> dict:
        """The breakdown plus who served the request: what clients get and what the log line says."""
        return self.breakdown() | {"route": str(self.route), "prefill_replica": self.prefill_replica,
                                   "decode_replica": self.decode_replica, "prefill_node": self.prefill_node,
                                   "decode_node": self.decode_node, "kv_bytes": self.kv_bytes}

    def timing_header(self) -> str:
        return json.dumps(self.timing(), separators=(",", ":"))
