"""The two secrets of a cluster pdserve starts, and how they stay out of every place they do not belong.

- **Ray's token** (Ray token authentication, ``RAY_AUTH_MODE=token``): every Ray node pdserve starts and every
  driver it runs (``pdserve up/status/down``, the tests, the load tools) authenticates with it; a job submission,
  dashboard call or ``ray.init`` without it is refused. It lives in Ray's default token file (``~/.ray/auth_token``,
  mode 0600; ``RAY_AUTH_TOKEN_PATH`` names another), created on first use, so that the ``ray`` CLI of the same user
  finds it (``ray get-auth-token`` prints it). ``RAY_AUTH_MODE=disabled`` set by the operator turns it off.
- **The API key(s)**: never in a Ray process's environment, a ``runtime_env``, Serve's application config, a log
  line or ``pdserve status``. The ingress replica reads them from a file (deployments/api/auth.py) whose *path*
  ``pdserve up`` passes on: ``PDSERVE_API_KEY_FILE`` as given, or ``PDSERVE_API_KEY`` written to a 0600 file in the
  cache folder. The nodes' environment is the caller's without either key variable.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import sys
from pathlib import Path

from .settings import API_KEY_ENV, API_KEY_FILE_ENV

AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
# Ray replaces a loopback node address with the machine's LAN address, except in its single-machine mode (the one
# it runs in on macOS and Windows), which this variable set to 0 selects: the node keeps 127.0.0.1 and its agents,
# workers and metrics bind there; no other node can join it.
SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Never handed to a Ray node: the key itself (its file's path is harmless, the ingress reads the file).
SECRET_ENV = frozenset({API_KEY_ENV})


def ray_token_path(environ: dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    return Path(env.get(TOKEN_PATH_ENV) or Path.home() / ".ray" / "auth_token")


def _write_private(path: Path, text: str) -> None:
    """Create ``path`` readable by its owner only (created so, never chmod-ed after the write)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def ray_auth_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """What a Ray node or driver needs in its environment for token authentication (the token file is created on
    first use); {} where the operator set RAY_AUTH_MODE=disabled."""
    env = os.environ if environ is None else environ
    if env.get(AUTH_MODE_ENV, "token").lower() == "disabled":
        return {}
    if not env.get("RAY_AUTH_TOKEN"):
        path = ray_token_path(env)
        if not path.exists():
            _write_private(path, secrets.token_hex(32))
    return {AUTH_MODE_ENV: "token"}


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0] if address.count(":") == 1 else address
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def use_ray_auth(local_ip: str | None = "127.0.0.1") -> bool:
    """Set up this process (a driver) and the processes it starts to reach a cluster pdserve started: Ray's token,
    and, for a single-node cluster on loopback (``local_ip``; None: a multi-node one), Ray's single-machine mode, in
    which Ray keeps a loopback node address instead of replacing it with the machine's LAN address. Call it before
    Ray is imported. True if token authentication is on."""
    auth = ray_auth_env()
    address = os.environ.get("RAY_ADDRESS")
    single = local_ip is not None and is_loopback(local_ip) and (not address or is_loopback(address))
    if single:
        os.environ[SINGLE_NODE_ENV] = "0"
    else:
        os.environ.pop(SINGLE_NODE_ENV, None)
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # Ray read the variable when imported: set what it read (Ray looks it up per call)
        constants.ENABLE_RAY_CLUSTER = not single
    if auth and os.environ.get(AUTH_MODE_ENV) != auth[AUTH_MODE_ENV]:
        os.environ.update(auth)
        if "ray._raylet" in sys.modules:  # Ray read its config when imported: read it again (as ray.init does)
            sys.modules["ray._raylet"].Config.initialize("")
    return bool(auth)


def node_environ(environ: dict[str, str] | None = None, single_node: bool = True) -> dict[str, str]:
    """This process's environment as a Ray node started from it may see it: without the API key (and, for a node of
    a multi-node cluster, without Ray's single-machine mode)."""
    env = os.environ if environ is None else environ
    drop = SECRET_ENV if single_node else SECRET_ENV | {SINGLE_NODE_ENV}
    return {k: v for k, v in env.items() if k not in drop}


def api_key_file(cache: Path, environ: dict[str, str] | None = None) -> str | None:
    """The key file the ingress reads: PDSERVE_API_KEY_FILE as given, else PDSERVE_API_KEY written to a 0600 file in
    ``cache``; None: no key configured."""
    env = os.environ if environ is None else environ
    if env.get(API_KEY_FILE_ENV):
        return str(Path(env[API_KEY_FILE_ENV]).resolve())
    key = env.get(API_KEY_ENV)
    if not key:
        return None
    path = cache / "api-keys"
    _write_private(path, "".join(f"{k.strip()}\n" for k in key.split(",") if k.strip()))
    return str(path)
