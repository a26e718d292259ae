from .decode import DecodeServer
from .elastic import ElasticServer
from .prefill import PrefillServer

__all__ = ["DecodeServer", "ElasticServer", "PrefillServer"]
