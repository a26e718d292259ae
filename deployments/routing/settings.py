"""How the ingress routes and retries: the ``routing`` section of a pdserve application's settings
(``deployments/settings.py`` holds the rest and re-exports this one)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..kv.handoff import PullDeadline
from ..roles import ROLES


class RoutingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prefill_policy: Literal["round_robin", "least_loaded", "prefix_affinity"] = Field(
        ROLES["prefill"].default_policy,
        description="How a prefill replica is chosen (deployments/routing/policies.py).",
    )
    decode_policy: Literal["round_robin", "least_loaded", "prefix_affinity"] = Field(
        ROLES["decode"].default_policy, description="How a decode replica is chosen."
    )
    min_remote_prefill_tokens: int = Field(
        128, ge=0, description="Prompts estimated shorter than this prefill on the decode replica (no KV transfer)."
    )
    max_prefill_waiting: int = Field(
        8, ge=0, description="When every prefill replica has more requests waiting than this, prefill locally."
    )
    prefill_timeout_s: float = Field(
        60, gt=0, description="Upper bound of one prefill attempt's deadline, queueing included. The deadline itself "
        "is prefill_deadline_base_s + prefill_deadline_factor x the prompt's tokens / the pool's measured prefill "
        "speed."
    )
    prefill_deadline_base_s: float = Field(
        2.0, gt=0, description="Fixed part of a prefill attempt's deadline: hops, scheduling, the hand-off reply."
    )
    prefill_deadline_factor: float = Field(
        4.0, ge=1, description="Headroom of a prefill attempt's deadline over the time its tokens should take."
    )
    prefill_tokens_per_s: float = Field(
        500, gt=0, description="Prefill speed assumed until the pool's own speed is measured (from its replies)."
    )
    replica_probe_timeout_s: float = Field(
        1.0, gt=0, description="After a prefill attempt timed out, or while a decode stream is silent, how long its "
        "replica may take to answer a direct liveness probe. Answered: the replica is alive and busy (queueing, not a "
        "breaker failure); silent: frozen or cut off (a breaker failure)."
    )
    decode_probe_interval_s: float = Field(
        5.0, gt=0, description="How long a decode stream may stay silent (before its first token or between tokens) "
        "before its replica is probed, and then between probes. A replica that does not answer is frozen or cut off: "
        "before the first token the request is retried on another replica, after it the stream ends with an error."
    )
    stream_idle_floor_s: float = Field(
        1.0, gt=0, description="After a stream's first token, how long it may stay silent before its replica is "
        "probed is 20 times the replica's measured inter-token latency, at least this ..."
    )
    stream_idle_cap_s: float = Field(
        5.0, gt=0, description="... and at most this (also where no inter-token latency was measured yet): a frozen "
        "decode replica is found within seconds of its last token, not at the request's deadline."
    )
    kv_pull_timeout_s: float = Field(
        10, gt=0, description="Upper bound of the deadline for a decode engine to pull the KV and produce its first "
        "token; then the decode request is aborted and retried with a local prefill. The deadline itself is "
        "kv_pull_deadline_base_s + kv_pull_deadline_factor x the KV bytes / the engine's measured pull speed, plus "
        "kv_first_handshake_s on its first pull from a prefill engine."
    )
    kv_pull_deadline_base_s: float = Field(
        5.0, gt=0, description="Fixed part of a KV pull's deadline: the decode engine's queue and first step."
    )
    kv_pull_deadline_factor: float = Field(4.0, ge=1, description="Headroom of a pull's deadline over its bytes' time.")
    kv_pull_bytes_per_s: float = Field(
        1e8, gt=0, description="Pull speed assumed until the decode engine measured its own (NIXL's transfer stats)."
    )
    kv_first_handshake_s: float = Field(
        5.0, ge=0, description="Added to the deadline of a decode engine's first pull from a prefill engine."
    )
    kv_lease_s: int = Field(
        30, ge=1, description="How long a prefill engine holds KV blocks for a decode engine that never pulls them."
    )
    num_prefill_attempts: int = Field(2, ge=1, description="Prefill tries on distinct replicas before local prefill.")
    num_decode_attempts: int = Field(2, ge=1, description="Decode tries on distinct replicas before the first token.")
    breaker_failure_threshold: int = Field(
        2, ge=1, description="Consecutive failures that take a replica out of rotation."
    )
    breaker_cooldown_s: float = Field(15, gt=0, description="How long a failing replica stays out before a probe.")
    elastic_max_streams_per_engine: int | None = Field(
        None, ge=1, description="Elastic mode: the most streams packed onto one engine before the next engine takes "
        "streams (decode load packed leaves the other engines free to prefill long prompts). None: the pool's "
        "engine max_num_seqs."
    )
    elastic_pack_itl_fraction: float = Field(
        0.6, gt=0, le=1, description="Elastic mode: an engine whose streams' measured inter-token latency (the mean "
        "over its last load report) reaches this fraction of slo.itl_s takes no more streams while another engine "
        "has room: packing stops where an engine gets slow, whatever its stream count."
    )
    elastic_max_pull_wait_s: float | None = Field(
        None, ge=0, description="Elastic mode: no hand-off goes to an engine whose own queued prefill work (at the "
        "measured prefill speed) lasts longer than this: its pull would wait behind that prefill. The request is "
        "then decoded elsewhere or served whole (route reason pull_would_wait). None: what the request's own "
        "prefill and pull leave of slo.ttft_s."
    )
    elastic_stall_budget_share: float = Field(
        0.0, ge=0, le=1, description="Elastic mode: how much of a decoding stream's slack (slo.itl_s minus its "
        "engine's measured inter-token latency, times the measured mean output length) a prefill may use up in "
        "one stall before the stream counts as missing its ITL target. 0: any stall past slo.itl_s counts."
    )
    max_queued_requests: int = Field(
        64, ge=-1, description="Requests queued per pool beyond the replicas' capacity before HTTP 429; -1: no bound."
    )

    @model_validator(mode="after")
    def _pull_deadline_before_lease(self) -> RoutingSettings:
        if self.kv_pull_timeout_s >= self.kv_lease_s:
            raise ValueError("routing.kv_pull_timeout_s must be shorter than routing.kv_lease_s: a decode engine "
                             "must give up on a KV pull before the prefill engine may reuse those blocks")
        return self


    def pull_deadline(self) -> PullDeadline:
        return PullDeadline(base_s=self.kv_pull_deadline_base_s, factor=self.kv_pull_deadline_factor,
                            assumed_bytes_per_s=self.kv_pull_bytes_per_s, first_handshake_s=self.kv_first_handshake_s,
                            cap_s=self.kv_pull_timeout_s)
