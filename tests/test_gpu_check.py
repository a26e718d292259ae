"""cluster/gpu_check.py, the NIXL transfer check for GPU machines: here with host memory (a real NIXL READ between two
processes, pdserve's plugin loaded) and its clean skip where there is no GPU.

No UCX_* setting is needed on this machine: with UCX's defaults the host-memory READ between two processes of one
container goes zero-copy through ``cma/memory`` (process_vm_readv), the lanes UCX reports are ``tcp/lo`` and
``cma/memory``. So the test leaves the caller's UCX environment as it is, as the script does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration  # runs the check script (NIXL, torch)

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "cluster" / "gpu_check.py"


def _run(*args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("PDSERVE_NIXL_PROGRESS_DELAY_US", None)  # the script sets it per run
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout_s,
                          env=env, cwd=ROOT)


def test_script_is_small():
    assert SCRIPT.stat().st_size < 40_000


def test_cpu_transfer_through_nixl(tmp_path):
    out_path = tmp_path / "result.json"
    proc = _run("--device", "cpu", "--size-mib", "8", "--iters", "3", "--out", str(out_path), timeout_s=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out_path.read_text())
    assert result["ok"] is True and result["device"] == "cpu"
    assert result["nixl_module"].endswith("._api") and result["nixl_version"]
    runs = {run["progress_delay_us"]: run for run in result["runs"]}
    assert sorted(runs) == [0, 1000]
    for delay_us, run in runs.items():
        assert run["ok"] is True and run["error"] is None, run
        assert run["gbps"] > 0 and run["median_ms"] > 0
        assert run["read_transports"], run["lanes"]  # the protocol UCX chose for the READ, e.g. cma/memory
        assert any("remote memory read" in line for line in run["lanes"]), run["lanes"]
        # pdserve's plugin: patches NIXL for a positive delay only (0 is NIXL's own default)
        assert run["plugin_patched"] == {"prefill": delay_us > 0, "decode": delay_us > 0}
        if delay_us > 0:
            assert f"pthrDelay={delay_us} us" in run["plugin_lines"]["decode"]
    assert "delay_us" in proc.stdout and "GB/s" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device: the check would run")
def test_cuda_skips_cleanly_without_a_gpu():
    proc = _run("--device", "cuda", timeout_s=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "gpu_check: no CUDA device here: skipped"
