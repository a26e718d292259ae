"""Typed ``kv_transfer_params``: what a prefill engine hands to a decode engine.

vLLM's NixlConnector returns these from a prefill request made with ``do_remote_decode``; the decode engine
needs them back unchanged to pull the KV blocks. ``handoff.Handoff`` carries them, parsed once on the ingress.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class KVTransferParams(BaseModel):
    """The hand-off returned by a prefill engine. Keys this model does not name (connector-specific ones
    that newer vLLM versions add) are carried through unchanged."""

    model_config = ConfigDict(extra="allow", frozen=True)

    do_remote_prefill: bool = Field(description="True: the decode engine must pull the prompt's KV.")
    do_remote_decode: bool = Field(False, description="False on a hand-off to decode.")
    remote_engine_id: str = Field(description="vLLM engine id of the prefill engine that holds the KV.")
    remote_request_id: str = Field(description="Request id on the prefill engine.")
    remote_block_ids: list[list[int]] | list[int] = Field(description="KV block ids on the prefill engine.")
    remote_host: str = Field(description="NIXL side-channel host of the prefill engine.")
    remote_port: int = Field(ge=1, le=65535, description="NIXL side-channel port of the prefill engine.")
    tp_size: int = Field(1, ge=1, description="Tensor-parallel size of the prefill engine.")
    remote_num_tokens: int | None = Field(None, ge=0, description="Prompt tokens whose KV the prefill computed.")

    @property
    def num_blocks(self) -> int:
        ids = self.remote_block_ids
        return sum(len(g) for g in ids) if ids and isinstance(ids[0], list) else len(ids)
