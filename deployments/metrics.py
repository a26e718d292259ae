"""Every pdserve metric, defined in one place.

Published through Ray's metrics agent (``ray.util.metrics``), so one scrape target per Ray node
(``:8080/metrics``, KubeRay's convention) carries pdserve's metrics next to Ray Serve's and the engines' own
``vllm:*`` metrics (vLLM's Ray stat logger, labelled with the Serve replica id). Ray's exporter adds its
``ray_`` namespace to application metrics, so ``pdserve_requests_total`` is scraped as
``ray_pdserve_requests_total`` and ``vllm:nixl_bytes_transferred`` as ``ray_vllm_nixl_bytes_transferred``.

Names: prefix ``pdserve_``, unit suffixes (``_seconds``, ``_bytes``), ``_total`` only on counters (Ray's
exporter appends ``_total`` to counters, so their names here omit it).
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

from ray.util.metrics import Counter, Gauge, Histogram

from .outcomes import Outcome, Route

if TYPE_CHECKING:
    from .api.trace import Trace
    from .settings import SLOSettings

# From ~10 ms (GPU decode steps) to minutes (CPU prefill of long prompts under load).
LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320]
TOKEN_GAP_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12]
BYTES_BUCKETS = [2**k for k in range(12, 34, 2)]  # 4 KiB .. 8 GiB
REQUEST_TAGS = ("model", "route")


class Metrics:
    def __init__(self) -> None:
        h = lambda name, desc, buckets, tags=REQUEST_TAGS: Histogram(  # noqa: E731
            name, description=desc, boundaries=buckets, tag_keys=tags)
        self.requests = Counter("pdserve_requests", description="Requests answered, by route, outcome and HTTP status.",
                                tag_keys=("model", "route", "outcome", "status"))
        self.time_to_first_token = h("pdserve_time_to_first_token_seconds",
                                     "Ingress arrival to the first token leaving the ingress.", LATENCY_BUCKETS_S)
        self.inter_token_latency = h("pdserve_inter_token_latency_seconds",
                                     "Gap between consecutive streamed chunks.", TOKEN_GAP_BUCKETS_S)
        self.e2e_latency = h("pdserve_e2e_request_latency_seconds", "Ingress arrival to the last byte.",
                             LATENCY_BUCKETS_S)
        self.queue_time = h("pdserve_queue_time_seconds",
                            "Time before a replica started on the request (routing, Serve queues, hops).",
                            LATENCY_BUCKETS_S)
        self.prefill_time = h("pdserve_prefill_time_seconds", "Prefill: engine queue and prompt computation.",
                              LATENCY_BUCKETS_S)
        self.kv_transfer_time = h("pdserve_kv_transfer_time_seconds",
                                  "Hand-off to the first token on the decode replica: KV pull and one step.",
                                  LATENCY_BUCKETS_S)
        self.kv_transfer_size = h("pdserve_kv_transfer_size_bytes", "KV cache bytes a request handed to decode.",
                                  BYTES_BUCKETS)
        self.decode_time = h("pdserve_decode_time_seconds", "First token to last token.", LATENCY_BUCKETS_S)
        self.kv_transfer_failures = Counter(
            "pdserve_kv_transfer_failures", tag_keys=("model",),
            description="KV hand-offs a decode replica could not use: pulls past their deadline, failed inside vLLM "
                        "and recomputed, past their lease, or of another KV layout.")
        self.fallbacks = Counter("pdserve_fallbacks", description="Failures survived, by kind.",
                                 tag_keys=("model", "kind"))
        self.routing_decisions = Counter("pdserve_routing_decisions",
                                         description="Where each request's prompt was prefilled, and why.",
                                         tag_keys=("model", "route", "reason"))
        self.retries = Counter("pdserve_retries", description="Extra attempts, by phase.", tag_keys=("model", "phase"))
        self.inflight = Gauge("pdserve_inflight_requests", description="Requests in flight at the ingress, by pool.",
                              tag_keys=("model", "pool"))
        self.engine_info = Gauge(
            "pdserve_engine_info",
            description="1 per live engine replica: its role. Join on ReplicaId to label the engines' vllm metrics.",
            tag_keys=("model", "ReplicaId", "role"))
        self.slo_met = Counter("pdserve_slo_met_requests",
                               description="Requests that met both the TTFT and the ITL target (goodput).",
                               tag_keys=REQUEST_TAGS)


@cache
def metrics() -> Metrics:
    """Created on first use, inside the process that records them."""
    return Metrics()


def record_request(m: Metrics, trace: Trace, status: int, slo: SLOSettings) -> None:
    """Label values come from the enums of ``outcomes.py`` (and the HTTP status): bounded sets."""
    tags = {"model": trace.model, "route": str(trace.route)}
    m.requests.inc(tags=tags | {"outcome": str(Outcome.of(status)), "status": str(status)})
    m.routing_decisions.inc(tags=tags | {"reason": str(trace.reason)})
    for kind in trace.fallbacks:
        m.fallbacks.inc(tags={"model": trace.model, "kind": str(kind)})
    for phase, num_attempts in trace.attempts.items():
        if num_attempts > 1:
            m.retries.inc(num_attempts - 1, tags={"model": trace.model, "phase": str(phase)})
    b = trace.breakdown()
    if status != 200 or not b:
        return
    for hist, key in ((m.e2e_latency, "e2e_s"), (m.time_to_first_token, "ttft_s"), (m.queue_time, "queue_s"),
                      (m.prefill_time, "prefill_s"), (m.decode_time, "decode_s")):
        hist.observe(b[key], tags=tags)
    if trace.route is Route.DISAGGREGATED:
        m.kv_transfer_time.observe(b["transfer_s"], tags=tags)
        m.kv_transfer_size.observe(trace.kv_bytes, tags=tags)
    for gap in trace.token_gaps_s:
        m.inter_token_latency.observe(gap, tags=tags)
    if b["ttft_s"] <= slo.ttft_s and b.get("mean_itl_s", 0.0) <= slo.itl_s:
        m.slo_met.inc(tags=tags)
