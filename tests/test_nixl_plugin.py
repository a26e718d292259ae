"""The NIXL idle-spin fix: on a fake NIXL binding module (pure logic), and with the real NIXL variant wheels through
vLLM's import path (the cluster tests check real engines)."""

import sys
import types

import pytest

from deployments.engine import nixl_plugin

pytestmark = pytest.mark.integration  # NIXL and vLLM's connector; one test pip-installs a wheel


class FakeConfig:
    pthrDelay = 0


def _install_fake_nixl(monkeypatch):
    created = []
    fake_bindings = types.SimpleNamespace(nixlAgent=lambda name, cfg: created.append((name, cfg.pthrDelay)) or name,
                                          DEFAULT_COMM_PORT=1)
    fake_api = types.ModuleType("nixl._api")  # the module vLLM imports the agent from (the meta package's alias)
    fake_api.nixlBind = fake_bindings
    pkg = types.ModuleType("nixl")
    pkg._api = fake_api
    monkeypatch.setitem(sys.modules, "nixl", pkg)
    monkeypatch.setitem(sys.modules, "nixl._api", fake_api)
    return fake_api, created


def test_register_sets_delay_on_new_agents(monkeypatch):
    fake_api, created = _install_fake_nixl(monkeypatch)
    monkeypatch.setenv(nixl_plugin.DELAY_ENV, "750")
    nixl_plugin.register()
    nixl_plugin.register()  # idempotent: vLLM loads plugins in several processes, maybe twice
    assert fake_api.nixlBind.nixlAgent("a", FakeConfig()) == "a"
    assert created == [("a", 750)]
    assert fake_api.nixlBind.DEFAULT_COMM_PORT == 1  # everything else forwards


def test_zero_delay_leaves_nixl_alone(monkeypatch):
    fake_api, _ = _install_fake_nixl(monkeypatch)
    original = fake_api.nixlBind
    monkeypatch.setenv(nixl_plugin.DELAY_ENV, "0")
    nixl_plugin.register()
    assert fake_api.nixlBind is original


def _variant_dir(variant: str) -> str:
    """A folder holding one more NIXL variant wheel (pip --target), kept in pdserve's cache between runs."""
    import subprocess
    from importlib.metadata import version

    from deployments.models import cache_dir

    target = cache_dir() / f"{variant}-{version('nixl')}"
    if not (target / variant.replace("-", "_")).is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                        f"{variant}=={version('nixl')}"], check=True)
    return str(target)


def test_vllm_finds_nixl_with_both_cuda_variants_installed():
    """`pip install nixl` installs nixl-cu12 and nixl-cu13; NIXL's meta package picks one (cu13 here: no CUDA
    torch, so the first installed) and the plugin must import that one only. Through vLLM's own plugin loader
    and import path, in a fresh process: NIXL is available, the agent comes from the chosen variant, it got
    the delay, and the other variant's bindings were never loaded."""
    import os
    import subprocess

    env = dict(os.environ, PYTHONPATH=_variant_dir("nixl-cu13"), **{nixl_plugin.DELAY_ENV: "750"})
    probe = ("import sys; from deployments.engine.nixl_plugin import smoke_check; print('VARIANT', smoke_check()); "
             "print('CU12_LOADED', 'nixl_cu12._bindings' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "VARIANT nixl_cu13" in out.stdout and "CU12_LOADED False" in out.stdout, out.stdout
    assert "created with pthrDelay=750 us" in out.stderr
    assert "already registered" not in out.stderr


class FakeConnectorWorker:
    """The NIXL connector worker's state the re-handshake patch reads, with vLLM's own cleanup as a recorder."""

    _TRANSFER_MODE = "pull"

    def __init__(self, handshaking: bool = False):
        import threading

        self._failed_remote_engines = {"p-1", "gone"}
        self._invalid_remote_engines: set[str] = set()
        self._remote_agents = {"p-1": {(0, 0): "agent-p-1"}, "p-2": {(0, 0): "agent-p-2"}}
        self._handshake_lock = threading.Lock()
        self._handshake_futures = {"p-3": object()} if handshaking else {}
        self.cleanups = 0

    def _mark_remote_engine_invalid(self, engine_id, now):
        self._invalid_remote_engines.add(engine_id)

    def _cleanup_remote_engines(self):
        self.cleanups += 1
        self._failed_remote_engines.clear()


def test_failed_transfers_make_the_decode_engine_handshake_afresh(monkeypatch):
    """A link cut and healed left vLLM's UCX endpoints to a prefill engine broken for its one-hour TTL: every pull
    failed and was recomputed. Patched, an engine whose transfer failed is marked invalid (vLLM then releases its
    state and the next pull handshakes again); engines without failures, or unknown ones, are left alone."""
    cls = type("Worker", (FakeConnectorWorker,), {})
    assert nixl_plugin.rehandshake_after_failures(cls) and not nixl_plugin.rehandshake_after_failures(cls)
    worker = cls()
    worker._cleanup_remote_engines()
    assert worker._invalid_remote_engines == {"p-1"} and worker.cleanups == 1
    busy = cls(handshaking=True)  # vLLM defers cleanup while a handshake runs: so does the patch
    busy._cleanup_remote_engines()
    assert busy._invalid_remote_engines == set() and busy.cleanups == 1
    push = type("PushWorker", (cls,), {"_TRANSFER_MODE": "push"})()
    push._cleanup_remote_engines()
    assert push._invalid_remote_engines == set()


def test_vllms_connector_worker_has_what_the_rehandshake_patch_needs():
    """The patch reads vLLM internals; a vLLM that renamed them would silently turn it off: this fails instead."""
    import inspect

    from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker

    cls = base_worker.NixlBaseConnectorWorker
    assert callable(cls._cleanup_remote_engines) and callable(cls._mark_remote_engine_invalid)
    init = inspect.getsource(cls.__init__)
    for name in ("_failed_remote_engines", "_invalid_remote_engines", "_remote_agents", "_handshake_lock",
                 "_handshake_futures"):
        assert f"self.{name}" in init, name
