"""The NIXL idle-spin fix, on a fake NIXL binding module (pure logic; the cluster tests check real engines)."""

import sys
import types

from deployments.engine import nixl_plugin


class FakeConfig:
    pthrDelay = 0


def _install_fake_nixl(monkeypatch):
    created = []
    fake_bindings = types.SimpleNamespace(nixlAgent=lambda name, cfg: created.append((name, cfg.pthrDelay)) or name,
                                          DEFAULT_COMM_PORT=1)
    fake_api = types.ModuleType("nixl_cu12._api")
    fake_api.nixlBind = fake_bindings
    pkg = types.ModuleType("nixl_cu12")
    pkg._api = fake_api
    monkeypatch.setitem(sys.modules, "nixl_cu12", pkg)
    monkeypatch.setitem(sys.modules, "nixl_cu12._api", fake_api)
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
