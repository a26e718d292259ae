"""vLLM general plugin: give NIXL's progress thread a delay so idle engines do not spin a core.

``nixl_cu12/_api.py`` creates every agent with ``pthrDelay = 0``; the progress thread then busy-polls one
core at ~99% while idle and, on small CPU machines, starves the engines. vLLM loads ``vllm.general_plugins``
entry points in every process it starts (API server, EngineCore, Worker), before the NIXL agent exists, so
this hook acts where the agent is created. ``nixl._api`` is already imported by then, so the module's
``nixlBind`` attribute is replaced by a proxy that sets the delay on each new agent's config.
Delay in µs from ``PDSERVE_NIXL_PROGRESS_DELAY_US`` (default 1000; 0 restores NIXL's busy polling).
"""

from __future__ import annotations

import os
import sys

DELAY_ENV = "PDSERVE_NIXL_PROGRESS_DELAY_US"


class _DelayedAgentBinding:
    """Forwards everything to NIXL's binding module, but sets ``pthrDelay`` on agents it creates."""

    pdserve_patched = True

    def __init__(self, real, delay_us: int):
        self._real = real
        self._delay_us = delay_us

    def __getattr__(self, name):
        return getattr(self._real, name)

    def nixlAgent(self, agent_name, config):  # noqa: N802 (NIXL's name)
        config.pthrDelay = self._delay_us
        # stderr, not logging: vLLM's worker processes have no handler for our logger; Ray keeps stderr.
        print(f"[pdserve] NIXL agent {agent_name} in pid {os.getpid()} created with pthrDelay={self._delay_us} us",
              file=sys.stderr, flush=True)
        return self._real.nixlAgent(agent_name, config)


def register() -> None:
    delay_us = int(os.environ.get(DELAY_ENV, "1000"))
    if delay_us <= 0:
        return
    for module_name in ("nixl_cu12._api", "nixl_cu13._api", "nixl._api"):
        try:
            module = __import__(module_name, fromlist=["nixlBind"])
        except ImportError:
            continue
        binding = getattr(module, "nixlBind", None)
        if binding is None or getattr(binding, "pdserve_patched", False):
            continue
        module.nixlBind = _DelayedAgentBinding(binding, delay_us)
