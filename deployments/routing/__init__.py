from .breaker import CircuitBreaker
from .policies import POLICIES, Decision, ReplicaLoad, RouteRequest, decide_prefill

__all__ = ["POLICIES", "CircuitBreaker", "Decision", "ReplicaLoad", "RouteRequest", "decide_prefill"]
