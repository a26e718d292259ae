"""The roles table: every map of roles is derived from it, and a pool wired to the wrong deployment fails at start."""

from __future__ import annotations

import pytest

from deployments.api.orchestrator import Orchestrator
from deployments.app import build_app
from deployments.roles import MODE_ROLES, ROLES, deployments_of
from deployments.settings import PDServeSettings
from tests.fakes import FakeDecodeHandle, FakePool, FakePrefillHandle, fake_source

POOLS = {"disaggregated": {"prefill": {}, "decode": {}}, "colocated": {"colocated": {}}, "elastic": {"elastic": {}}}


def _deployments(app) -> set[str]:
    """The names of the deployments an application binds (the ingress and its arguments)."""
    names, todo = set(), [app]
    while todo:
        deployment = todo.pop()._bound_deployment
        names.add(deployment.name)
        todo += [a for a in deployment.init_args if hasattr(a, "_bound_deployment")]
    return names


@pytest.mark.parametrize("mode", list(MODE_ROLES))
def test_each_mode_deploys_the_tables_deployments(mode):
    settings = PDServeSettings.model_validate({"mode": mode} | POOLS[mode])
    assert _deployments(build_app(settings)) == {"Ingress"} | {d for d in deployments_of(mode) if d}


def test_ports_and_kv_roles_are_distinct_per_role():
    assert len({spec.port_base for spec in ROLES.values()}) == len(ROLES)
    assert ROLES["colocated"].kv_role is None and ROLES["elastic"].kv_role == "kv_both"


class _Handle(FakeDecodeHandle):
    deployment_name = "SomethingElse"


def test_a_pool_wired_to_another_deployment_fails_at_start():
    settings = PDServeSettings.model_validate({"mode": "disaggregated"} | POOLS["disaggregated"])
    pool = FakePool(["x"])
    with pytest.raises(ValueError, match="wires DecodeServer, got a handle to SomethingElse"):
        Orchestrator(settings, FakePrefillHandle(pool), _Handle(pool), fake_source("disaggregated", pool, pool))
