"""The KV hand-off as one typed value: what a decode engine needs to pull a prompt's KV from a prefill engine.

Parsed once, on the ingress, where the prefill reply arrives (a malformed one fails there, blamed on the prefill
replica, not inside the decode engine); stripped once, when the decode engine hands it to vLLM. Beside vLLM's own
fields it carries what pdserve checks before a pull: the lease (after it the prefill engine may reuse the blocks),
the prefill engine's KV fingerprint (another layout makes the blocks garbage) and the pull's deadline.
"""

from __future__ import annotations

from dataclasses import dataclass

from .params import KVTransferParams

# The prefill side's prefix-cache hits: with them vLLM reports those tokens as the decode request's cached ones,
# which would hide whether the pull delivered the prompt (the engine reads its own count to tell).
_NOT_FOR_DECODE = frozenset({"remote_prefill_cached_tokens"})


@dataclass(frozen=True)
class PullDeadline:
    """How long a decode engine may take to pull a prompt's KV and produce its first token: a fixed part (its
    queue and first step), the bytes over the link's speed with headroom, and an allowance for the first
    handshake with that prefill engine (NIXL metadata exchange and UCX endpoints); never past ``cap_s``."""

    base_s: float = 5.0
    factor: float = 4.0
    assumed_bytes_per_s: float = 1e8  # until the engine measured its own pulls
    first_handshake_s: float = 5.0
    cap_s: float = 10.0

    def seconds(self, num_bytes: int, measured_bytes_per_s: float | None, first_contact: bool) -> float:
        speed = measured_bytes_per_s or self.assumed_bytes_per_s
        s = self.base_s + self.factor * num_bytes / speed + (self.first_handshake_s if first_contact else 0.0)
        return min(s, self.cap_s)


@dataclass(frozen=True)
class Handoff:
    """One prompt's KV, held by one prefill engine for one decode engine to pull."""

    params: KVTransferParams  # vLLM's NixlConnector fields, validated
    prefill_replica: str  # who holds the blocks (blamed when the pull fails)
    expires_at: float  # wall clock: the prefill engine may reuse the blocks after this (its kv_lease_s)
    fingerprint: str  # the prefill engine's KV compatibility fingerprint

    @classmethod
    def parse(cls, raw: dict, prefill_replica: str, expires_at: float, fingerprint: str) -> Handoff:
        """From a prefill reply; raises pydantic's ValidationError on a malformed one."""
        return cls(KVTransferParams.model_validate(raw), prefill_replica, expires_at, fingerprint)

    @property
    def remote_engine_id(self) -> str:
        return self.params.remote_engine_id

    @property
    def num_blocks(self) -> int:
        return self.params.num_blocks

    def usable(self, now: float, kv_pull_timeout_s: float) -> bool:
        """Whether a pull started ``now`` finishes (or is aborted at its deadline) before the lease ends; after
        that the prefill engine may have given the blocks to another request."""
        return now + kv_pull_timeout_s < self.expires_at

    def compatible_with(self, fingerprint: str) -> bool:
        return self.fingerprint == fingerprint

    def pull_timeout_s(self, deadline: PullDeadline, kv_bytes_per_block: int, measured_bytes_per_s: float | None,
                       known_engines: set[str]) -> float:
        """This pull's deadline on a decode engine that measured ``measured_bytes_per_s`` and has already pulled
        from ``known_engines`` (no handshake allowance for those)."""
        return deadline.seconds(self.num_blocks * kv_bytes_per_block, measured_bytes_per_s,
                                self.remote_engine_id not in known_engines)

    def for_engine(self) -> dict:
        """The hand-off as the decode engine gives it to vLLM (``kv_transfer_params``)."""
        return self.params.model_dump(exclude=set(_NOT_FOR_DECODE))
