"""A multi-node Ray cluster on one Linux machine: each node is a network namespace with its own IPv4 address.

Read ``cluster/local-multinode.yaml`` first: it names the nodes (head, prefill, decode), their logical CPUs and
custom resources, and the Serve config deployed on them. ``pdserve up --topology FILE`` calls ``start``; ``pdserve
down`` calls ``stop`` with what ``start`` recorded. Needs root and iproute2 (``ip netns``, veth, a bridge).

    host ── bridge (subnet .254) ─┬─ veth ── [namespace pdserve-head]     eth0 subnet.1  raylet + GCS, Serve, ingress
                                  ├─ veth ── [namespace pdserve-prefill1] eth0 subnet.2  raylet, prefill replicas
                                  └─ veth ── [namespace pdserve-decode1]  eth0 subnet.3  raylet, decode replicas

The namespaces get no default route, so their traffic reaches only each other and the host's bridge address.
Each raylet runs with ``--node-ip-address`` of its namespace and its own temp dir. Namespaces still share the
file system and /dev/shm: the Serve config pins UCX to ``eth0`` over TCP, so KV bytes really cross the veths.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.credentials import node_environ

NAMESPACE_PREFIX = "pdserve-"
RAY_PORT = 6379
METRICS_PORT = 8080  # every node's Ray metrics target (KubeRay's convention)
NODE_DEVICE = "eth0"  # the node's interface inside its namespace


class NodeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[a-z][a-z0-9]{0,9}$", description="Short node name; its namespace is pdserve-NAME.")
    role: Literal["head", "prefill", "decode", "worker"] = Field(
        description="What the node runs: the head holds GCS, Serve and the ingress; each role's node offers the "
        "resource pdserve_<role> that the ingress or the pool asks for."
    )
    num_cpus: float = Field(2, ge=0, description="Logical CPUs the node offers to Ray.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Extra Ray custom resources; the node also gets "
        "pdserve_<role>: 100 (the ingress and each replica ask for 1 of its role's)."
    )

    def ray_resources(self) -> dict[str, float]:
        own = {f"pdserve_{self.role}": 100.0} if self.role != "worker" else {}
        return own | self.resources


class Topology(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    subnet: str = Field("10.77.0.0/24", description="IPv4 subnet of the bridge; nodes get .1, .2, ... in order.")
    bridge: str = Field("pdserve0", max_length=15, description="Name of the host's bridge.")
    serve_config: str = Field(description="Serve config deployed on the cluster, relative to this file.")
    nodes: list[NodeSpec] = Field(min_length=2, description="The nodes; exactly one has role 'head'.")

    @model_validator(mode="after")
    def _one_head(self) -> Topology:
        if [n.role for n in self.nodes].count("head") != 1:
            raise ValueError("exactly one node must have role 'head'")
        if len({n.name for n in self.nodes}) != len(self.nodes):
            raise ValueError("node names must be unique")
        if len(self.nodes) + 1 > ipaddress.ip_network(self.subnet).num_addresses - 2:
            raise ValueError(f"subnet {self.subnet} is too small for {len(self.nodes)} nodes")
        return self

    def host_address(self) -> str:
        return str(list(ipaddress.ip_network(self.subnet).hosts())[-1])

    def address(self, node: NodeSpec) -> str:
        return str(list(ipaddress.ip_network(self.subnet).hosts())[self.nodes.index(node)])

    @property
    def head(self) -> NodeSpec:
        return next(n for n in self.nodes if n.role == "head")

    @property
    def prefix_len(self) -> int:
        return ipaddress.ip_network(self.subnet).prefixlen


def load_topology(path: str | Path) -> tuple[Topology, Path]:
    """The topology and the absolute path of its Serve config."""
    path = Path(path)
    topo = Topology.model_validate(yaml.safe_load(path.read_text()))
    return topo, (path.parent / topo.serve_config).resolve()


def namespace(node: NodeSpec) -> str:
    return NAMESPACE_PREFIX + node.name


def temp_dir(node: NodeSpec) -> str:
    return f"/tmp/pdray/{node.name}"  # short: Ray's unix sockets live under it (108-byte path limit)


def veth_name(topo: Topology, index: int) -> str:
    return f"{topo.bridge[:9]}v{index}"  # the host's end of node ``index``'s link (15 characters at most)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def in_namespace(ns: str, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def preflight() -> str | None:
    """Why a multi-node cluster cannot start here, or None."""
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if _ip("netns", "list", check=False).returncode != 0:
        return "'ip netns' does not work here"
    return None


def _say(msg: str) -> None:
    print(f"[pdserve] {msg}", flush=True)


def _network_up(topo: Topology) -> None:
    br = topo.bridge
    _ip("link", "add", br, "type", "bridge")
    _ip("addr", "add", f"{topo.host_address()}/{topo.prefix_len}", "dev", br)
    _ip("link", "set", br, "up")
    for i, node in enumerate(topo.nodes):
        ns, veth = namespace(node), veth_name(topo, i)
        _ip("netns", "add", ns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", NODE_DEVICE, "netns", ns)
        _ip("link", "set", veth, "master", br, "up")
        _ip("-n", ns, "addr", "add", f"{topo.address(node)}/{topo.prefix_len}", "dev", NODE_DEVICE)
        _ip("-n", ns, "link", "set", NODE_DEVICE, "up")
        _ip("-n", ns, "link", "set", "lo", "up")


def _ray_start(topo: Topology, node: NodeSpec, ray_bin: str, env: dict[str, str]) -> None:
    argv = [ray_bin, "start", f"--node-ip-address={topo.address(node)}", f"--num-cpus={node.num_cpus:g}",
            f"--resources={json.dumps(node.ray_resources())}", f"--metrics-export-port={METRICS_PORT}",
            f"--temp-dir={temp_dir(node)}", "--disable-usage-stats"]
    if node.role == "head":
        argv += ["--head", f"--port={RAY_PORT}", "--include-dashboard=false"]
    else:
        argv += [f"--address={topo.address(topo.head)}:{RAY_PORT}"]
    done = subprocess.run(in_namespace(namespace(node), argv), capture_output=True, text=True,
                          env=env | node_environ(single_node=False))  # no API key
    if done.returncode != 0:
        raise RuntimeError(f"ray start on node {node.name} failed:\n{done.stderr[-2000:]}")


def start(topo: Topology, ray_bin: str, env: dict[str, str] | None = None) -> dict:
    """Namespaces, bridge and one Ray node per namespace (with ``env`` added to their environment, where it does not
    set those variables itself); returns the state ``stop`` needs."""
    state = {"bridge": topo.bridge, "namespaces": [namespace(n) for n in topo.nodes],
             "veths": [veth_name(topo, i) for i in range(len(topo.nodes))],
             "temp_dirs": [temp_dir(n) for n in topo.nodes],
             "head": {"namespace": namespace(topo.head), "address": f"{topo.address(topo.head)}:{RAY_PORT}"},
             "nodes": [{"name": n.name, "role": n.role, "address": topo.address(n)} for n in topo.nodes]}
    t0 = time.monotonic()
    stop(state)  # leftovers of an earlier run that was killed before it could record them
    try:
        _network_up(topo)
        _say("network: " + ", ".join(f"{n.name} ({n.role}) {topo.address(n)}" for n in topo.nodes)
             + f"; host {topo.host_address()} on bridge {topo.bridge}")
        for node in sorted(topo.nodes, key=lambda n: n.role != "head"):
            _ray_start(topo, node, ray_bin, env or {})
            _say(f"ray node {node.name} started ({time.monotonic() - t0:.0f} s)")
    except (subprocess.CalledProcessError, RuntimeError) as exc:
        detail = exc.stderr if isinstance(exc, subprocess.CalledProcessError) else ""
        stop(state)
        raise RuntimeError(f"multi-node start failed: {exc} {detail}".strip()) from None
    return state


def stop(state: dict) -> None:
    """Kill every process in the namespaces, delete them, the links, the bridge and the nodes' temp dirs."""
    for ns in state.get("namespaces", []):
        freeze_node(ns, False)  # a frozen process dies only once continued
        kill_node(ns)
    deadline = time.monotonic() + 30
    while any(_ip("netns", "pids", ns, check=False).stdout.split() for ns in state.get("namespaces", [])):
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for ns in state.get("namespaces", []):
        _ip("netns", "del", ns, check=False)
    for link in [*state.get("veths", []), state.get("bridge")]:
        if link:
            _ip("link", "del", link, check=False)
    for d in state.get("temp_dirs", []):
        shutil.rmtree(d, ignore_errors=True)


