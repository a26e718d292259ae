"""vLLM general plugin: a CPU engine computes on the cores it is given, and its processes do not spin.

Two things vLLM does on CPU take the cores pdserve gives an engine (``cpu_bind``) away from it. Both were found by
``loadtests/bench/cpu_profile.py`` with two one-core NIXL engines (elastic mode, rag at 0.3 req/s): 7% SLO attainment,
decode steps twice as slow as the same engines without NIXL.

1. **NIXL moves the compute thread.** The NIXL connector's worker, on CPU, "reserves" the last core of each NUMA
   node for KV loading by ``os.sched_setaffinity(0, ...)`` in its constructor. That call binds the *calling*
   thread: the worker's main thread, which is OpenMP's master thread and runs the model. So every NIXL engine on
   a node computes on that node's last core, whatever ``VLLM_CPU_OMP_THREADS_BIND`` says: two engines bound to
   cores 0 and 1 both ran on core 1. Where the engine's cores are given explicitly, this hook keeps them: vLLM's
   ``discover_numa_topology`` (used only for that reservation) returns no core to reserve.
   ``PDSERVE_CPU_KEEP_BIND=0`` restores vLLM's behaviour.
2. **The EngineCore spins while the model runs.** On CPU the model always runs in a worker process apart from the
   EngineCore; they talk over a shared-memory ring whose reader, within ``busy_loop_s`` (1 s) of its last read,
   waits by spinning on ``sched_yield``. The EngineCore thus spun ~70% of a core through every forward pass, on
   a core another engine computes on. This hook sets the readers' ``busy_loop_s`` default to
   ``PDSERVE_ENGINE_BUSY_LOOP_S`` (CPU default 0: block on the ring's zmq notification at once). On other
   platforms it acts only where that variable is set. vLLM's notifications can be lost (its PUB socket keeps one
   message and drops the next), which its busy loop hides and a blocked reader finds only at its recheck, every
   5 s: measured, one-at-a-time requests then stalled 5 s at a time. So a reader that blocks also rechecks the
   ring every ``RECHECK_MS`` (1 ms: ~1000 wake-ups a second while waiting, against a spinning core).

vLLM loads ``vllm.general_plugins`` in every process it starts, before the executor creates its queues and
before the connector exists. Each patch checks that vLLM still has the shape it patches, and otherwise says so on
stderr and changes nothing.
"""

from __future__ import annotations

import inspect
import os
import sys

BUSY_LOOP_ENV = "PDSERVE_ENGINE_BUSY_LOOP_S"
KEEP_BIND_ENV = "PDSERVE_CPU_KEEP_BIND"
CPU_DEFAULT_BUSY_LOOP_S = 0.0
RECHECK_MS = 1  # how often a blocked reader looks at the ring again (vLLM: 5000), for notifications lost
_UNBOUND = ("", "auto", "nobind")  # VLLM_CPU_OMP_THREADS_BIND values that name no cores


def _say(msg: str) -> None:
    # stderr, not logging: vLLM's worker processes have no handler for our logger; Ray keeps stderr.
    print(f"[pdserve] {msg}", file=sys.stderr, flush=True)


def busy_loop_s(is_cpu: bool) -> float | None:
    """The busy-loop window to set, or None to leave vLLM's."""
    value = os.environ.get(BUSY_LOOP_ENV, "")
    if value != "":
        return float(value)
    return CPU_DEFAULT_BUSY_LOOP_S if is_cpu else None


def keeps_bind() -> bool:
    """Whether the engine's cores were given explicitly and pdserve keeps vLLM's NIXL connector off them."""
    return (os.environ.get(KEEP_BIND_ENV, "1") != "0"
            and os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "") not in _UNBOUND)


def _set_busy_loop(seconds: float) -> None:
    from vllm.distributed.device_communicators import shm_broadcast

    init = shm_broadcast.SpinCondition.__init__
    names = list(inspect.signature(init).parameters)
    defaults = list(init.__defaults__ or ())
    if "busy_loop_s" not in names or names.index("busy_loop_s") < len(names) - len(defaults):
        _say(f"vLLM's SpinCondition has no busy_loop_s default; {BUSY_LOOP_ENV} not applied")
        return
    if not isinstance(getattr(shm_broadcast, "SHM_READER_RECHECK_INTERVAL_MS", None), int):
        _say(f"vLLM's shm_broadcast has no SHM_READER_RECHECK_INTERVAL_MS; {BUSY_LOOP_ENV} not applied")
        return
    defaults[names.index("busy_loop_s") - (len(names) - len(defaults))] = seconds
    init.__defaults__ = tuple(defaults)
    shm_broadcast.SHM_READER_RECHECK_INTERVAL_MS = min(shm_broadcast.SHM_READER_RECHECK_INTERVAL_MS, RECHECK_MS)


def _no_reserved_kv_cores(cls) -> list[list[int]]:
    """Stands in for ``CpuPlatform.discover_numa_topology``: no core is reserved, none moved."""
    return []


def _keep_bind() -> None:
    from vllm.platforms import cpu

    if not hasattr(cpu.CpuPlatform, "discover_numa_topology"):
        _say("vLLM's CpuPlatform has no discover_numa_topology; the engine's CPU binding is left to vLLM")
        return
    cpu.CpuPlatform.discover_numa_topology = classmethod(_no_reserved_kv_cores)


def register() -> None:
    from vllm.platforms import current_platform

    is_cpu = current_platform.is_cpu()
    seconds = busy_loop_s(is_cpu)
    if seconds is not None:
        _set_busy_loop(seconds)
    if is_cpu and keeps_bind():
        _keep_bind()
