from .decode import DecodeServer
from .prefill import PrefillServer

__all__ = ["DecodeServer", "PrefillServer"]
