"""The nftables rules keeping Ray off the management network: what they let in, and that nft takes them."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from sparkctl.errors import InventoryError
from sparkctl.facts.parse import parse_probe
from sparkctl.facts.probe import MARK, probe_sections
from sparkctl.inventory import parse_inventory
from sparkctl.inventory.models import Inventory
from sparkctl.paths import FIREWALL_FILE
from sparkctl.plan import firewall as lc

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "inventories" / "example-pair.yaml"
MANAGEMENT = "enP7s7"


def _inventory(edit: dict[str, object] | None = None) -> Inventory:
    data = yaml.safe_load(EXAMPLE.read_text())
    data.update(edit or {})
    return parse_inventory(yaml.safe_dump(data), "inv.yaml")


def _with_distinct_twins() -> Inventory:
    """The example pair, but spark-b's twins are named differently from spark-a's."""
    data = yaml.safe_load(EXAMPLE.read_text())
    for twin, name in zip(data["hosts"][1]["fabric"], ("enp1s0f0np0", "enP2p1s0f0np0"), strict=True):
        twin["interface"] = name
    return parse_inventory(yaml.safe_dump(data), "inv.yaml")


# --- a first-match reading of the input chain, limited to the rule forms render_firewall writes ---------

_RULE = re.compile(r"^(iifname|tcp dport|ct state) (\{ (?P<set>[^}]*) \}|(?P<one>\S+)) (?P<verdict>accept|drop)$")


def _rules(ruleset: str) -> tuple[list[tuple[str, list[str], str]], str]:
    """The input chain's rules as (match, elements, verdict), and the chain policy."""
    body = ruleset.split("chain input {", 1)[1].split("}\n}", 1)[0]
    policy = re.search(r"policy (accept|drop);", body)
    assert policy, body
    rules = []
    for line in body.splitlines():
        line = line.strip()
        if not line or line.startswith("type filter"):
            continue
        m = _RULE.match(line)
        assert m, f"a rule form this test does not read: {line!r}"
        raw = m["set"] if m["set"] is not None else m["one"]
        rules.append((m[1], [e.strip().strip('"') for e in raw.split(",")], m["verdict"]))
    return rules, policy[1]


def _matches(match: str, elements: list[str], iif: str, dport: int, state: str) -> bool:
    if match == "iifname":
        return iif in elements
    if match == "ct state":
        return state in elements
    for e in elements:
        low, _, high = e.partition("-")
        if int(low) <= dport <= int(high or low):
            return True
    return False


def verdict(ruleset: str, iif: str, dport: int, state: str = "new") -> str:
    """What the input chain does with a TCP packet arriving on `iif` for `dport`."""
    rules, policy = _rules(ruleset)
    for match, elements, result in rules:
        if _matches(match, elements, iif, dport, state):
            return result
    return policy


def _ray_pinned(inv: Inventory) -> list[int]:
    p = inv.ray.ports
    return [
        inv.ray.port,
        p.node_manager,
        p.object_manager,
        p.dashboard,
        p.dashboard_agent_listen,
        p.dashboard_agent_grpc,
        p.runtime_env_agent,
        p.metrics_export,
        p.client_server,
    ]


def test_the_reading_of_the_rules_is_first_match() -> None:
    rules = (
        "table inet t {\n  chain input {\n    type filter hook input priority 0; policy accept;\n"
        "    tcp dport { 10-20 } drop\n    tcp dport { 15 } accept\n  }\n}\n"
    )
    assert verdict(rules, "eth0", 15) == "drop"
    assert verdict(rules, "eth0", 21) == "accept"


def test_loopback_and_the_hosts_own_twins_reach_every_ray_port() -> None:
    inv = _with_distinct_twins()
    for host in inv.hosts:
        rules = lc.render_firewall(inv, host)
        other = next(h for h in inv.hosts if h.name != host.name)
        for port in [*_ray_pinned(inv), inv.ray.ports.min_worker, inv.ray.ports.max_worker, 32768, 60999]:
            for iif in ["lo", *(t.interface for t in host.fabric)]:
                assert verdict(rules, iif, port) == "accept", (host.name, iif, port)
            for twin in other.fabric:
                assert verdict(rules, twin.interface, port) == "drop", (host.name, twin.interface, port)


