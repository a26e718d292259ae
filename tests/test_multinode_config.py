"""Fast checks of the multi-node pieces that need no cluster: topology, addresses, ports, scrape config."""

from __future__ import annotations

import socket

import pytest
import yaml
from pydantic import ValidationError

from cluster import multinode
from deployments.config import load_serve_config
from deployments.servers.base import NUM_SPARE_PORTS, side_channel_port
from tests.conftest import ROOT


def test_shipped_topology_gives_each_node_its_own_address_and_role_resource():
    topo, serve_config = multinode.load_topology(ROOT / "cluster/local-multinode.yaml")
    assert [topo.address(n) for n in topo.nodes] == ["10.77.0.1", "10.77.0.2", "10.77.0.3"]
    assert topo.host_address() == "10.77.0.254"
    assert [n.ray_resources() for n in topo.nodes] == [{"pdserve_head": 100}, {"pdserve_prefill": 100},
                                                       {"pdserve_decode": 100}]
    [(_, settings)] = load_serve_config(serve_config)
    # The pools ask for the resources their nodes offer; KV goes over TCP on the node's own interface.
    assert settings.prefill.ray_resources == {"pdserve_prefill": 1}
    assert settings.decode.ray_resources == {"pdserve_decode": 1}
    assert settings.ingress.ray_resources == {"pdserve_head": 1}
    for pool in (settings.prefill, settings.decode):
        assert pool.env == {"UCX_TLS": "tcp", "UCX_NET_DEVICES": multinode.NODE_DEVICE}


@pytest.mark.parametrize("nodes, why", [
    ([{"name": "a", "role": "prefill"}, {"name": "b", "role": "decode"}], "exactly one node must have role 'head'"),
    ([{"name": "a", "role": "head"}, {"name": "a", "role": "decode"}], "unique"),
    ([{"name": "Head-Node", "role": "head"}, {"name": "b", "role": "decode"}], "pattern"),
])
def test_bad_topologies_are_refused(nodes, why):
    with pytest.raises(ValidationError, match=why):
        multinode.Topology(serve_config="x.yaml", nodes=nodes)


def test_subnet_must_hold_every_node():
    with pytest.raises(ValidationError, match="too small"):
        multinode.Topology(serve_config="x.yaml", subnet="10.0.0.0/30",
                           nodes=[{"name": f"n{i}", "role": "head" if i == 0 else "worker"} for i in range(3)])


def test_prometheus_config_lists_every_node():
    state = {"nodes": [{"name": "head", "role": "head", "address": "10.77.0.1"},
                       {"name": "p1", "role": "prefill", "address": "10.77.0.2"}]}
    cfg = yaml.safe_load(multinode.prometheus_config(state))
    static = cfg["scrape_configs"][0]["static_configs"]
    assert [s["targets"] for s in static] == [["10.77.0.1:8080"], ["10.77.0.2:8080"]]
    assert static[1]["labels"] == {"node": "p1", "role": "prefill"}


def test_side_channel_port_is_base_plus_local_rank_else_a_spare_from_the_range():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        base = probe.getsockname()[1] + 1000
    assert side_channel_port("127.0.0.1", base, 3) == base + 3
    with socket.socket() as held:  # a replica of rank 3 still shutting down holds its port
        held.bind(("127.0.0.1", base + 3))
        held.listen()
        port = side_channel_port("127.0.0.1", base, 3)
    assert base + NUM_SPARE_PORTS <= port < base + 2 * NUM_SPARE_PORTS
