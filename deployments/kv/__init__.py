from .handoff import Handoff, PullDeadline
from .params import KVTransferParams
from .protocol import (
    INTERNAL_FIELDS,
    STRUCTURED_OUTPUT_FIELDS,
    PhaseRequest,
    decode_request,
    internal_fields_in,
    not_transferable,
    prefill_request,
)

__all__ = ["INTERNAL_FIELDS", "STRUCTURED_OUTPUT_FIELDS", "Handoff", "KVTransferParams", "PhaseRequest",
           "PullDeadline", "decode_request", "internal_fields_in", "not_transferable",
           "prefill_request"]
