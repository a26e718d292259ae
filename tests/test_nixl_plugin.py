"""The NIXL idle-spin fix: on a fake NIXL binding module (pure logic), and with the real NIXL variant wheels through
vLLM's import path (the cluster tests check real engines)."""

import sys
import types

from deployments.engine import nixl_plugin


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
