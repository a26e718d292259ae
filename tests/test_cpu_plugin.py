"""The CPU engine plugin's two patches, on vLLM's real classes (the cluster tests check real engines: threads on
their cores, an EngineCore that does not spin)."""

import threading
import time

import pytest
import zmq
from vllm.distributed.device_communicators import shm_broadcast
from vllm.platforms import cpu

from deployments.engine import cpu_plugin

pytestmark = pytest.mark.integration  # vLLM's own classes


@pytest.fixture(autouse=True)
def _restore_vllm(monkeypatch):
    """Whatever a test patches in vLLM is put back."""
    monkeypatch.setattr(shm_broadcast.SpinCondition.__init__, "__defaults__",
                        shm_broadcast.SpinCondition.__init__.__defaults__)
    monkeypatch.setattr(cpu.CpuPlatform, "discover_numa_topology", cpu.CpuPlatform.discover_numa_topology)
    monkeypatch.setattr(shm_broadcast, "SHM_READER_RECHECK_INTERVAL_MS", shm_broadcast.SHM_READER_RECHECK_INTERVAL_MS)
    for env in (cpu_plugin.BUSY_LOOP_ENV, cpu_plugin.KEEP_BIND_ENV, "VLLM_CPU_OMP_THREADS_BIND"):
        monkeypatch.delenv(env, raising=False)


# One context for the module's readers, never terminated: libzmq's context teardown right after inproc sockets
# closed has aborted the process now and then (as vLLM does, the process's exit cleans up).
_ZMQ = zmq.Context()


def _reader_busy_loop_s() -> float:
    cond = shm_broadcast.SpinCondition(is_reader=True, context=_ZMQ, notify_address="inproc://pdserve-test")
    try:
        return cond.busy_loop_s
    finally:
        for sock in (cond.local_notify_socket, cond.read_cancel_socket, cond.write_cancel_socket):
            sock.close(0)


def test_vllm_spins_a_second_by_default():
    """What the plugin changes: without it, a reader busy-loops for a second after each read."""
    assert _reader_busy_loop_s() == 1


def test_cpu_readers_block_at_once_and_recheck_every_millisecond(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")
    assert shm_broadcast.SHM_READER_RECHECK_INTERVAL_MS == 5000  # vLLM's: a lost notification costs 5 s
    cpu_plugin.register()
    cpu_plugin.register()  # vLLM may load plugins twice in a process
    assert _reader_busy_loop_s() == 0
    assert shm_broadcast.SHM_READER_RECHECK_INTERVAL_MS == cpu_plugin.RECHECK_MS == 1


def test_a_lost_notification_costs_a_blocked_reader_a_millisecond_not_five_seconds(monkeypatch):
    """A real MessageQueue, writer and reader in this process; the writer's notification is dropped (as vLLM's PUB
    socket drops one behind another): the blocked reader still gets the message at its next recheck."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")
    cpu_plugin.register()
    writer = shm_broadcast.MessageQueue(n_reader=1, n_local_reader=1)
    reader = shm_broadcast.MessageQueue.create_from_handle(writer.export_handle(), rank=0)
    writer.wait_until_ready()
    reader.wait_until_ready()
    monkeypatch.setattr(writer._spin_condition, "notify", lambda: None)  # every notification lost
    threading.Timer(0.2, writer.enqueue, args=("token",)).start()
    t0 = time.monotonic()
    assert reader.dequeue(timeout=10) == "token"
    assert time.monotonic() - t0 < 1.0


def test_busy_loop_from_env(monkeypatch):
    monkeypatch.setenv(cpu_plugin.BUSY_LOOP_ENV, "0.25")
    cpu_plugin.register()
    assert _reader_busy_loop_s() == 0.25


def test_non_cpu_platform_keeps_vllm_default(monkeypatch):
    assert cpu_plugin.busy_loop_s(is_cpu=False) is None
    monkeypatch.setenv(cpu_plugin.BUSY_LOOP_ENV, "0")
    assert cpu_plugin.busy_loop_s(is_cpu=False) == 0


def test_blocking_reader_still_wakes_on_notify():
    """With no busy loop a reader waits on the zmq notification; a write wakes it at once, not at a timeout."""
    ctx = zmq.Context()
    writer = shm_broadcast.SpinCondition(is_reader=False, context=ctx, notify_address="ipc:///tmp/pdserve-spin-test")
    reader = shm_broadcast.SpinCondition(is_reader=True, context=ctx, notify_address="ipc:///tmp/pdserve-spin-test",
                                         busy_loop_s=0)
    time.sleep(0.2)  # the subscription reaches the publisher
    threading.Timer(0.1, writer.notify).start()
    t0 = time.monotonic()
    reader.wait(timeout_ms=5000)
    assert time.monotonic() - t0 < 2
    for sock in (writer.local_notify_socket, reader.local_notify_socket, reader.read_cancel_socket,
                 reader.write_cancel_socket):
        sock.close(0)
    ctx.term()


def test_explicit_bind_reserves_no_core_for_nixl(monkeypatch):
    """vLLM's NIXL worker binds its calling thread (the compute thread) to what this returns: nothing, where the
    engine's cores are given."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")
    cpu_plugin.register()
    assert cpu.CpuPlatform.discover_numa_topology() == []


@pytest.mark.parametrize("env", [{"VLLM_CPU_OMP_THREADS_BIND": "auto"}, {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}, {},
                                 {"VLLM_CPU_OMP_THREADS_BIND": "0", cpu_plugin.KEEP_BIND_ENV: "0"}])
def test_vllm_reservation_kept_without_explicit_bind(monkeypatch, env):
    original = cpu.CpuPlatform.discover_numa_topology
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cpu_plugin.register()
    assert cpu.CpuPlatform.discover_numa_topology == original
