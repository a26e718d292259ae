"""vLLM general plugin: give NIXL's progress thread a delay so idle engines do not spin a core.

NIXL creates every agent with ``pthrDelay = 0``; the progress thread then busy-polls one core at ~99% while
idle and, on small CPU machines, starves the engines. vLLM loads ``vllm.general_plugins`` entry points in
every process it starts (API server, EngineCore, Worker), before the NIXL agent exists, so this hook acts
where the agent is created: it replaces the ``nixlBind`` attribute of the module vLLM will import the agent
from by a proxy that sets the delay on each new agent's config.

Which module that is: vLLM imports ``nixl._api`` (``nixl_rocm._api`` on ROCm). ``nixl`` is NVIDIA's meta
package: it picks ``nixl_cu13`` or ``nixl_cu12`` by the CUDA version of the installed torch and aliases
``nixl._api`` to that variant's module. Where both variants are installed (``pip install nixl`` installs both)
only the chosen one may be imported: each registers the same pybind11 types, and a second import fails with
``generic_type: type "nixl_thread_sync_t" is already registered!``, after which vLLM reports NIXL unavailable.
So this plugin imports exactly the module vLLM resolves, nothing else.

Delay in µs from ``PDSERVE_NIXL_PROGRESS_DELAY_US`` (default 1000; 0 restores NIXL's busy polling).

The same hook makes a decode engine re-handshake with a prefill engine whose transfers failed. vLLM 0.32 drops a
remote engine's NIXL state (and so its UCX endpoints) only when the local metadata of that engine is gone; a link
that was cut and healed leaves the metadata in place and the endpoints broken, so every later pull from that engine
failed and was recomputed until the engine's one-hour TTL (seen as a multi-node test's link that never carried KV
again after it healed). With the patch a failed transfer marks the remote engine invalid: vLLM's own path then
rejects reads from it until its backoff (0 s the first time, doubling up to 60 s while failures repeat) and releases
its state once no transfer is in flight, and the next pull handshakes afresh (``PDSERVE_NIXL_REHANDSHAKE=0``: off).
``python -m deployments.engine.nixl_plugin`` is the image smoke test: it loads vLLM's plugins, creates a NIXL
agent through vLLM's own import path and prints the variant in use.
"""

from __future__ import annotations

import importlib
import os
import sys
import time

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


REHANDSHAKE_ENV = "PDSERVE_NIXL_REHANDSHAKE"


def rehandshake_after_failures(worker_cls) -> bool:
    """Patch vLLM's NIXL connector worker class (see module doc); False where its internals are not as expected."""
    original = getattr(worker_cls, "_cleanup_remote_engines", None)
    if original is None or getattr(original, "pdserve_patched", False):
        return False

    def _cleanup_remote_engines(self) -> None:
        needed = ("_failed_remote_engines", "_invalid_remote_engines", "_remote_agents", "_handshake_lock",
                  "_handshake_futures", "_mark_remote_engine_invalid")
        if getattr(self, "_TRANSFER_MODE", None) == "pull" and all(hasattr(self, n) for n in needed):
            with self._handshake_lock:
                handshaking = bool(self._handshake_futures)
            if not handshaking:  # vLLM defers its own cleanup while a handshake runs: so does this
                now = time.perf_counter()
                for engine_id in self._failed_remote_engines - self._invalid_remote_engines:
                    if engine_id in self._remote_agents:
                        self._mark_remote_engine_invalid(engine_id, now)
        return original(self)

    _cleanup_remote_engines.pdserve_patched = True
    worker_cls._cleanup_remote_engines = _cleanup_remote_engines
    return True


def _patch_connector_worker() -> None:
    if os.environ.get(REHANDSHAKE_ENV, "1") == "0":
        return
    try:
        from vllm.distributed.kv_transfer.kv_connector.v1.nixl.base_worker import NixlBaseConnectorWorker
    except ImportError:
        return  # another vLLM, or none: nothing to patch
    rehandshake_after_failures(NixlBaseConnectorWorker)


def nixl_api_module_name() -> str:
    """The module vLLM imports ``nixl_agent`` from: ``nixl._api``, or ``nixl_rocm._api`` on ROCm."""
    try:
        from vllm.distributed.nixl_utils import _get_nixl_module_name
    except ImportError:  # no vLLM (e.g. the GPU check script): NIXL's own meta package
        return "nixl._api"
    return _get_nixl_module_name("NixlWrapper")


def register() -> None:
    _patch_delay()
    _patch_connector_worker()


def _patch_delay() -> None:
    delay_us = int(os.environ.get(DELAY_ENV, "1000"))
    if delay_us <= 0:
        return
    # vLLM sets this before its own first NIXL import (a UCX registration-cache leak); importing NIXL here
    # first would keep it from doing so.
    os.environ.setdefault("UCX_RCACHE_MAX_UNRELEASED", "1024")
    try:
        module = importlib.import_module(nixl_api_module_name())
    except ImportError:
        return  # no NIXL here: nothing to patch (vLLM reports it when a NIXL connector is configured)
    binding = getattr(module, "nixlBind", None)
    if binding is not None and not getattr(binding, "pdserve_patched", False):
        module.nixlBind = _DelayedAgentBinding(binding, delay_us)


def smoke_check() -> str:
    """Load vLLM's general plugins, then create a NIXL agent (UCX backend) through vLLM's import path.
    Returns the NIXL variant in use; raises if NIXL is unusable."""
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    from vllm.distributed import nixl_utils

    if nixl_utils.NixlWrapper is None:
        raise RuntimeError("vLLM reports NIXL unavailable")
    agent = nixl_utils.NixlWrapper("pdserve-smoke", nixl_utils.nixl_agent_config(backends=["UCX"]))
    variant = type(agent).__module__.split(".")[0]
    binding = sys.modules[nixl_api_module_name()].nixlBind
    if not getattr(binding, "pdserve_patched", False) and int(os.environ.get(DELAY_ENV, "1000")) > 0:
        raise RuntimeError("pdserve's NIXL plugin did not load")
    return variant


if __name__ == "__main__":
    print(f"NIXL usable through vLLM: {smoke_check()}")