def link_bytes(ns: str, device: str = NODE_DEVICE) -> dict[str, int]:
    """The interface's byte counters inside a namespace: {'rx': ..., 'tx': ...}."""
    stats = json.loads(_ip("-n", ns, "-j", "-s", "link", "show", device).stdout)[0]["stats64"]
    return {"rx": int(stats["rx"]["bytes"]), "tx": int(stats["tx"]["bytes"])}


# Faults, for the chaos runner and the tests: a node killed or frozen, the link between two nodes cut or degraded.

def kill_node(ns: str) -> int:
    """SIGKILL every process of the node (its raylet, workers and engines): the node is lost. Returns how many."""
    pids = _ip("netns", "pids", ns, check=False).stdout.split()
    subprocess.run(["kill", "-9", *pids], check=False, capture_output=True)
    return len(pids)


def freeze_node(ns: str, frozen: bool = True) -> None:
    """SIGSTOP (or SIGCONT) every process of the node: a hung machine, which keeps its connections open."""
    pids = _ip("netns", "pids", ns, check=False).stdout.split()
    subprocess.run(["kill", "-STOP" if frozen else "-CONT", *pids], check=False, capture_output=True)


def cut_link(a: tuple[str, str], b: tuple[str, str], cut: bool = True) -> None:
    """Drop all traffic between two nodes, given as (namespace, address); both still reach every other node."""
    action = "add" if cut else "del"
    for (ns, _), (_, peer) in ((a, b), (b, a)):
        _ip("-n", ns, "route", action, "blackhole", f"{peer}/32", check=cut)


