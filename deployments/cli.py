"""`pdserve` command line: up / status / down / prepare-model."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from .models import cache_dir, prepare_default_model, prepare_tiny_model
from .settings import API_KEY_ENV, DEFAULT_MODEL, SettingsError, load_serve_config

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "cluster" / "local-disaggregated.yaml"
METRICS_PORT = 8080  # Ray's metrics export port, KubeRay's convention


def _state_file() -> Path:
    return cache_dir() / "up-state.json"


def _say(msg: str) -> None:
    print(f"[pdserve] {msg}", flush=True)


def ray_cli() -> str:
    """The `ray` CLI of this environment."""
    return str(Path(sys.executable).with_name("ray"))


def _connect(start_if_missing: bool, num_cpus: int) -> bool:
    """Connect to RAY_ADDRESS or a running local cluster; start a local head if asked. True if started."""
    import ray

    address = os.environ.get("RAY_ADDRESS")
    if address or not start_if_missing:
        ray.init(address=address or "auto", logging_level="WARNING", log_to_driver=False)
        return False
    try:
        ray.init(address="auto", logging_level="WARNING", log_to_driver=False)
        return False
    except ConnectionError:
        pass
    _say(f"starting a local Ray head ({num_cpus} logical CPUs, metrics on :{METRICS_PORT})")
    subprocess.run(
        [ray_cli(), "start", "--head", f"--num-cpus={num_cpus}", f"--metrics-export-port={METRICS_PORT}",
         "--disable-usage-stats", "--include-dashboard=false"],
        check=True, stdout=subprocess.DEVNULL,
    )
    ray.init(address="auto", logging_level="WARNING", log_to_driver=False)
    return True


def wait_http(url: str, timeout_s: float) -> None:
    """Polls ``url`` until it answers 200; TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not healthy after {timeout_s:.0f} s")
        time.sleep(1)


def _progress_while(fn, what: str):
    """Run ``fn`` while printing deployment status every 10 s (engines take tens of seconds to start)."""
    from ray import serve

    done = threading.Event()
    t0 = time.monotonic()

    def report():
        while not done.wait(10):
            try:
                apps = serve.status().applications
                states = {d: s.status.value for a in apps.values() for d, s in a.deployments.items()}
            except Exception:  # status is best effort
                states = {}
            _say(f"{what}: {time.monotonic() - t0:.0f} s, deployments {states}")

    thread = threading.Thread(target=report, daemon=True)
    thread.start()
    try:
        return fn()
    finally:
        done.set()


def cmd_up(args) -> int:
    try:
        apps = load_serve_config(args.config)
    except (SettingsError, OSError) as exc:
        print(f"pdserve: {exc}", file=sys.stderr)
        return 2
    http = apps[0][1].http
    if any(s.http != http for _, s in apps):
        print("pdserve: all applications of one config must use the same http host/port", file=sys.stderr)
        return 2
    if any(s.model.source == DEFAULT_MODEL for _, s in apps):
        prepare_default_model()

    from ray import serve

    from .app import build_app

    started = _connect(True, args.num_cpus)
    state = {"started_head": started, "apps": [a.name for a, _ in apps]}
    if _state_file().exists():
        old = json.loads(_state_file().read_text())
        state["started_head"] = state["started_head"] or old.get("started_head", False)
        state["apps"] = sorted(set(state["apps"]) | set(old.get("apps", [])))
    _state_file().parent.mkdir(parents=True, exist_ok=True)
    _state_file().write_text(json.dumps(state))
    serve.start(http_options={"host": http.host, "port": http.port})
    t0 = time.monotonic()
    _say("deploying " + ", ".join(f"'{a.name}' ({s.mode}) at {a.route_prefix}" for a, s in apps))
    key = os.environ.get(API_KEY_ENV)
    ingress_env = {API_KEY_ENV: key} if key else None
    _say(f"API key: {'required (' + API_KEY_ENV + ')' if key else 'none: set ' + API_KEY_ENV + ' to require one'}")
    targets = [serve.RunTarget(build_app(s, ingress_env), name=a.name, route_prefix=a.route_prefix) for a, s in apps]
    try:
        _progress_while(lambda: serve.run_many(targets), "starting engines")
    except RuntimeError as exc:
        print(f"pdserve: deployment failed: {exc}\nreplica logs: /tmp/ray/session_latest/logs/serve/",
              file=sys.stderr)
        return 1
    for app, _ in apps:
        wait_http(f"http://{http.host}:{http.port}{app.route_prefix.rstrip('/')}/health", args.timeout)
    base = f"http://{http.host}:{http.port}"
    _say(f"ready in {time.monotonic() - t0:.0f} s")
    for app, settings in apps:
        print(f"{app.name}: {base}{app.route_prefix.rstrip('/')}/v1 ({settings.mode}, model "
              f"'{settings.model.served_model_name}')")
    print(f"metrics: http://127.0.0.1:{METRICS_PORT}/metrics")
    return 0


def cmd_status(args) -> int:
    try:
        _connect(False, 0)
    except ConnectionError:
        print("no Ray cluster is running")
        return 1
    from ray import serve

    status = serve.status()
    for name, app in status.applications.items():
        print(f"{name}: {app.status.value}")
        for dep, d in app.deployments.items():
            print(f"  {dep}: {d.status.value} {dict(d.replica_states)}")
    return 0 if status.applications else 1


def cmd_down(args) -> int:
    state = json.loads(_state_file().read_text()) if _state_file().exists() else {}
    if not state:
        print("nothing started by `pdserve up`")
        return 0
    try:
        _connect(False, 0)
        from ray import serve

        for name in state.get("apps", []):
            serve.delete(name)
            _say(f"deleted application '{name}'")
    except ConnectionError:
        pass
    if state.get("started_head"):
        import ray

        ray.shutdown()
        subprocess.run([ray_cli(), "stop", "--force"], check=False, stdout=subprocess.DEVNULL)
        _say("stopped the local Ray head")
    _state_file().unlink(missing_ok=True)
    return 0


def cmd_prepare_model(args) -> int:
    print(prepare_tiny_model() if args.tiny else prepare_default_model())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdserve",
                                     description="Disaggregated prefill/decode LLM serving on Ray Serve")
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start (or join RAY_ADDRESS) a Ray cluster and deploy; returns when healthy")
    up.add_argument("--config", default=str(DEFAULT_CONFIG), help="Serve config YAML (default: %(default)s)")
    up.add_argument("--num-cpus", type=int, default=max(8, os.cpu_count() or 1),
                    help="logical CPUs of a local head (default: %(default)s)")
    up.add_argument("--timeout", type=float, default=900, help="seconds to wait for health")
    up.set_defaults(fn=cmd_up)
    sub.add_parser("status", help="applications and replicas").set_defaults(fn=cmd_status)
    sub.add_parser("down", help="delete what `up` deployed; stop the head if `up` started it").set_defaults(fn=cmd_down)
    prep = sub.add_parser("prepare-model", help="convert the default model into the cache folder")
    prep.add_argument("--tiny", action="store_true", help="the tiny random-weight test model instead")
    prep.set_defaults(fn=cmd_prepare_model)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
