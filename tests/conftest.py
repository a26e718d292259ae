"""The real cluster the e2e tests share: `pdserve up` with the shipped configs, torn down by `pdserve down`.

One Ray cluster serves three applications of the default model (SmolLM2-135M-Instruct), each a shipped config: the
default disaggregated one at ``/``, the colocated baseline at ``/colocated`` and elastic at ``/elastic``. Every
engine binds one core (one OMP thread), so greedy outputs of all modes are comparable token for token. The engines
run in float32 here: in bf16 the decode engine's separately computed last prompt token shifts near-tied logits
(measured: 1 of 12 cases diverged mid-answer), which is rounding, not a transfer error.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from deployments.credentials import use_ray_auth
from loadtests.engines import replica_stats, serve_replicas

# Every cluster the tests start runs with Ray's token authentication and, on one node, on loopback, as `pdserve up`
# starts it: this process and its subprocesses (pdserve, locust) connect with the token, in Ray's single-machine mode.
use_ray_auth()

ROOT = Path(__file__).resolve().parent.parent
PDSERVE = str(Path(sys.executable).with_name("pdserve"))
# The e2e cluster runs as a production deployment would: with an API key (PDSERVE_API_KEY in the environment of
# `pdserve up`). Subprocesses of the tests (locust) inherit it; test requests send AUTH.
API_KEY = "pdserve-e2e-key"
AUTH = {"authorization": f"Bearer {API_KEY}"}


# Cluster test modules run in this order, after the fast tests: the Serve tier over fake engines and the multi-node
# cluster (each its own, removed before the next one starts), then the shared real cluster: the idle-CPU test wants
# it quiet, the resilience tests freeze engines, the metrics tests check (among others) metrics that failures create,
# and the elastic tests end by killing an engine.
CLUSTER_MODULE_ORDER = ["test_serve_faults", "test_e2e_multinode", "test_e2e_cpu", "test_e2e_errors",
                        "test_e2e_requests", "test_e2e_security", "test_e2e_direct_ingress", "test_e2e_outputs",
                        "test_e2e_loadtest", "test_e2e_resilience", "test_e2e_metrics", "test_e2e_elastic"]


# Test modules that import vLLM when collected: a run that leaves out the integration tests (`make test-unit`) does not
# even collect them, and fails if anything else imported vLLM.
VLLM_AT_COLLECTION = {"test_cpu_plugin.py"}


def _unit_tier(config) -> bool:
    return "not integration" in (config.option.markexpr or "")


def pytest_ignore_collect(collection_path, config):
    return True if _unit_tier(config) and collection_path.name in VLLM_AT_COLLECTION else None


def pytest_sessionfinish(session, exitstatus):
    if _unit_tier(session.config) and "vllm" in sys.modules:
        print("\nthe unit tier imported vLLM: mark the test that did `integration`", file=sys.stderr)
        session.exitstatus = 1


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.module.__name__.rsplit(".", 1)[-1]
        return CLUSTER_MODULE_ORDER.index(name) + 1 if name in CLUSTER_MODULE_ORDER else 0

    items.sort(key=rank)  # stable: keeps the order inside each module


@dataclass
class Cluster:
    base: str  # Serve's proxy
    model: str
    direct: dict[str, str]  # route prefix -> base URL of its Ingress replica's own port (direct ingress)

    @property
    def pd(self) -> str:
        return f"{self.base}/v1"

    @property
    def colocated(self) -> str:
        return f"{self.base}/colocated/v1"

    @property
    def direct_pd(self) -> str:
        return f"{self.direct['/']}/v1"

    @property
    def direct_colocated(self) -> str:
        return f"{self.direct['/colocated']}/colocated/v1"

    def stats(self, deployment: str, app: str = "pdserve", replica: str | None = None):
        """Engine counters of one replica of a deployment (a given one, or any)."""
        return replica_stats(app, deployment, replica)

    def replicas(self, deployment: str, app: str = "pdserve") -> list[Replica]:
        """Live replicas of a deployment: their Serve replica id (as in x-pdserve-*-replica headers) and pid."""
        out = []
        for r in serve_replicas(app, deployment):
            try:
                out.append(Replica(id=r.replica, actor_name=r.actor_name, pid=replica_stats(*r, timeout_s=15).pid))
            except Exception:  # starting or dying: not live
                continue
        return out

    def wait_for_replicas(self, deployment: str, count: int, timeout_s: float = 300,
                          app: str = "pdserve") -> list[Replica]:
        """Until ``count`` replicas are alive and serving (Serve restarts killed ones)."""
        import time

        from ray import serve

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = serve.status().applications[app].deployments[deployment]
            if status.status.value == "HEALTHY" and len(self.replicas(deployment, app)) == count:
                return self.replicas(deployment, app)
            time.sleep(2)
        raise TimeoutError(f"{deployment}: {count} healthy replicas not back within {timeout_s} s")


@dataclass
class Replica:
    id: str
    actor_name: str
    pid: int


# The e2e cluster's routing settings (the rest as by default).
E2E_ROUTING = {"kv_pull_timeout_s": 8, "breaker_cooldown_s": 10, "max_queued_requests": 16}
# A body the client never finishes is answered 408 after this (limits.body_read_timeout_s; 30 s by default).
E2E_BODY_READ_TIMEOUT_S = 5
# Its applications are served both through Serve's proxy (8000) and on their Ingress replicas' own ports from this
# one up (http.direct_ingress_port): the tests reach both entry points.
E2E_DIRECT_INGRESS_PORT = 8010


def direct_ingress_bases(num_apps: int) -> dict[str, str]:
    """Route prefix -> base URL of the Ingress replica on each direct-ingress port (Serve's /-/routes there)."""
    out = {}
    for port in range(E2E_DIRECT_INGRESS_PORT, E2E_DIRECT_INGRESS_PORT + num_apps):
        routes = httpx.get(f"http://127.0.0.1:{port}/-/routes", timeout=10).json()
        out |= {prefix: f"http://127.0.0.1:{port}" for prefix in routes}
    return out


# The elastic application's settings on the shared cluster (tests/test_e2e_elastic.py): streams pack by count alone
# (an engine counts as slow, taking no more streams, only past 400 ms between tokens, far above what three float32
# streams on one core see on a busy machine; the rule itself is unit-tested).
E2E_ELASTIC_ROUTING = {"kv_pull_timeout_s": 8, "breaker_cooldown_s": 10, "elastic_pack_itl_fraction": 1.0}
E2E_APPS = ("/", "/colocated", "/elastic")


def _combined_config(tmp: Path) -> Path:
    """The shipped configs as three applications of one cluster: disaggregated (one prefill and one decode engine)
    at /, colocated (one engine) at /colocated, elastic (two engines) at /elastic; each engine on one core."""
    pd = yaml.safe_load((ROOT / "cluster/local-disaggregated.yaml").read_text())["applications"][0]
    colo = yaml.safe_load((ROOT / "cluster/local-colocated.yaml").read_text())["applications"][0]
    elastic = yaml.safe_load((ROOT / "cluster/local-elastic.yaml").read_text())["applications"][0]
    colo |= {"name": "colocated", "route_prefix": "/colocated"}
    elastic |= {"name": "elastic", "route_prefix": "/elastic"}
    apps = [pd, colo, elastic]
    for app in apps:
        app["args"]["engine"] |= {"dtype": "float32", "max_num_seqs": 4}  # float32: comparable token for token
        app["args"]["http"] = {"direct_ingress_port": E2E_DIRECT_INGRESS_PORT}
        app["args"]["limits"] = {"body_read_timeout_s": E2E_BODY_READ_TIMEOUT_S}
    # Prefill deadlines as by default (derived from prompt size and measured speed); a shorter pull deadline
    # and breaker cooldown keep the failure tests short.
    pd["args"]["routing"] = dict(E2E_ROUTING)
    elastic["args"]["routing"] = dict(E2E_ELASTIC_ROUTING)
    elastic["args"]["slo"] = {"itl_s": 0.4}
    path = tmp / "e2e.yaml"
    path.write_text(yaml.safe_dump({"applications": apps}))
    return path


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    config = _combined_config(tmp_path_factory.mktemp("cluster"))
    os.environ["PDSERVE_API_KEY"] = API_KEY
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    if os.environ.get("PDSERVE_TEST_REUSE_CLUSTER") == "1":  # developer loop: a cluster already `up` with e2e.yaml
        import ray

        ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
        yield Cluster(base="http://127.0.0.1:8000", model="smollm2-135m-instruct",
                      direct=direct_ingress_bases(len(E2E_APPS)))
        return
    up = subprocess.run([PDSERVE, "up", "--config", str(config)], env=env, timeout=1200,
                        capture_output=True, text=True)
    print(up.stdout[-3000:], up.stderr[-3000:])
    try:
        assert up.returncode == 0, f"pdserve up failed:\n{up.stderr[-5000:]}"
        assert "http://127.0.0.1:8000/v1" in up.stdout
        import ray

        ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
        settings = yaml.safe_load(config.read_text())["applications"][0]["args"]
        direct = direct_ingress_bases(len(E2E_APPS))
        # `pdserve up` names each application's direct-ingress URL first, the proxy's after it
        assert f"pdserve: {direct['/']}/v1 (" in up.stdout and f"colocated: {direct['/colocated']}/colocated/v1 (" \
            in up.stdout, up.stdout
        yield Cluster(base="http://127.0.0.1:8000", model=settings["model"]["served_model_name"], direct=direct)
    finally:
        try:
            import ray

            ray.shutdown()
        finally:
            subprocess.run([PDSERVE, "down"], env=env, timeout=300)


@pytest.fixture(scope="session")
def http(cluster):
    with httpx.Client(timeout=300, headers=AUTH) as client:
        yield client
