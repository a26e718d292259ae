"""Every role an engine replica plays, in one table; each map of roles elsewhere is derived from it.

Adding a role (or a mode) starts here: its Serve deployment name, its engines' NIXL KV role, the first port of its
NIXL side channels, and the policy that picks its replicas unless the config names another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Role = Literal["prefill", "decode", "colocated", "elastic"]
Mode = Literal["disaggregated", "colocated", "elastic"]


@dataclass(frozen=True)
class RoleSpec:
    deployment: str  # the Serve deployment of its replicas
    kv_role: str | None  # NixlConnector's kv_role of its engines; None: no KV connector
    port_base: int  # NIXL side channel port of the replica with local rank 0 on a node
    default_policy: str  # routing/policies.py


ROLES: dict[Role, RoleSpec] = {
    "prefill": RoleSpec("PrefillServer", "kv_producer", 5600, "prefix_affinity"),
    "decode": RoleSpec("DecodeServer", "kv_consumer", 5700, "least_loaded"),
    "colocated": RoleSpec("ColocatedServer", None, 5800, "least_loaded"),
    # An elastic engine both hands off and pulls KV. vLLM logs kv_both as deprecated for NixlConnector (it wants one
    # role per engine); it is still what an engine that plays both roles must say.
    "elastic": RoleSpec("ElasticServer", "kv_both", 5900, "least_loaded"),
}

# The roles that serve each mode's (prefill, decode) phases: colocated has no prefill pool; elastic, one pool for both.
MODE_ROLES: dict[Mode, tuple[Role | None, Role]] = {
    "disaggregated": ("prefill", "decode"), "colocated": (None, "colocated"), "elastic": ("elastic", "elastic"),
}


def deployments_of(mode: Mode) -> tuple[str | None, str]:
    """The Serve deployments of a mode's (prefill, decode) phases."""
    prefill, decode = MODE_ROLES[mode]
    return (ROLES[prefill].deployment if prefill else None), ROLES[decode].deployment
