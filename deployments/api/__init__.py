from .ingress import Ingress

__all__ = ["Ingress"]
