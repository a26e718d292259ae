"""API keys: ``Authorization: Bearer <key>`` on every ``/v1`` route once a key is configured.

Where the keys come from, read by the ingress process only:
- ``PDSERVE_API_KEY_FILE``: a file (a mounted Kubernetes Secret, or the one ``pdserve up`` writes with mode 0600)
  holding one key per line; blank lines and lines starting with ``#`` are ignored. It is read again whenever it
  changes, so a key is rotated without downtime: add the new key, move the clients, remove the old one.
- ``PDSERVE_API_KEY`` (compatibility): one key, or several separated by commas.
A configured file that is missing, unreadable or empty refuses every request (fails closed). ``/health`` stays open
for probes. Each presented key is compared with every accepted key in constant time.
"""

from __future__ import annotations

import hmac
import logging
import os
from pathlib import Path

from ..replies import ErrorReply
from ..settings import API_KEY_ENV, API_KEY_FILE_ENV

logger = logging.getLogger("ray.serve.pdserve.auth")


def parse_keys(text: str) -> tuple[str, ...]:
    return tuple(line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#"))


class ApiKeys:
    """The accepted keys, from the environment of this process (see module doc); None: no key is required."""

    def __init__(self, environ: dict[str, str] | None = None):
        self.environ = os.environ if environ is None else environ
        self._seen: tuple[str, float, int] | None = None  # (path, mtime, size) of the file as last read
        self._keys: tuple[str, ...] = ()
        self._error: str | None = None  # why every request is refused, as last logged (logged once per change)

    def current(self) -> tuple[str, ...] | None:
        path = self.environ.get(API_KEY_FILE_ENV)
        if path:
            return self._from_file(path)
        given = self.environ.get(API_KEY_ENV) or ""
        keys = tuple(k.strip() for k in given.split(",") if k.strip())
        return keys or None

    def _from_file(self, path: str) -> tuple[str, ...]:
        """Read again only when the file changed (a stat per request); empty: fail closed."""
        error = None
        try:
            st = Path(path).stat()
            seen = (path, st.st_mtime, st.st_size)
            if seen != self._seen:
                self._keys, self._seen = parse_keys(Path(path).read_text()), seen
            if not self._keys:
                error = "names a file with no key"
        except OSError as exc:
            self._keys, self._seen, error = (), None, f"unreadable ({exc.strerror})"
        if error is not None and error != self._error:  # once per change, not once per request
            logger.error("%s %s: every request is refused", API_KEY_FILE_ENV, error)
        self._error = error
        return self._keys


KEYS = ApiKeys()


def needs_key(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def check(authorization: str | None, keys: tuple[str, ...] | None) -> ErrorReply | None:
    """None if the request may pass; else the 401 (OpenAI's shape: the ``openai`` client raises AuthenticationError)."""
    if keys is None:
        return None
    scheme, _, presented = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not presented:
        return ErrorReply(401, "missing API key: send 'Authorization: Bearer <key>'", "AuthenticationError")
    presented_bytes = presented.strip().encode()
    matched = False
    for key in keys:  # every key compared, in constant time each: no early exit tells which one was close
        matched |= hmac.compare_digest(presented_bytes, key.encode())
    return None if matched else ErrorReply(401, "invalid API key", "AuthenticationError")


def client_key(environ: dict[str, str] | None = None) -> str | None:
    """The key a client of this machine sends (load tests, tools): PDSERVE_API_KEY, else the key file's first."""
    env = os.environ if environ is None else environ
    if env.get(API_KEY_ENV):
        return env[API_KEY_ENV].split(",")[0].strip()
    path = env.get(API_KEY_FILE_ENV)
    try:
        keys = parse_keys(Path(path).read_text()) if path else ()
    except OSError:
        keys = ()
    return keys[0] if keys else None
