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

from .config import SettingsError, load_serve_config
from .credentials import api_key_file, node_environ, ray_token_path, use_ray_auth
from .models import cache_dir, prepare_default_model, prepare_tiny_model
from .settings import API_KEY_ENV, API_KEY_FILE_ENV, DEFAULT_MODEL

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "cluster" / "local-disaggregated.yaml"
METRICS_PORT = 8080  # Ray's metrics export port, KubeRay's convention


def _state_file() -> Path:
    return cache_dir() / "up-state.json"


def _say(msg: str) -> None:
    print(f"[pdserve] {msg}", flush=True)


def ray_cli() -> str:
    """The `ray` CLI of this environment."""
    return str(Path(sys.executable).with_name("ray"))


def _connect(start_if_missing: bool, num_cpus: int, node_env: dict[str, str] | None = None,
             node_ip: str = "127.0.0.1") -> bool:
    """Connect to RAY_ADDRESS or a running local cluster, with Ray's token; start a local head (environment
    ``node_env``, on ``node_ip``: loopback unless asked otherwise) if asked. True if started."""
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
    _say(f"starting a local Ray head on {node_ip} ({num_cpus} logical CPUs, metrics on :{METRICS_PORT}); "
         + (f"Ray token authentication on, token in {ray_token_path()} (`ray get-auth-token` prints it)"
            if os.environ.get("RAY_AUTH_MODE") == "token" else "Ray token authentication OFF (RAY_AUTH_MODE)"))
    subprocess.run(
        [ray_cli(), "start", "--head", f"--node-ip-address={node_ip}", f"--num-cpus={num_cpus}",
         f"--metrics-export-port={METRICS_PORT}", "--disable-usage-stats", "--include-dashboard=false"],
        check=True, stdout=subprocess.DEVNULL, env=(node_env or {}) | node_environ(),
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


def _in_head_namespace(multinode: dict, argv: list[str]) -> int:
    """Run ``pdserve ARGV`` as a driver inside the head node's namespace (Ray drivers need a local raylet)."""
    from cluster.multinode import in_namespace

    env = node_environ(single_node=False) | {"RAY_ADDRESS": multinode["head"]["address"]}
    cmd = in_namespace(multinode["head"]["namespace"], [sys.executable, "-m", "deployments.cli", *argv])
    return subprocess.run(cmd, env=env).returncode


def cmd_up_multinode(args) -> int:
    """Nodes as network namespaces (cluster/multinode.py), then `up` of their Serve config from the head."""
    from cluster import multinode

    try:
        topo, serve_config = multinode.load_topology(args.topology)
        apps = load_serve_config(serve_config)
    except (SettingsError, OSError, ValueError) as exc:
        print(f"pdserve: {exc}", file=sys.stderr)
        return 2
    why = multinode.preflight()
    if why:
        print(f"pdserve: a local multi-node cluster cannot start here: {why}", file=sys.stderr)
        return 2
    if _state_file().exists():
        print("pdserve: a cluster started by `pdserve up` is running: `pdserve down` first", file=sys.stderr)
        return 2
    if any(s.model.source == DEFAULT_MODEL for _, s in apps):
        prepare_default_model()  # once, before the nodes start: their replicas share this machine's cache folder
    from .api.direct_ingress import ray_node_env

    try:
        state = multinode.start(topo, ray_cli(), ray_node_env([s for _, s in apps]))
    except RuntimeError as exc:
        print(f"pdserve: {exc}", file=sys.stderr)
        return 1
    _state_file().parent.mkdir(parents=True, exist_ok=True)
    _state_file().write_text(json.dumps({"multinode": state, "apps": [a.name for a, _ in apps]}))
    prom = cache_dir() / "prometheus-multinode.yml"
    prom.write_text(multinode.prometheus_config(state))
    rc = _in_head_namespace(state, ["up", "--config", str(serve_config), "--timeout", str(args.timeout)])
    if rc != 0:
        print(f"pdserve: deploying on the multi-node cluster failed; node logs: {multinode.temp_dir(topo.head)}/"
              "session_latest/logs (on every node's temp dir); `pdserve down` removes the cluster", file=sys.stderr)
        return rc
    print("metrics targets: " + " ".join(f"http://{n['address']}:{multinode.METRICS_PORT}/metrics ({n['name']})"
                                         for n in state["nodes"]))
    print(f"prometheus config for these targets: {prom}")
    return 0


def cmd_up(args) -> int:
    if args.topology:
        return cmd_up_multinode(args)
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

    from .api.direct_ingress import ray_node_env
    from .app import build_app

    started = _connect(True, args.num_cpus, ray_node_env([s for _, s in apps]), args.node_ip_address)
    state = {"started_head": started, "apps": [a.name for a, _ in apps], "node_ip": args.node_ip_address}
    if _state_file().exists():
        old = json.loads(_state_file().read_text())
        state = old | {"started_head": started or old.get("started_head", False),
                       "apps": sorted(set(state["apps"]) | set(old.get("apps", [])))}
    _state_file().parent.mkdir(parents=True, exist_ok=True)
    _state_file().write_text(json.dumps(state))
    serve.start(proxy_location="HeadOnly", http_options={"host": http.host, "port": http.port})
    t0 = time.monotonic()
    _say("deploying " + ", ".join(f"'{a.name}' ({s.mode}) at {a.route_prefix}" for a, s in apps))
    key_file = api_key_file(cache_dir())
    ingress_env = {API_KEY_FILE_ENV: key_file} if key_file else None  # the file's path, never the key
    _say(f"API key: required, read from {key_file}" if key_file else
         f"API key: none: set {API_KEY_FILE_ENV} (a file of keys) or {API_KEY_ENV} to require one")
    targets = [serve.RunTarget(build_app(s, ingress_env), name=a.name, route_prefix=a.route_prefix) for a, s in apps]
    try:
        _progress_while(lambda: serve.run_many(targets), "starting engines")
    except RuntimeError as exc:
        reasons = "".join(f"\n  {line}" for line in _failed_deployments([a.name for a, _ in apps]))
        print(f"pdserve: deployment failed: {exc}{reasons}\nreplica logs: /tmp/ray/session_latest/logs/serve/; "
              "`pdserve down` removes what was deployed", file=sys.stderr)
        return 1
    return _wait_and_say_where(apps, http, started, args.timeout, t0)


def _wait_and_say_where(apps, http, started: bool, timeout_s: float, t0: float) -> int:
    """Wait until every application answers on each of its URLs; print them and the metrics target."""
    import ray

    from .api.direct_ingress import direct_ingress_urls

    # Listening on every address: clients reach it on the head node's Ray address.
    host = ray.util.get_node_ip_address() if http.host in ("0.0.0.0", "::") else http.host
    base = f"http://{host}:{http.port}"
    try:
        direct = direct_ingress_urls([a.name for a, _ in apps], http) if http.direct_ingress_port else {}
        for app, _ in apps:
            for url in (base, *direct.get(app.name, [])):
                wait_http(f"{url}{app.route_prefix.rstrip('/')}/health", timeout_s)
    except TimeoutError as exc:
        print(f"pdserve: {exc}\nreplica logs: /tmp/ray/session_latest/logs/serve/", file=sys.stderr)
        return 1
    _say(f"ready in {time.monotonic() - t0:.0f} s")
    for app, settings in apps:
        urls = [f"{u}{app.route_prefix.rstrip('/')}/v1" for u in (*direct.get(app.name, []), base)]
        via = f"; direct ingress, also through Serve's proxy: {urls[-1]}" if len(urls) > 1 else ""
        print(f"{app.name}: {urls[0]} ({settings.mode}, model '{settings.model.served_model_name}'{via})")
    print(f"metrics: http://{'127.0.0.1' if started else ray.util.get_node_ip_address()}:{METRICS_PORT}/metrics")
    return 0


def _failed_deployments(app_names: list[str]) -> list[str]:
    """'<deployment>: <the error its replica raised>' for each failed deployment of these applications (Serve's
    status message ends with the replica constructor's traceback: its last line is the error)."""
    from ray import serve

    try:
        apps = serve.status().applications
    except Exception:  # the reason is best effort; the failure itself is reported either way
        return []
    reasons = []
    for app in (a for a in app_names if a in apps):
        for name, d in apps[app].deployments.items():
            if d.status.value in ("DEPLOY_FAILED", "UNHEALTHY"):
                lines = [line for line in (d.message or "").splitlines() if line.strip()]
                reasons.append(f"{name}: {lines[-1] if lines else '(no message)'}")
    return reasons


def cmd_status(args) -> int:
    state = json.loads(_state_file().read_text()) if _state_file().exists() else {}
    if state.get("multinode") and not os.environ.get("RAY_ADDRESS"):
        return _in_head_namespace(state["multinode"], ["status"])
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
    print("nodes:")
    for line in _node_lines():
        print(f"  {line}")
    return 0 if status.applications else 1


def _node_lines() -> list[str]:
    """One line per Ray node: address, role (from the pdserve_* resource it offers), state, Serve replicas."""
    import ray
    from ray.serve.context import _get_global_client

    replicas: dict[str, list[str]] = {}
    for app in _get_global_client().get_serve_details().get("applications", {}).values():
        for dep_name, dep in app.get("deployments", {}).items():
            for r in dep.get("replicas", []):
                replicas.setdefault(r.get("node_ip") or "?", []).append(f"{dep_name}:{r['replica_id']}")
    gcs_host = ray.get_runtime_context().gcs_address.rsplit(":", 1)[0]
    lines = []
    for node in sorted(ray.nodes(), key=lambda n: n["NodeManagerAddress"]):
        addr, res = node["NodeManagerAddress"], node.get("Resources", {})
        role = next((r.removeprefix("pdserve_") for r in ("pdserve_prefill", "pdserve_decode") if r in res),
                    "head" if addr == gcs_host else "worker")
        alive = "alive" if node["Alive"] else "dead"
        lines.append(f"{addr:<15} {role:<8} {alive:<5} {' '.join(sorted(replicas.get(addr, []))) or '-'}")
    return lines


def cmd_down(args) -> int:
    state = json.loads(_state_file().read_text()) if _state_file().exists() else {}
    if not state:
        print("nothing started by `pdserve up`")
        return 0
    if state.get("multinode"):
        from cluster.multinode import stop

        stop(state["multinode"])
        _say("stopped the multi-node cluster: " + ", ".join(state["multinode"]["namespaces"])
             + f" and bridge {state['multinode']['bridge']} removed")
        _state_file().unlink(missing_ok=True)
        return 0
    try:
        _connect(False, 0)
        from ray import serve
        from ray.serve.exceptions import RayServeException

        try:  # every application at once: each one's replicas drain in parallel
            for name in state.get("apps", []):
                serve.delete(name, _blocking=False)
            _wait_deleted(serve, state.get("apps", []))
        except RayServeException:  # Serve itself was shut down already (`serve shutdown`): nothing to delete
            _say("Serve is not running")
    except ConnectionError:
        pass
    if state.get("started_head"):
        import ray

        ray.shutdown()
        subprocess.run([ray_cli(), "stop", "--force"], check=False, stdout=subprocess.DEVNULL)
        _say("stopped the local Ray head")
    _state_file().unlink(missing_ok=True)
    return 0


def _wait_deleted(serve, names: list[str], timeout_s: float = 120) -> None:
    """Until Serve no longer lists the applications; past the deadline the head going down stops what is left."""
    deadline = time.monotonic() + timeout_s
    left = set(names)
    while left and time.monotonic() < deadline:
        left &= set(serve.status().applications)
        if left:
            time.sleep(0.5)
    for name in names:
        _say(f"application '{name}' " + ("not deleted yet: the head going down stops it" if name in left
                                         else "deleted"))


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
    up.add_argument("--node-ip-address", default="127.0.0.1",
                    help="address a local Ray head binds to (default: %(default)s: nothing listens beyond this "
                    "machine; give the machine's cluster address to let other nodes join)")
    up.add_argument("--topology", help="start a local multi-node cluster first (nodes as network namespaces, root "
                    "only) and deploy its serve_config: e.g. cluster/local-multinode.yaml")
    up.set_defaults(fn=cmd_up)
    sub.add_parser("status", help="applications and replicas").set_defaults(fn=cmd_status)
    sub.add_parser("down", help="delete what `up` deployed; stop the head if `up` started it").set_defaults(fn=cmd_down)
    prep = sub.add_parser("prepare-model", help="convert the default model into the cache folder")
    prep.add_argument("--tiny", action="store_true", help="the tiny random-weight test model instead")
    prep.set_defaults(fn=cmd_prepare_model)
    args = parser.parse_args(argv)
    if args.cmd in ("up", "status", "down"):  # before Ray is imported: it reads both settings once
        state = json.loads(_state_file().read_text()) if _state_file().exists() else {}
        multinode = bool(getattr(args, "topology", None) or state.get("multinode"))
        use_ray_auth(None if multinode else getattr(args, "node_ip_address", None) or state.get("node_ip", "127.0.0.1"))
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
