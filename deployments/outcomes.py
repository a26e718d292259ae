"""Every way a request can go, as enums: its route, the reason for it, and the failures it survived.

Their values are the strings clients see in ``x-pdserve-*`` headers and the label values of metrics, so
each label set is bounded (no exception class names, no replica ids).
"""

from __future__ import annotations

from enum import StrEnum


class Route(StrEnum):
    """Where a request's prompt was prefilled."""

    DISAGGREGATED = "disaggregated"  # on a prefill replica (elastic: another engine); the decode replica pulled the KV
    LOCAL_PREFILL = "local_prefill"  # on the decode replica itself (disaggregated or elastic mode)
    COLOCATED = "colocated"  # colocated mode: one engine does both


class RouteReason(StrEnum):
    """Why the request took its route."""

    LONG_PROMPT = "long_prompt"
    SHORT_PROMPT = "short_prompt"
    PREFILL_OVERLOADED = "prefill_overloaded"
    PREFILL_UNAVAILABLE = "prefill_unavailable"  # no live prefill replica in rotation
    PREFILL_FAILED = "prefill_failed"  # every prefill attempt failed or timed out
    PREFILL_BACKPRESSURE = "prefill_backpressure"  # the prefill pool's queue is full
    PREFILL_REFUSED = "prefill_refused"  # the prefill-only run got 4xx: the decode engine judges the request
    KV_PULL_FAILED = "kv_pull_failed"  # the decode engine could not pull the KV in time
    KV_LEASE_EXPIRED = "kv_lease_expired"  # the hand-off was older than the prefill side's lease
    KV_INCOMPATIBLE = "kv_incompatible"  # the prefill engine's KV layout or model differs from the decode engine's
    KV_RECOMPUTED = "kv_recomputed"  # the pull failed inside vLLM, which prefilled on the decode engine instead
    # a decode attempt that may have pulled the KV failed: vLLM frees the prefill blocks on the first completed pull,
    # so its retry prefills locally instead of reading blocks that may be freed or reused
    KV_HANDOFF_SPENT = "kv_handoff_spent"
    NOT_TRANSFERABLE = "not_transferable"  # several prompts, n > 1, beam search, echo or prompt logprobs
    COLOCATED_MODE = "colocated_mode"
    # elastic mode (deployments/routing/elastic.py): why a prompt stayed on its decode engine, or left it
    NO_STREAMS_TO_STALL = "no_streams_to_stall"  # the decode engine has no decoding stream a local prefill could stall
    NO_QUIETER_ENGINE = "no_quieter_engine"  # every other engine has as many decoding streams to stall
    STALL_WITHIN_SLO = "stall_within_slo"  # a local prefill stalls its streams less than the ITL target
    BALANCE_STREAMS = "balance_streams"  # the decode engine holds its most streams: the quietest serves it whole
    ITL_PROTECTED = "itl_protected"  # prefilled on a quieter engine: locally it would stall streams past the ITL target
    TTFT_PROTECTED = "ttft_protected"  # prefilled on another engine: locally its first token would come too late
    PULL_WOULD_WAIT = "pull_would_wait"  # every decode engine is busy prefilling: a pull would wait behind it
    REFUSED = "refused"  # refused at the ingress (4xx) before any routing


class Failure(StrEnum):
    """A failure a request survived (or did not): ``x-pdserve-fallback`` and ``pdserve_fallbacks_total{kind}``."""

    PREFILL_TIMEOUT = "prefill_timeout"  # past its deadline and the replica does not answer: frozen or cut off
    PREFILL_QUEUED = "prefill_queued"  # past its deadline on a live, busy replica: queueing, not a replica fault
    PREFILL_REPLICA_DIED = "prefill_replica_died"
    PREFILL_ERROR = "prefill_error"  # the prefill replica answered a server error
    PREFILL_BACKPRESSURE = "prefill_backpressure"
    PREFILL_REFUSED = "prefill_refused"  # the prefill-only run got 4xx: the decode engine judges the request itself
    DECODE_REPLICA_DIED = "decode_replica_died"
    DECODE_ERROR = "decode_error"  # the decode replica answered a server error before its first token
    DECODE_REPLICA_UNRESPONSIVE = "decode_replica_unresponsive"  # its stream silent and no answer to a probe
    KV_PULL_TIMEOUT = "kv_pull_timeout"
    KV_LEASE_EXPIRED = "kv_lease_expired"
    KV_INCOMPATIBLE = "kv_incompatible"  # the prefill engine's KV layout differs from the decode engine's
    KV_RECOMPUTED = "kv_recomputed"  # the pull failed inside vLLM (kv_load_failure_policy: recompute)
    STREAM_INTERRUPTED = "stream_interrupted"  # after tokens went out: the stream ends with an error event
    DEADLINE_EXCEEDED = "deadline_exceeded"  # the request's end-to-end deadline passed


class Outcome(StrEnum):
    """How a request ended, by HTTP status: ``pdserve_requests_total{outcome}``."""

    OK = "ok"
    CLIENT_ERROR = "client_error"
    CLIENT_GONE = "client_gone"
    SERVER_ERROR = "server_error"

    @classmethod
    def of(cls, status: int) -> Outcome:
        if status < 400:
            return cls.OK
        if status == 499:
            return cls.CLIENT_GONE
        return cls.CLIENT_ERROR if status < 500 else cls.SERVER_ERROR


class Phase(StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"
