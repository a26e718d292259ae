"""What engine replicas send back to the ingress: plain, picklable values shared by both sides."""

from __future__ import annotations

from dataclasses import dataclass, field

from .outcomes import Failure


@dataclass(frozen=True)
class ErrorReply:
    """An OpenAI-style error: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    status: int
    message: str
    type: str = "BadRequestError"
    param: str | None = None

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


@dataclass(frozen=True)
class JsonReply:
    """A complete (non-streaming) OpenAI response body."""

    body: dict


@dataclass(frozen=True)
class ReplicaTag:
    """First item of a decode stream: the replica that serves it (the ingress reports it to the client)."""

    replica: str
    started_at: float  # wall clock when the replica began the request
    node: str = ""  # the Ray node address of the replica


@dataclass(frozen=True)
class PrefillReply:
    """The prefill phase's result: the KV hand-off for decode, as the engine returned it."""

    kv_transfer_params: dict
    num_prompt_tokens: int
    prefill_replica: str
    prefill_node: str  # the Ray node address of the prefill replica (where the decode engine pulls from)
    started_at: float  # wall clock: the prefill replica began ...
    finished_at: float  # ... and finished
    kv_bytes: int  # KV cache bytes held for the decode engine
    kv_expires_at: float  # wall clock: the prefill engine may reuse the blocks after this (its kv_lease_s)
    kv_fingerprint: str = ""  # the prefill engine's KV compatibility fingerprint (VLLMEngine.kv_fingerprint)


@dataclass(frozen=True)
class HandoffFailed:
    """A decode replica could not use the hand-off (pull timed out, or its lease ran out before the pull could
    finish); the engine holds nothing of the request. The ingress prefills locally instead."""

    failure: Failure


@dataclass(frozen=True)
class PullRecomputed:
    """Sent before the first output of a decode request whose KV pull failed inside vLLM: with
    ``kv_load_failure_policy: recompute`` the decode engine computed the prompt itself. The ingress labels the
    request accordingly (route ``local_prefill``, reason ``kv_recomputed``, ``kv_bytes`` 0)."""

    num_prompt_tokens: int
    num_cached_tokens: int  # what the engine did not compute: local prefix cache hits (and a partial pull)


@dataclass
class EngineStats:
    """A snapshot of one engine's own counters and gauges (summed over label sets)."""

    replica: str
    role: str
    pid: int
    node: str = ""  # the Ray node address of the replica
    kv_fingerprint: str = ""  # what a hand-off's engine must match (VLLMEngine.kv_fingerprint)
    values: dict[str, float] = field(default_factory=dict)

    def get(self, name: str) -> float:
        return self.values.get(name, 0.0)