class LinkShapingUnavailable(RuntimeError):
    """This kernel lacks a queueing discipline the fault needs (e.g. netem)."""


def missing_qdisc(kind: str) -> str | None:
    """Why this kernel cannot shape traffic with ``kind`` (tried in a scratch namespace), or None if it can."""
    ns = f"{NAMESPACE_PREFIX}probe"
    _ip("netns", "add", ns, check=False)
    try:
        args = {"netem": ["delay", "1ms"], "htb": ["default", "1"]}.get(kind, [])
        done = subprocess.run(in_namespace(ns, ["tc", "qdisc", "add", "dev", "lo", "root", "handle", "1:", kind,
                                                *args]), capture_output=True, text=True)
        return None if done.returncode == 0 else f"tc qdisc {kind}: {done.stderr.strip()}"
    finally:
        _ip("netns", "del", ns, check=False)


def degrade_link(a: tuple[str, str], b: tuple[str, str], delay_ms: float = 0, loss_pct: float = 0,
                 rate_mbit: float | None = None) -> None:
    """Shape only the traffic between two nodes (each side's packets to the other; the head's are untouched):
    a bandwidth cap (tc htb) and/or delay and loss (tc netem). No arguments heal it."""
    for (ns, _), (_, peer) in ((a, b), (b, a)):
        tc = ["ip", "netns", "exec", ns, "tc"]
        subprocess.run([*tc, "qdisc", "del", "dev", NODE_DEVICE, "root"], check=False, capture_output=True)
        if not delay_ms and not loss_pct and rate_mbit is None:
            continue
        dev = ["dev", NODE_DEVICE]
        cmds = [["qdisc", "add", *dev, "root", "handle", "1:", "htb", "default", "10"],
                ["class", "add", *dev, "parent", "1:", "classid", "1:10", "htb", "rate", "100gbit"],
                ["class", "add", *dev, "parent", "1:", "classid", "1:20", "htb", "rate",
                 f"{rate_mbit or 100_000:g}mbit"]]
        if delay_ms or loss_pct:
            cmds.append(["qdisc", "add", *dev, "parent", "1:20", "handle", "20:", "netem",
                         "delay", f"{delay_ms:g}ms", "loss", f"{loss_pct:g}%"])
        cmds.append(["filter", "add", *dev, "protocol", "ip", "parent", "1:", "prio", "1", "u32",
                     "match", "ip", "dst", f"{peer}/32", "flowid", "1:20"])
        for cmd in cmds:
            done = subprocess.run([*tc, *cmd], capture_output=True, text=True)
            if done.returncode != 0:
                subprocess.run([*tc, "qdisc", "del", "dev", NODE_DEVICE, "root"], check=False, capture_output=True)
                error = LinkShapingUnavailable if "kind is unknown" in done.stderr else RuntimeError
                raise error(f"tc {' '.join(cmd)}: {done.stderr.strip()}")


def prometheus_config(state: dict) -> str:
    """A Prometheus scrape config with every node's metrics target, labelled with its node name and role."""
    static = [{"targets": [f"{n['address']}:{METRICS_PORT}"], "labels": {"node": n["name"], "role": n["role"]}}
              for n in state["nodes"]]
    return yaml.safe_dump({"global": {"scrape_interval": "5s"},
                           "scrape_configs": [{"job_name": "pdserve-ray-nodes", "static_configs": static}]},
                          sort_keys=False)


if __name__ == "__main__":  # manual check: python cluster/multinode.py TOPOLOGY.yaml prints what it would start
    t, serve = load_topology(sys.argv[1])
    print(json.dumps({n.name: [n.role, t.address(n), n.ray_resources()] for n in t.nodes}, indent=1), serve)
