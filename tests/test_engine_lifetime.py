"""An engine's processes die with the process that started them (deployments/engine/lifetime.py), with real
processes started the way vLLM starts its EngineCore and workers (multiprocessing, spawn)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time

import pytest

from deployments.engine import lifetime

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")


def _grandchild(ready) -> None:
    lifetime.register()  # as vLLM's plugin loader does in each process it starts
    ready.put(os.getpid())
    time.sleep(60)


def _child(ready) -> None:
    lifetime.register()
    ctx = multiprocessing.get_context("spawn")
    ctx.Process(target=_grandchild, args=(ready,), daemon=False).start()
    time.sleep(60)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie is dead, waiting for its reaper
    except FileNotFoundError:
        return False


def test_an_engine_process_dies_with_the_process_that_started_it():
    """The child plays the replica's EngineCore, the grandchild its Worker: the child killed (SIGKILL: no shutdown
    runs), the grandchild is gone within a second instead of running on, orphaned."""
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Queue()
    child = ctx.Process(target=_child, args=(ready,))
    child.start()
    grandchild = ready.get(timeout=60)
    assert _alive(grandchild)
    os.kill(child.pid, signal.SIGKILL)
    child.join(10)
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild), "the worker outlived the engine process that started it"


def test_a_process_not_started_by_multiprocessing_is_left_alone(monkeypatch):
    """The replica itself (started by Ray) is not armed: Ray stops it."""
    armed = []
    monkeypatch.setattr(lifetime, "arm_parent_death_signal", lambda: armed.append(True))
    lifetime.register()
    assert armed == []
