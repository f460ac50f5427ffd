"""Beyond a pair: three fake Sparks cabled in a ring (four interfaces each) and four on a switch.

Each shape's life in order: up on fresh hosts, a second plan with nothing to change, status, down. Every assertion
reads the hosts themselves (addresses, MTU, routes, Ray's nodes, processes), not only sparkctl's output.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sparkctl.inventory import load_inventory
from sparkctl.inventory.topology import check_pairs, interface
from tests.integration.helpers import changing, cli_env, ip_addrs, ipv4, plan_steps, spark_processes, sparkctl
from tests.testbed import Testbed

pytestmark = pytest.mark.testbed

RAY_SCRIPT = (
    "import json, ray; ray.init(address='auto', logging_level='ERROR'); "
    "print(json.dumps([n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']]))"
)


class Cluster:
    def __init__(self, tb: Testbed, inventory: Path, env: dict[str, str]) -> None:
        self.tb, self.inventory, self.env = tb, inventory, env
        self.inv = load_inventory(inventory)

    def run(self, *args: str, timeout: float = 900) -> Any:
        return sparkctl(*args, "-i", str(self.inventory), env=self.env, timeout=timeout)

    def ray_nodes(self) -> list[str]:
        head = self.inv.head
        env = [
            "RAY_AUTH_MODE=token",
            "RAY_AUTH_TOKEN_PATH=/home/spark/.local/state/sparkctl/ray-token",
            f"RAY_ADDRESS={head.fabric[0].address.ip}:6379",
        ]
        out = self.tb.exec(head.name, ["env", *env, "/opt/sparkctl-runtime/bin/python", "-c", RAY_SCRIPT], user="spark")
        return sorted(json.loads(out.stdout.strip().splitlines()[-1]))


def _cluster(tb: Testbed, tmp: Path) -> Iterator[Cluster]:
    state = tmp / "laptop-state"
    env = cli_env({**os.environ, "SPARKCTL_SUDO_PASSWORD": tb.sudo_password}, state)
    c = Cluster(tb, tb.inventory_path(), env)
    yield c
    sparkctl("down", "-i", str(c.inventory), env=env)


def _lifecycle(c: Cluster) -> None:
    tb, inv = c.tb, c.inv
    r = c.run("up", "--yes")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]

    # every interface of every host carries its address at MTU 9000
    for h in inv.hosts:
        links = ip_addrs(tb, h.name)
        for t in h.fabric:
            assert links[t.interface]["mtu"] == 9000, (h.name, t.interface)
            assert ipv4(links[t.interface]) == [str(t.address)], (h.name, t.interface)
    # jumbo frames cross every pair the topology checks, measured here from the hosts themselves
    for src, dst in check_pairs(inv):
        a, b = interface(inv, src), interface(inv, dst)
        ping = tb.exec(
            inv.hosts[src.host].name,
            ["ping", "-M", "do", "-s", "8972", "-c", "1", "-W", "2", "-I", a.interface, str(b.address.ip)],
            check=False,
        )
        assert ping.returncode == 0, (inv.hosts[src.host].name, a.interface, str(b.address.ip), ping.stdout)
    # every host reaches every other host's Ray address (fabric[0]), and Ray has every node on it
    for h in inv.hosts:
        for peer in inv.hosts:
            if peer.name != h.name:
                ping = tb.exec(h.name, ["ping", "-c", "1", "-W", "2", str(peer.fabric[0].address.ip)], check=False)
                assert ping.returncode == 0, (h.name, peer.name, ping.stdout)
    assert c.ray_nodes() == sorted(str(h.fabric[0].address.ip) for h in inv.hosts)

    # converged: a second plan changes nothing
    r = c.run("plan", "--json")
    assert r.returncode == 0, r.stderr
    assert changing(plan_steps(r.stdout)) == []

    r = c.run("status", "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert set(st["hosts"]) == {h.name for h in inv.hosts}
    assert {x["ray"] for x in st["hosts"].values()} == {"running"}
    assert all(f["ok"] for x in st["hosts"].values() for f in x["fabric"])
    assert st["topology"] == inv.network.topology
    # a ring joins each host to both others; a switch, to every other host
    assert all(sorted(x["neighbours"]) == sorted(set(st["hosts"]) - {h}) for h, x in st["hosts"].items())

    r = c.run("down")
    assert r.returncode == 0, r.stderr
    for h in inv.hosts:
        for needle in ("raylet", "gcs_server"):
            assert spark_processes(tb, h.name, needle) == [], (h.name, needle)


@pytest.fixture
def ring(shaped_testbed: Testbed, tmp_path: Path) -> Iterator[Cluster]:
    yield from _cluster(shaped_testbed, tmp_path)


@pytest.fixture
def switch4(shaped_testbed: Testbed, tmp_path: Path) -> Iterator[Cluster]:
    yield from _cluster(shaped_testbed, tmp_path)


@pytest.mark.testbed_shape(hosts=3, topology="ring")
def test_ring_of_three_comes_up_converges_and_goes_down(ring: Cluster) -> None:
    inv = ring.inv
    assert inv.network.topology == "ring" and [len(h.fabric) for h in inv.hosts] == [4, 4, 4]
    _lifecycle(ring)
    # the route that makes the cable a host is not on reachable sits in its fabric[0] profile, on disk
    for i, h in enumerate(inv.hosts):
        nxt = inv.hosts[(i + 1) % 3]
        out = ring.tb.exec(h.name, ["ip", "-j", "route", "show", str(nxt.fabric[0].address.network)]).stdout
        routes = json.loads(out)
        assert [(r.get("gateway"), r.get("dev")) for r in routes] == [
            (str(nxt.fabric[2].address.ip), h.fabric[0].interface)
        ], (h.name, routes)


@pytest.mark.testbed_shape(hosts=4, topology="switch")
def test_switch_of_four_comes_up_converges_and_goes_down(switch4: Cluster) -> None:
    assert switch4.inv.network.topology == "switch" and len(switch4.inv.hosts) == 4
    _lifecycle(switch4)


@pytest.mark.testbed_shape(hosts=3, topology="ring")
def test_doctor_names_a_ring_cable_that_is_down(ring: Cluster) -> None:
    tb, inv = ring.tb, ring.inv
    assert ring.run("up", "--yes").returncode == 0
    # cable 1 (spark-b Port0 - spark-c Port1) loses its first lane: spark-c's enp1s0f1np1 end goes down
    tb.carrier_down(inv.hosts[1].name, inv.hosts[1].fabric[0].interface)
    try:
        r = ring.run("doctor", "--json")
        failed = [f for f in json.loads(r.stdout) if f["rule"] == "jumbo-path" and f["level"] == "fail"]
        assert r.returncode == 1, r.stderr
        subjects = {f["subject"] for f in failed}
        b, c = inv.hosts[1], inv.hosts[2]
        want = f"{b.name} {b.fabric[0].interface} -> {c.name} {c.fabric[2].interface} {c.fabric[2].address.ip}"
        assert want in subjects, subjects
        evidence = next(f["evidence"] for f in failed if f["subject"] == want)
        assert "cable 1" in evidence and c.fabric[2].interface in evidence
    finally:
        tb.carrier_up(inv.hosts[1].name, inv.hosts[1].fabric[0].interface)
