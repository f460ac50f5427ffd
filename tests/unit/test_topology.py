"""Topologies: links derived from `network.topology`, validated with file:line and a hint; examples plan offline."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Text
from typer.testing import CliRunner

from sparkctl.cli.app import app
from sparkctl.errors import Problem
from sparkctl.inventory import load_inventory, parse_inventory
from sparkctl.inventory.topology import End, check_pairs, interface, links, neighbours, ring_routes
from sparkctl.session import door

REPO = Path(__file__).resolve().parents[2]
RING = REPO / "inventories" / "example-ring.yaml"
SWITCH4 = REPO / "inventories" / "example-switch-4.yaml"
SWITCH8 = REPO / "inventories" / "example-switch-8.yaml"
EXAMPLES = [REPO / "inventories" / "example-pair.yaml", RING, SWITCH4, SWITCH8]


def ring_text() -> Text:
    return Text(RING.read_text())


def switch_text() -> Text:
    return Text(SWITCH4.read_text())


def where(text: Text, fragment: str, path: str) -> str:
    return f"inv.yaml:{text.line_of(fragment)} {path}"


@pytest.fixture
def cli(isolated_state, mocker):
    """Invoke the app; any attempt to connect fails the test."""
    mocker.patch.object(door, "CONNECTOR", side_effect=AssertionError("the CLI tried to connect"))
    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args))


# --- the examples -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_plans_offline(cli, path: Path) -> None:
    result = cli("plan", "--offline", "--json", "-i", str(path))
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    inv = load_inventory(path)
    assert plan["hosts"] == [h.name for h in inv.hosts]
    steps = [s for stage in plan["stages"] for s in stage["steps"]]
    # every interface of every host gets its profile, and the jumbo checks follow the topology's pairs
    profiles = {(s["host"], s["target"]) for s in steps if s["kind"] == "fabric_profile"}
    assert profiles == {(h.name, t.interface) for h in inv.hosts for t in h.fabric}
    jumbo = [s for s in steps if s["kind"] == "verify_jumbo"]
    assert len(jumbo) == len(check_pairs(inv))


def test_ring_example_is_nvidias_cabling() -> None:
    inv = load_inventory(RING)
    found = links(inv)
    assert [x.label for x in found] == [
        "cable 0 (spark-1 Port0 - spark-2 Port1)",
        "cable 1 (spark-2 Port0 - spark-3 Port1)",
        "cable 2 (spark-3 Port0 - spark-1 Port1)",
    ]
    # cable 0: spark-1's Port0 interfaces with spark-2's Port1 interfaces, in lane order
    assert found[0].lanes == ((End(0, 0), End(1, 2)), (End(0, 1), End(1, 3)))
    nets = [{str(inv.hosts[e.host].fabric[e.twin].address.network) for e in x.ends} for x in found]
    assert nets == [{"192.168.0.0/24"}, {"192.168.2.0/24"}, {"192.168.1.0/24"}]
    # both ways on each lane: 3 cables x 2 lanes x 2 directions
    assert len(check_pairs(inv)) == 12
    assert [h.name for h in neighbours(inv, inv.hosts[0])] == ["spark-2", "spark-3"]


def test_ring_routes_reach_the_cable_a_host_is_not_on() -> None:
    inv = load_inventory(RING)
    # spark-1 is on cables 0 and 2; cable 1 (spark-2 Port0 - spark-3 Port1) is reached through spark-2
    assert ring_routes(inv, inv.hosts[0]) == {0: [("192.168.2.0/24", "192.168.0.3")]}
    assert ring_routes(inv, inv.hosts[1]) == {0: [("192.168.1.0/24", "192.168.2.3")]}
    assert ring_routes(inv, inv.hosts[2]) == {0: [("192.168.0.0/24", "192.168.1.1")]}
    assert ring_routes(load_inventory(SWITCH4), load_inventory(SWITCH4).hosts[0]) == {}


def test_switch_pairs_each_host_with_the_next_per_twin() -> None:
    inv = load_inventory(SWITCH8)
    pairs = check_pairs(inv)
    assert len(pairs) == 16  # 8 hosts x 2 twins, not 8 x 7 x 2
    for j in (0, 1):
        lane = [(s.host, d.host) for s, d in pairs if s.twin == j]
        assert lane == [(i, (i + 1) % 8) for i in range(8)]
        assert all(s.twin == d.twin for s, d in pairs)
    assert len(neighbours(inv, inv.hosts[3])) == 7


# --- bad input ------------------------------------------------------------------------------------------------


def test_ring_needs_three_hosts(problems: Callable[[str], list[Problem]]) -> None:
    text = switch_text().edit("topology: switch", "topology: ring")
    found = problems(text)
    top = [p for p in found if p.where.endswith("network.topology")]
    assert len(top) == 1 and "exactly 3 hosts" in top[0].message and "switch" in top[0].hint
    assert top[0].where == where(text, "topology: ring", "network.topology")


def test_direct_with_three_hosts_points_at_ring(problems: Callable[[str], list[Problem]]) -> None:
    text = ring_text().edit("topology: ring", "topology: direct")
    top = [p for p in problems(text) if p.where.endswith("network.topology")]
    assert len(top) == 1 and "exactly 2 hosts" in top[0].message and "topology: ring" in top[0].hint


def test_switch_needs_two_hosts(problems: Callable[[str], list[Problem]]) -> None:
    text = Text(load_one_host_switch())
    top = [p for p in problems(text) if p.where.endswith("network.topology")]
    assert len(top) == 1 and "2 or more" in top[0].message


def load_one_host_switch() -> str:
    text = SWITCH4.read_text()
    head, _, rest = text.partition("  - name: spark-2\n")
    tail = rest.split("\nruntime:", 1)[1].replace("tensor_parallel_size: 4", "tensor_parallel_size: 1")
    return head + "\nruntime:" + tail


def test_ring_host_lists_four_interfaces(problems: Callable[[str], list[Problem]]) -> None:
    text = ring_text()
    # drop spark-2's Port1 second interface
    block = "      - interface: enP2p1s0f1np1\n        address: 192.168.0.4/24\n        rdma_device: roceP2p1s0f1\n"
    text = text.edit(block, "")
    found = problems(text)
    p = next(p for p in found if "4 logical interfaces" in p.message)
    assert p.where.split(" ")[1] == "hosts[1].fabric"
    assert "Port0" in p.hint


def test_ring_port_order_is_checked(problems: Callable[[str], list[Problem]]) -> None:
    # spark-3 lists Port1 first: its cables would be swapped
    text = ring_text()
    lines = text.splitlines(keepends=True)
    start = text.line_of("name: spark-3") + 2  # first `- interface:` line of spark-3 (0-based index)
    port0, port1 = lines[start : start + 6], lines[start + 6 : start + 12]
    swapped = Text("".join(lines[:start] + port1 + port0 + lines[start + 12 :]))
    found = problems(swapped)
    bad = [p for p in found if "where the ring expects" in p.message]
    assert [p.where.split(" ")[1] for p in bad] == [f"hosts[2].fabric[{j}].interface" for j in range(4)]
    assert "Port1 interface at fabric[0]" in bad[0].message and "np0" in bad[0].hint


def test_ring_cable_ends_share_a_subnet(problems: Callable[[str], list[Problem]]) -> None:
    # spark-2's Port1 (cable 0, 192.168.0.0/24) given an address of another subnet
    text = ring_text().edit("address: 192.168.0.3/24", "address: 192.168.7.3/24")
    found = problems(text)
    p = next(p for p in found if "is not in" in p.message)
    assert p.where == where(text, "192.168.7.3/24", "hosts[1].fabric[2].address")
    assert "192.168.0.0/24, the subnet of cable 0" in p.message
    assert "e.g. 192.168.0.3/24" in p.hint  # the first free address of the cable


def test_ring_subnet_reused_across_cables(problems: Callable[[str], list[Problem]]) -> None:
    # cable 1 (spark-2 Port0 - spark-3 Port1) given cable 0's subnet
    text = ring_text()
    for old, new in [
        ("192.168.2.1/24", "192.168.0.11/24"),
        ("192.168.2.2/24", "192.168.0.12/24"),
        ("192.168.2.3/24", "192.168.0.13/24"),
        ("192.168.2.4/24", "192.168.0.14/24"),
    ]:
        text = text.edit(old, new)
    found = problems(text)
    reuse = [p for p in found if "reuses subnet" in p.message]
    assert len(reuse) == 1 and "cable 1 reuses subnet 192.168.0.0/24 of cable 0" in reuse[0].message
    assert reuse[0].where == where(text, "192.168.0.11/24", "hosts[1].fabric[0].address")
    assert "every cable its own subnet" in reuse[0].hint


def test_switch_twin_on_the_wrong_subnet(problems: Callable[[str], list[Problem]]) -> None:
    text = switch_text().edit("address: 192.168.101.13/24", "address: 192.168.102.13/24")
    p = next(iter(problems(text)))
    assert p.where == where(text, "192.168.102.13/24", "hosts[3].fabric[1].address")
    assert "the subnet of link 1" in p.message


def test_ring_allows_both_interfaces_of_a_port_on_the_cable_subnet() -> None:
    inv = parse_inventory(ring_text(), "inv.yaml")
    h = inv.hosts[0]
    assert h.fabric[0].address.network == h.fabric[1].address.network
    assert h.fabric[0].address.network != h.fabric[2].address.network


# --- N hosts through the planners -----------------------------------------------------------------------


def test_ring_profile_carries_its_route_and_the_env_its_nccl_variables(cli) -> None:
    result = cli("plan", "--offline", "--json", "-i", str(RING))
    assert result.exit_code == 0, result.output
    steps = [s for stage in json.loads(result.stdout)["stages"] for s in stage["steps"]]
    add = next(
        s for s in steps if s["host"] == "spark-1" and s["kind"] == "fabric_profile" and s["target"] == "enp1s0f0np0"
    )
    argv = add["commands"][0]["argv"]
    assert argv[argv.index("ipv4.routes") + 1] == "192.168.0.0/24 table=5100, 192.168.2.0/24 192.168.0.3"
    assert argv[argv.index("ipv4.routing-rules") + 1] == "priority 5100 from 192.168.0.1 table 5100"
    other = next(
        s for s in steps if s["host"] == "spark-1" and s["kind"] == "fabric_profile" and s["target"] == "enp1s0f1np1"
    )
    argv = other["commands"][0]["argv"]
    assert argv[argv.index("ipv4.routes") + 1] == "192.168.1.0/24 table=5102"  # its own lane only
    assert argv[argv.index("ipv4.routing-rules") + 1] == "priority 5102 from 192.168.1.1 table 5102"
    env = next(s for s in steps if s["host"] == "spark-2" and s["kind"] == "worker_env")["commands"][0]["stdin"]
    values = dict(line.split("=", 1) for line in env.splitlines() if "=" in line and not line.startswith("#"))
    assert values["NCCL_IB_HCA"] == "rocep1s0f0,roceP2p1s0f0,rocep1s0f1,roceP2p1s0f1"
    assert values["NCCL_SOCKET_IFNAME"] == "enp1s0f0np0" and values["VLLM_HOST_IP"] == "192.168.2.1"
    assert (values["NCCL_IB_MERGE_NICS"], values["NCCL_IB_SUBNET_AWARE_ROUTING"], values["NCCL_NET_PLUGIN"]) == (
        "0",
        "1",
        "none",
    )
    assert values["NCCL_IB_SUBNET_PREFIX_LEN"] == "24"  # the ring's /24 links, NCCL's match length
    switch_env = cli("plan", "--offline", "--json", "-i", str(SWITCH4))
    assert "NCCL_IB_MERGE_NICS" not in switch_env.stdout


def test_nmcli_routes_are_read_without_metrics() -> None:
    from sparkctl.facts.parse import parse_nm_routes

    assert parse_nm_routes("192.168.2.0/24 192.168.0.3") == ["192.168.2.0/24 192.168.0.3"]
    assert parse_nm_routes("192.168.0.0/24 table=5100") == ["192.168.0.0/24 table=5100"]
    assert parse_nm_routes("192.168.2.0/24 192.168.0.3 100, 10.1.0.0/16") == [
        "192.168.2.0/24 192.168.0.3",
        "10.1.0.0/16",
    ]
    assert parse_nm_routes("") == parse_nm_routes("--") == []


def test_bench_pairs_follow_the_cables() -> None:
    from sparkctl.plan.bench import bench_pairs

    ring = load_inventory(RING)
    pairs = bench_pairs(ring)
    assert len(pairs) == 6  # 3 cables x 2 lanes, once each
    for src, dst in pairs:
        a, b = ring.hosts[src.host].fabric[src.twin], ring.hosts[dst.host].fabric[dst.twin]
        assert a.address.network == b.address.network
    assert len(bench_pairs(load_inventory(SWITCH4))) == 6  # the first host to 3 peers, 2 twins


def test_discover_proposes_a_ring_for_three_hosts_with_four_interfaces_up() -> None:
    from sparkctl.facts.discover import Discovered, guess_topology, propose_inventory

    ports = [
        ("enp1s0f1np1", "rocep1s0f1"),
        ("enP2p1s0f0np0", "roceP2p1s0f0"),
        ("enP2p1s0f1np1", "roceP2p1s0f1"),
        ("enp1s0f0np0", "rocep1s0f0"),
    ]
    found = []
    for i in range(3):
        d = Discovered(address=f"10.0.0.{11 + i}", user="nvidia", hostname=f"spark-{i + 1}", twins=list(ports))
        d.twins.sort(key=lambda t: (t[0][-1], t[0].lower()))
        found.append(d)
    assert guess_topology(found) == "ring"
    text, problems = propose_inventory(found, cluster="lab")
    assert problems == []
    inv = parse_inventory(text, "proposed.yaml")  # valid as proposed: cables on their own subnets
    assert inv.network.topology == "ring"
    assert [t.interface for t in inv.hosts[0].fabric] == [
        "enp1s0f0np0",
        "enP2p1s0f0np0",
        "enp1s0f1np1",
        "enP2p1s0f1np1",
    ]
    two = [Discovered(address=f"10.0.0.{11 + i}", user="nvidia", twins=list(ports[:2])) for i in range(4)]
    assert guess_topology(two) == "switch" and guess_topology(two[:2]) == "direct"
    assert parse_inventory(propose_inventory(two, cluster="lab")[0], "p.yaml").network.topology == "switch"


@pytest.mark.parametrize("playbook", ["bringup", "fabric-check", "teardown"])
@pytest.mark.parametrize("path", [RING, SWITCH8], ids=lambda p: p.name)
def test_runbooks_dry_run_on_ring_and_switch(cli, playbook: str, path: Path) -> None:
    result = cli("run", str(REPO / "playbooks" / f"{playbook}.yaml"), "--dry-run", "--offline", "-i", str(path))
    assert result.exit_code == 0, result.output
    hosts = [h.name for h in load_inventory(path).hosts]
    assert all(h in result.output for h in hosts)


# --- doctor names wrong cabling ---------------------------------------------------------------------------


def _rule(rule_id: str):  # type: ignore[no-untyped-def]
    from sparkctl.doctor.rules import load_rules

    return next(r for r in load_rules().rules if r.id == rule_id)


def test_doctor_names_the_switch_port_on_the_wrong_vlan() -> None:
    from sparkctl.doctor.evaluators import EVALUATORS, CheckContext

    inv = load_inventory(SWITCH4)
    # spark-3's enP2p1s0f1np1 sits on another VLAN: the pings into it and out of it fail, the others cross
    pings = {}
    for src, dst in check_pairs(inv):
        a, b = interface(inv, src), interface(inv, dst)
        bad = src.twin == 1 and 2 in (src.host, dst.host)
        key = (inv.hosts[src.host].name, a.interface, str(b.address.ip))
        pings[key] = (not bad, "100% packet loss" if bad else "")
    findings = EVALUATORS["jumbo_path"](CheckContext(inv, {}, pings), _rule("jumbo-path"))
    failed = {f.subject: f for f in findings if f.level == "fail"}
    assert set(failed) == {
        "spark-2 enP2p1s0f1np1 -> spark-3 enP2p1s0f1np1 192.168.101.12",
        "spark-3 enP2p1s0f1np1 -> spark-4 enP2p1s0f1np1 192.168.101.13",
    }
    f = failed["spark-2 enP2p1s0f1np1 -> spark-3 enP2p1s0f1np1 192.168.101.12"]
    assert "expected spark-3 enP2p1s0f1np1 (192.168.101.12) at the other end of link 1" in f.evidence
    assert "bridge/VLAN" in f.fix
    assert sum(1 for f in findings if f.level == "pass") == 6


def test_doctor_names_a_swapped_ring_cable() -> None:
    from sparkctl.doctor.evaluators import EVALUATORS, CheckContext

    inv = load_inventory(RING)
    # cable 0's ends are swapped at spark-2 (Port0 where Port1 belongs): nothing crosses cable 0 nor cable 1
    pings = {}
    for src, dst in check_pairs(inv):
        a, b = interface(inv, src), interface(inv, dst)
        link = {src.host, dst.host}
        ok = link == {0, 2}  # cable 2 (spark-3 Port0 - spark-1 Port1) is the only one cabled as listed
        pings[(inv.hosts[src.host].name, a.interface, str(b.address.ip))] = (ok, "" if ok else "100% packet loss")
    findings = EVALUATORS["jumbo_path"](CheckContext(inv, {}, pings), _rule("jumbo-path"))
    failed = [f for f in findings if f.level == "fail"]
    assert len(failed) == 8
    first = next(f for f in failed if f.subject.startswith("spark-1 enp1s0f0np0 ->"))
    assert first.subject == "spark-1 enp1s0f0np0 -> spark-2 enp1s0f1np1 192.168.0.3"
    assert "cable 0 (spark-1 Port0 - spark-2 Port1)" in first.evidence
    assert "Port0 is the CX-7 port next to the Ethernet port" in first.fix


def test_doctor_accepts_both_interfaces_of_a_ring_port_on_one_subnet() -> None:
    from sparkctl.doctor.evaluators import EVALUATORS, CheckContext
    from sparkctl.facts.models import Interface
    from sparkctl.plan.context import fresh_facts

    inv = load_inventory(RING)
    facts = {}
    for h in inv.hosts:
        f = fresh_facts(inv, h)
        ifaces = {
            t.interface: Interface(name=t.interface, mtu=9000, operstate="UP", up=True, ipv4=[str(t.address)])
            for t in h.fabric
        }
        facts[h.name] = f.model_copy(update={"interfaces": ifaces})
    findings = EVALUATORS["twin_subnets"](CheckContext(inv, facts), _rule("twin-subnets"))
    assert [f.level for f in findings] == ["pass"] * 3, [f.evidence for f in findings]
