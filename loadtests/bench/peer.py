"""The benchmark's peer: Ray Serve LLM's own P/D builder, ``ray.serve.llm.build_pd_openai_app``, on this machine.

    python -m loadtests.bench.peer up --variant shipped     # NIXL as vLLM ships it (busy-polling progress thread)
    python -m loadtests.bench.peer up --variant nixl-fix    # the same, with pdserve's vLLM plugins loaded
    python -m loadtests.bench.peer down

Same model, dtype, engine limits and cores as pdserve's default config (one prefill engine on core 0, one
decode engine on core 1, NixlConnector with ``kv_buffer_device=cpu``), served on :8000 like pdserve, so the
same load test runs against it. Needs ``pyarrow`` (Ray Serve LLM imports it), part of ``pip install -e ".[test]"``.

The fix is pdserve's vLLM general plugins (``deployments/engine/nixl_plugin.py``: NIXL's idle spin;
``cpu_plugin.py``: engines kept on their cores, no EngineCore spin); being installed entry points, vLLM loads them
in every engine process of the venv, the peer's too. ``shipped`` sets
``VLLM_PLUGINS=""`` (an allowlist naming no plugin) so the peer runs exactly as a user gets it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from deployments.cli import ray_cli, wait_http
from deployments.models import DEFAULT_MODEL_DIRNAME, prepare_default_model

VARIANTS = ("shipped", "nixl-fix")
HTTP_PORT = 8000
READY_TIMEOUT_S = 900


def pd_serving_args(model_path: str, variant: str, *, max_num_seqs: int = 8, dtype: str = "bfloat16") -> dict:
    """``build_pd_openai_app``'s argument: a prefill and a decode LLMConfig, each engine bound to its own core."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")

    def llm_config(core: str) -> dict:
        env = {"VLLM_CPU_OMP_THREADS_BIND": core, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
        if variant == "shipped":
            env["VLLM_PLUGINS"] = ""
        return {
            "model_loading_config": {"model_id": DEFAULT_MODEL_DIRNAME, "model_source": model_path},
            "placement_group_config": {"bundles": [{"CPU": 1}]},
            "deployment_config": {"num_replicas": 1},
            "engine_kwargs": {
                "dtype": dtype, "max_model_len": 2048, "max_num_seqs": max_num_seqs, "enforce_eager": True,
                "kv_transfer_config": {"kv_connector": "NixlConnector", "kv_role": "kv_both",
                                       "kv_buffer_device": "cpu"},
            },
            "runtime_env": {"env_vars": env},
        }

    return {"prefill_config": llm_config("0"), "decode_config": llm_config("1")}


def _ray(*args: str, check: bool = True) -> None:
    subprocess.run([ray_cli(), *args], check=check, stdout=subprocess.DEVNULL)


def up(variant: str, num_cpus: int = 8) -> float:
    """Starts a fresh local Ray head and deploys the peer; returns seconds until it answered /v1/models."""
    model_path = str(prepare_default_model())
    _ray("start", "--head", f"--num-cpus={num_cpus}", "--include-dashboard=false", "--disable-usage-stats")
    import ray
    from ray import serve
    from ray.serve.llm import build_pd_openai_app

    t0 = time.monotonic()
    ray.init(address="auto", logging_level="WARNING")
    serve.start(http_options={"host": "127.0.0.1", "port": HTTP_PORT})
    serve.run(build_pd_openai_app(pd_serving_args(model_path, variant)), name="rayllm-pd", route_prefix="/",
              blocking=False)
    wait_http(f"http://127.0.0.1:{HTTP_PORT}/v1/models", READY_TIMEOUT_S)
    return time.monotonic() - t0


def down() -> None:
    """Deletes the app (its engines shut down), stops the head, then kills vLLM engine processes the peer's
    replicas left behind: on CPU they run as child processes that outlive a killed replica (measured: ~6 GiB
    of orphaned EngineCore/Worker processes after a bare ``ray stop``)."""
    import psutil

    try:
        import ray
        from ray import serve

        ray.init(address="auto", logging_level="WARNING")
        serve.delete("rayllm-pd")
        ray.shutdown()
    except Exception:  # nothing running, or already gone: the rest still cleans up
        pass
    _ray("stop", "--force", check=False)
    orphans = [p for p in psutil.process_iter(["name", "ppid"])
               if p.info["name"].startswith("VLLM::") and p.info["ppid"] == 1]
    for proc in orphans:
        for child in proc.children(recursive=True) + [proc]:
            child.kill()
    psutil.wait_procs(orphans, timeout=10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench.peer", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    start = sub.add_parser("up", help="start a local Ray head and deploy Ray Serve LLM's P/D app on :8000")
    start.add_argument("--variant", choices=VARIANTS, default="shipped")
    sub.add_parser("down", help="stop the local Ray head")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.cmd == "up":
        print(f"[peer] Ray Serve LLM P/D ({args.variant}) ready in {up(args.variant):.0f} s", flush=True)
    else:
        down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
