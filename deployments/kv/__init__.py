from .params import KVTransferParams, prefill_request_params

__all__ = ["KVTransferParams", "prefill_request_params"]