def test_ray_ports_and_ranges_are_dropped_on_the_management_network() -> None:
    inv = _inventory()
    p = inv.ray.ports
    rules = lc.render_firewall(inv, inv.host("spark-a"))
    for port in _ray_pinned(inv):
        assert verdict(rules, MANAGEMENT, port) == "drop", port
    for port in (p.min_worker, (p.min_worker + p.max_worker) // 2, p.max_worker):
        assert verdict(rules, MANAGEMENT, port) == "drop", f"worker port {port}"
    # Ray's unpinned helpers listen on ephemeral ports (Linux's default ip_local_port_range)
    for port in (32768, 45000, 60999):
        assert verdict(rules, MANAGEMENT, port) == "drop", f"ephemeral port {port}"
    # just outside every dropped range: untouched
    for port in (p.min_worker - 1, p.max_worker + 1, 32767, 61000, 443):
        assert verdict(rules, MANAGEMENT, port) == "accept", port


def test_established_traffic_ssh_and_the_workload_apis_are_let_in() -> None:
    inv = _inventory(
        {
            "workloads": [
                {"name": "chat", "engine": "vllm", "model": "Qwen/Qwen3-30B-A3B-Instruct-2507", "port": 8000},
                # an API port inside the ephemeral range must still be reachable from the laptop
                {"name": "embed", "engine": "embed", "port": 40001},
            ]
        }
    )
    rules = lc.render_firewall(inv, inv.host("spark-a"))
    assert verdict(rules, MANAGEMENT, 22) == "accept"
    assert verdict(rules, MANAGEMENT, 8000) == "accept"
    assert verdict(rules, MANAGEMENT, 40001) == "accept"
    # replies to connections the host opened (e.g. Ray's own outbound ones) come back on ephemeral ports
    for port in (6379, 10150, 45000):
        assert verdict(rules, MANAGEMENT, port, state="established") == "accept", port
        assert verdict(rules, MANAGEMENT, port, state="related") == "accept", port


def test_rules_replace_the_table_in_one_file() -> None:
    """Loading the file again replaces sparkctl's table instead of adding a second copy of its rules."""
    rules = lc.render_firewall(_inventory(), _inventory().host("spark-a"))
    lines = rules.splitlines()
    create, delete = lines.index("table inet sparkctl"), lines.index("delete table inet sparkctl")
    assert create < delete < lines.index("table inet sparkctl {")
    assert "flush ruleset" not in rules, "other tables on the host are not sparkctl's to remove"


def test_the_rules_sparkctl_writes_read_back_as_converged(tmp_path: Path) -> None:
    """The probe's firewall section, run by sh on the written file, gives back exactly what was rendered."""
    inv = _inventory()
    host = inv.host("spark-a")
    rules = lc.render_firewall(inv, host)
    section = f"echo '{MARK} firewall'\n" + probe_sections(inv, host)["firewall"]
    written = tmp_path / "firewall.nft"
    assert FIREWALL_FILE in section
    line = section.replace(FIREWALL_FILE, str(written))

    written.write_text(rules)
    out = subprocess.run(["sh", "-c", line], capture_output=True, text=True, timeout=10, check=True).stdout
    assert parse_probe("spark-a", out + f"{MARK} end\n").files["firewall.nft"] == rules

    written.unlink()
    out = subprocess.run(["sh", "-c", line], capture_output=True, text=True, timeout=10, check=True).stdout
    assert "firewall.nft" not in parse_probe("spark-a", out + f"{MARK} end\n").files


# --- the ports the workloads open (docs/workers.md, "Ports") -------------------------------------------

CHAT = {
    "name": "chat",
    "engine": "vllm",
    "model": "Qwen/Qwen3-30B-A3B-Instruct-2507",
    "tensor_parallel_size": 2,
    "port": 8000,
}
EMBED = {"name": "emb", "engine": "embed", "tensor_parallel_size": 2, "port": 8001}
# Where each mode listens besides its API port: torch's TCPStore binds every interface (the mp rendezvous at
# --master-port; the Ray executor's and the embed worker's on port 0), vLLM's message queues, gloo and NCCL bind
# port 0 on the fabric address, Ray's actors take its worker range; port 0 means Linux's ip_local_port_range.
PORT_ZERO = (32768, 45000, 60999)
MODES: dict[str, tuple[dict[str, object], list[dict[str, object]], list[int]]] = {
    "venv, vLLM mp": ({}, [{**CHAT, "executor": "mp"}], [29501, *PORT_ZERO]),
    "venv, vLLM Ray executor": ({}, [{**CHAT, "executor": "ray"}], [*PORT_ZERO, 10100, 10199]),
    "venv, embed worker": ({}, [EMBED], [*PORT_ZERO, 10100, 10199]),
    "container, vLLM mp": (
        {"image": "nvcr.io/nvidia/vllm:26.05-py3"},
        [{**CHAT, "executor": "mp"}],
        [29501, *PORT_ZERO],
    ),
    "container, vLLM Ray executor": (
        {"image": "nvcr.io/nvidia/vllm:26.05-py3", "add_ray": "2.60.0"},
        [{**CHAT, "executor": "ray"}],
        [*PORT_ZERO, 10100, 10199],
    ),
    "container, embed worker": (
        {"image": "nvcr.io/nvidia/vllm:26.05-py3", "add_ray": "2.60.0"},
        [EMBED],
        [*PORT_ZERO, 10100, 10199],
    ),
}


def _mode(name: str) -> Inventory:
    runtime, workloads, _ = MODES[name]
    return _inventory({"runtime": runtime or {"venv": "/opt/sparkctl-runtime"}, "workloads": workloads})


def test_every_port_each_workload_mode_opens_is_dropped_on_the_management_network_only() -> None:
    for name, (_, workloads, inner) in MODES.items():
        inv = _mode(name)
        for host in inv.hosts:
            rules = lc.render_firewall(inv, host)
            for port in [*inner, *_ray_pinned(inv)]:
                assert verdict(rules, MANAGEMENT, port) == "drop", (name, host.name, port)
                for iif in ["lo", *(t.interface for t in host.fabric)]:
                    assert verdict(rules, iif, port) == "accept", (name, host.name, iif, port)
            for w in workloads:  # the API answers the laptop
                assert verdict(rules, MANAGEMENT, int(str(w["port"]))) == "accept", (name, w["name"])


def test_the_mp_rendezvous_follows_a_master_port_given_in_extra_args() -> None:
    for args in (["--master-port", "29611"], ["--master-port=29611"]):
        inv = _inventory({"workloads": [{**CHAT, "executor": "mp", "extra_args": args}]})
        rules = lc.render_firewall(inv, inv.host("spark-a"))
        assert verdict(rules, MANAGEMENT, 29611) == "drop", args
        assert "29501" not in rules, args


def test_a_one_host_workload_opens_no_rendezvous_port() -> None:
    # one rank: vLLM's uni executor rendezvous through a file store, no TCPStore (vllm/v1/executor/uniproc_executor.py)
    inv = _inventory({"workloads": [{**CHAT, "tensor_parallel_size": 1}]})
    assert "29501" not in lc.render_firewall(inv, inv.host("spark-a"))


def test_vllm_port_moves_get_open_port_and_the_firewall_follows() -> None:
    # with VLLM_PORT set, get_open_port() counts up from it (vllm/utils/network_utils.py, vLLM 0.32.0): the V1 Ray
    # executor's TCPStore, on every interface, lands there instead of the ephemeral range
    chat = {**CHAT, "executor": "ray", "env": {"VLLM_PORT": "20000", "VLLM_USE_RAY_V2_EXECUTOR_BACKEND": "0"}}
    inv = _inventory({"workloads": [chat]})
    rules = lc.render_firewall(inv, inv.host("spark-a"))
    for port in (20000, 20000 + lc.VLLM_PORT_SPAN - 1):
        assert verdict(rules, MANAGEMENT, port) == "drop", port
        assert verdict(rules, "enp1s0f1np1", port) == "accept", port
    assert verdict(rules, MANAGEMENT, 20000 + lc.VLLM_PORT_SPAN) == "accept"


# --- network.open_ports: the user's own services through the firewall ---------------------------------


def _network(**edit: object) -> dict[str, object]:
    return {"network": {"mtu": 9000, "topology": "direct", **edit}}


def test_open_ports_are_let_in_from_the_management_network_before_the_drop() -> None:
    inv = _inventory(_network(open_ports=[40000, 8443]))
    rules = lc.render_firewall(inv, inv.host("spark-a"))
    assert verdict(rules, MANAGEMENT, 40000) == "accept"  # inside the ephemeral range, listed
    assert verdict(rules, MANAGEMENT, 40001) == "drop"  # its neighbour is not
    assert verdict(rules, MANAGEMENT, 8443) == "accept"
    assert lc.render_firewall(_inventory(), _inventory().host("spark-a")) != rules  # the file changes with them


def test_open_ports_default_to_none() -> None:
    assert _inventory().network.open_ports == []


@pytest.mark.parametrize(
    ("ports", "workloads", "problem"),
    [
        ([6381], [], "port 6381 is ray.ports.node_manager"),
        ([6379], [], "port 6379 is ray.port"),
        ([10150], [], "port 10150 is in Ray's worker port range 10100-10199"),
        ([29501], [{**CHAT, "executor": "mp"}], "port 29501 is the rendezvous of workload 'chat'"),
        (
            [29611],
            [{**CHAT, "executor": "mp", "extra_args": ["--master-port=29611"]}],
            "port 29611 is the rendezvous of workload 'chat'",
        ),
        ([40000, 40000], [], "port 40000 is listed twice"),
    ],
)
def test_open_ports_that_would_expose_ray_or_the_ranks_are_refused(
    ports: list[int], workloads: list[dict[str, object]], problem: str
) -> None:
    with pytest.raises(InventoryError) as err:
        _inventory({**_network(open_ports=ports), "workloads": workloads})
    assert problem in str(err.value)
    assert "network.open_ports" in str(err.value)


def test_the_default_rendezvous_port_is_free_to_open_without_an_mp_workload_across_hosts() -> None:
    inv = _inventory({**_network(open_ports=[29501]), "workloads": [{**CHAT, "executor": "ray"}]})
    assert verdict(lc.render_firewall(inv, inv.host("spark-a")), MANAGEMENT, 29501) == "accept"


@pytest.mark.parametrize("port", [0, 65536, -1])
def test_open_ports_outside_the_tcp_range_are_refused(port: int) -> None:
    with pytest.raises(InventoryError):
        _inventory(_network(open_ports=[port]))
