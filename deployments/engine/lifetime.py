"""vLLM general plugin: an engine's processes die with the process that started them.

vLLM runs a model in processes of its own: the replica starts an ``EngineCore`` process, which starts a ``Worker``
per device (always on CPU). When a replica process dies without shutting its engine down (killed, out of memory,
or ``ray stop --force``, which kills Ray's processes by name), those processes are orphaned and keep their memory
(measured on CPU: ~2.5 GB and ~5% of a core per engine, for good; on a GPU, its memory) until the machine restarts.
This hook asks Linux to kill each process vLLM starts when its parent dies (``PR_SET_PDEATHSIG``), so a dead
replica's engine goes with it, and a dead ``EngineCore``'s workers with it.

vLLM loads ``vllm.general_plugins`` in every process it starts; only processes started by ``multiprocessing`` (the
engine's own, not the replica itself, which Ray runs and stops) are armed. Elsewhere than Linux it does nothing.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def arm_parent_death_signal() -> bool:
    """Have this process killed when its parent dies; False where Linux's prctl is not available."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # the parent died before the signal was armed: nothing will send it
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def register() -> None:
    if multiprocessing.parent_process() is not None:  # an engine process vLLM started (EngineCore, Worker)
        arm_parent_death_signal()
