"""API key: ``PDSERVE_API_KEY`` in the environment turns on ``Authorization: Bearer <key>`` for every ``/v1`` route.

``/health`` stays open for probes. Keys are compared in constant time. Unset or empty: no authentication.
"""

from __future__ import annotations

import hmac
import os

from ..replies import ErrorReply
from ..settings import API_KEY_ENV


def api_key() -> str | None:
    return os.environ.get(API_KEY_ENV) or None


def needs_key(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def check(authorization: str | None, key: str | None) -> ErrorReply | None:
    """None if the request may pass; else the 401 (OpenAI's shape: the ``openai`` client raises AuthenticationError)."""
    if key is None:
        return None
    scheme, _, presented = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not presented:
        return ErrorReply(401, "missing API key: send 'Authorization: Bearer <key>'", "AuthenticationError")
    if not hmac.compare_digest(presented.strip().encode(), key.encode()):
        return ErrorReply(401, "invalid API key", "AuthenticationError")
    return None
