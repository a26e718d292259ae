from .params import KVTransferParams
from .protocol import (
    INTERNAL_FIELDS,
    STRUCTURED_OUTPUT_FIELDS,
    PhaseRequest,
    decode_request,
    handoff_usable,
    internal_fields_in,
    not_transferable,
    prefill_request,
)

__all__ = ["INTERNAL_FIELDS", "STRUCTURED_OUTPUT_FIELDS", "KVTransferParams", "PhaseRequest", "decode_request",
           "handoff_usable",
           "internal_fields_in",
           "not_transferable", "prefill_request"]
