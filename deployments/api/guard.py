"""What a client may not steer: the header guard in front of Serve's HTTP proxy and each direct-ingress port.

Serve's proxy reads some request headers as instructions: ``x-request-disconnect-disabled: ?1`` keeps a request
running after its client hung up (8 such clients that hung up made the next client wait 100 s),
``x-request-timeout-seconds`` overrides the proxy's timeout, ``serve_multiplexed_model_id`` and the session header
steer Serve's router, and ``x-request-id`` becomes the request's id inside Serve. The guard drops the first four
and hands the client's ``x-request-id`` over as ``x-pdserve-client-request-id`` (recorded as the client's id,
never used as pdserve's). It also caps the requests one proxy (or Ingress replica) holds at once: past
``PDSERVE_MAX_CONCURRENT_REQUESTS`` a request gets 503 with ``Retry-After`` before anything reads its body.

It is plain ASGI, wired in through Serve's ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` (``proxy_middlewares``),
which ``pdserve up``, the multi-node launcher and the Helm chart set on every Ray node (settings.RAY_NODE_ENV).
Serve applies it to its proxy and to every direct-ingress server, outside its own request-id middleware.
"""

from __future__ import annotations

import json
import os

from starlette.middleware import Middleware

CLIENT_REQUEST_ID_HEADER = "x-pdserve-client-request-id"
MAX_CONCURRENT_ENV = "PDSERVE_MAX_CONCURRENT_REQUESTS"
DEFAULT_MAX_CONCURRENT = 2000
# Headers Serve acts on that no client may send (compared lower-case, '_' read as '-', as Serve reads them).
SERVE_CONTROL_HEADERS = frozenset({"x-request-disconnect-disabled", "x-request-timeout-seconds",
                                   "serve-multiplexed-model-id", "x-session-id", CLIENT_REQUEST_ID_HEADER})


def _normal(name: bytes) -> str:
    return name.decode("latin-1").lower().replace("_", "-")


def guarded_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The request's headers without Serve's control headers; the client's x-request-id renamed."""
    session = os.environ.get("RAY_SERVE_SESSION_ID_HEADER_KEY", "x-session-id").lower().replace("_", "-")
    out = []
    for name, value in headers:
        key = _normal(name)
        if key in SERVE_CONTROL_HEADERS or key == session:
            continue
        out.append((CLIENT_REQUEST_ID_HEADER.encode(), value) if key == "x-request-id" else (name, value))
    return out


class HeaderGuard:
    """Drops Serve's control headers from client requests and bounds the requests in flight (see module doc)."""

    def __init__(self, app, max_concurrent: int | None = None):
        self.app = app
        self.max_concurrent = max_concurrent or int(os.environ.get(MAX_CONCURRENT_ENV) or DEFAULT_MAX_CONCURRENT)
        self.num_in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.num_in_flight >= self.max_concurrent:
            await _refuse(send)
            return
        scope = dict(scope, headers=guarded_headers(list(scope.get("headers", []))))
        self.num_in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.num_in_flight -= 1


async def _refuse(send) -> None:
    body = json.dumps({"error": {"message": "too many requests in flight on this server, retry later",
                                 "type": "ServiceUnavailable", "param": None, "code": 503}}).encode()
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def proxy_middlewares() -> list[Middleware]:
    """Serve's HTTP proxy callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``)."""
    return [Middleware(HeaderGuard)]
