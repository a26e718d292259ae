"""Helpers for the Helm chart tests: install helm, render the chart, validate what it renders.

Nothing here talks to a cluster. Built-in kinds are checked with kubernetes-validate's offline schemas; the
RayService with KubeRay's own CRD schema (``../shared/crds/ray.io_rayservices.yaml`` beside the repo), made
strict; the Prometheus Operator kinds have no schema at hand and are only checked by the tests' assertions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "pdserve"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
BROKEN_VALUES = CHART / "ci-broken" / "broken-values.yaml"
INSTALL_HELM = ROOT / "helm" / "install_helm.py"
CRD_PATH = ROOT.parent / "shared" / "crds" / "ray.io_rayservices.yaml"
RELEASE, NAMESPACE = "pdserve-ci", "llm"

# Kubernetes versions the built-in kinds must validate against: the chart's kubeVersion floor and the newest
# that the pinned kubernetes-validate ships.
KUBE_VERSIONS = ("1.27", "1.37")
# Kinds kubernetes-validate has no schema for, and how each is checked instead.
CRD_KINDS = {
    "RayService": "KubeRay CRD: validated against ray.io_rayservices.yaml's openAPIV3Schema (strict)",
    "PodMonitor": "Prometheus Operator CRD: no schema offline; fields asserted in tests/test_helm.py",
    "ServiceMonitor": "Prometheus Operator CRD: no schema offline; fields asserted in tests/test_helm.py",
}


def cache_dir() -> Path:
    return Path(os.environ.get("PDSERVE_CACHE_DIR", Path.home() / ".cache" / "pdserve")).expanduser()


def install_helm(dest: Path) -> tuple[Path, str]:
    """Run the project's own installer; returns the binary and what the installer said."""
    proc = subprocess.run([sys.executable, str(INSTALL_HELM), "--dest", str(dest)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"helm/install_helm.py failed:\n{proc.stderr}")
    return Path(proc.stdout.strip().splitlines()[-1]), proc.stderr


def helm(binary: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = os.environ | {"HELM_CACHE_HOME": str(cache_dir() / "helm-home" / "cache"),
                        "HELM_CONFIG_HOME": str(cache_dir() / "helm-home" / "config"),
                        "HELM_DATA_HOME": str(cache_dir() / "helm-home" / "data")}
    proc = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=120, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc


def render(binary: Path, *values: Path, sets: tuple[str, ...] = ()) -> list[dict]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for v in values:
        args += ["-f", str(v)]
    for s in sets:
        args += ["--set", s]
    return [d for d in yaml.safe_load_all(helm(binary, *args).stdout) if d]


def render_notes(binary: Path, *values: Path, sets: tuple[str, ...] = ()) -> str:
    """templates/NOTES.txt as `helm install` would print it. `helm template` skips NOTES.txt and `install --dry-run`
    needs a cluster, so a copy of the chart wraps it in a named template and renders that into one YAML string."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        chart = Path(tmp) / CHART.name
        shutil.copytree(CHART, chart)
        notes = (chart / "templates" / "NOTES.txt").read_text()
        (chart / "templates" / "_notes_test.tpl").write_text(
            '{{- define "test.notes" -}}\n' + notes + "\n{{- end }}\n")
        (chart / "templates" / "notes-test.yaml").write_text('text: {{ include "test.notes" . | toJson }}\n')
        args = ["template", RELEASE, str(chart), "--namespace", NAMESPACE, "--show-only", "templates/notes-test.yaml"]
        for v in values:
            args += ["-f", str(v)]
        for s in sets:
            args += ["--set", s]
        return yaml.safe_load(helm(binary, *args).stdout)["text"]


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    [doc] = of_kind(docs, kind)
    return doc


# ---- schemas --------------------------------------------------------------------------------------------------

def validate_builtin(doc: dict) -> None:
    """kubernetes-validate --strict for every version in KUBE_VERSIONS; raises SchemaNotFoundError for CRDs."""
    for version in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            raise AssertionError(
                f"{doc['kind']}/{doc['metadata']['name']} (k8s {version}): {where}: {exc.message}") from None


def strict_schema(node):
    """Drop `x-kubernetes-*` keys; objects with `properties` and no `additionalProperties` reject unknown fields."""
    if isinstance(node, list):
        return [strict_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if "properties" in out and "additionalProperties" not in out and out.get("type", "object") == "object":
        out["additionalProperties"] = False
    return out


# Where no shared/crds sits beside the repository (a user's clone), the same file from KubeRay's repository at a
# pinned release, downloaded once into the cache; without network the CRD-schema checks skip and say why.
CRD_URL = ("https://raw.githubusercontent.com/ray-project/kuberay/v1.5.1/"
           "ray-operator/config/crd/bases/ray.io_rayservices.yaml")


def crd_path() -> Path | None:
    if CRD_PATH.is_file():
        return CRD_PATH
    cached = cache_dir() / "crds" / "kuberay-v1.5.1-ray.io_rayservices.yaml"
    if not cached.is_file():
        import urllib.request

        try:
            with urllib.request.urlopen(CRD_URL, timeout=30) as resp:
                text = resp.read().decode()
        except OSError:
            return None
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(text)
    return cached


@lru_cache(maxsize=1)
def _rayservice_validator(path: Path) -> jsonschema.Draft7Validator:
    crd = yaml.safe_load(path.read_text())
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(strict_schema(version["schema"]["openAPIV3Schema"]))


def rayservice_validator() -> jsonschema.Draft7Validator:
    path = crd_path()
    if path is None:
        import pytest

        pytest.skip(f"KubeRay's RayService CRD is neither at {CRD_PATH} nor downloadable from {CRD_URL}")
    return _rayservice_validator(path)


def rayservice_errors(doc: dict) -> list[str]:
    """CRD schema violations of one rendered RayService, as 'path: message' lines."""
    errors = sorted(rayservice_validator().iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


# ---- reading a rendered RayService ----------------------------------------------------------------------------

def serve_config(rayservice: dict) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def worker_groups(rayservice: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


def ray_start_resources(params: dict) -> dict[str, float]:
    """Decode `rayStartParams.resources`, KubeRay's shell-quoted JSON: '"{\\"pdserve_prefill\\":1}"'."""
    raw = params.get("resources")
    if raw is None:
        return {}
    assert raw.startswith('"') and raw.endswith('"'), f"resources must be a quoted JSON string: {raw!r}"
    return json.loads(raw[1:-1].replace('\\"', '"'))


def pod_specs(rayservice: dict) -> dict[str, dict]:
    """groupName (head: 'head') -> pod spec."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    specs = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    specs.update({name: g["template"]["spec"] for name, g in worker_groups(rayservice).items()})
    return specs


def containers(pod_spec: dict) -> list[dict]:
    """Every container of a pod spec, init containers included."""
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"]]


def pod_labels(rayservice: dict) -> dict[str, dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    labels = {"head": cluster["headGroupSpec"]["template"]["metadata"]["labels"]}
    labels.update({name: g["template"]["metadata"]["labels"] for name, g in worker_groups(rayservice).items()})
    return labels


def app_deployments(settings) -> dict:
    """Serve deployments (name -> Deployment) that the app's own builder makes from these settings; no Ray."""
    from ray.serve import Application

    from deployments.app import build_app

    found, todo = {}, [build_app(settings)]
    while todo:
        deployment = todo.pop()._bound_deployment
        found[deployment.name] = deployment
        todo += [a for a in (*deployment.init_args, *deployment.init_kwargs.values()) if isinstance(a, Application)]
    return found
