"""nft itself accepts and reloads the ruleset sparkctl renders, in a throwaway network namespace (root only).

The rules' meaning is tested without root in tests/unit/test_firewall.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from sparkctl.inventory import parse_inventory
from sparkctl.inventory.models import Inventory
from sparkctl.plan import firewall as lc

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "inventories" / "example-pair.yaml"


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


# --- nft itself, in a throwaway network namespace ---------------------------------------------------


NFT = shutil.which("nft") or ("/usr/sbin/nft" if Path("/usr/sbin/nft").exists() else None)
IP = shutil.which("ip") or "/usr/sbin/ip"

no_nft = pytest.mark.skipif(NFT is None, reason="nft is not installed (/usr/sbin/nft)")
not_root = pytest.mark.skipif(os.geteuid() != 0, reason="a throwaway network namespace for nft needs root")


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh network namespace, so nothing touches the host's own ruleset."""
    name = f"sparkctl-unit-fw-{os.getpid()}"
    subprocess.run([IP, "netns", "add", name], check=True, capture_output=True, timeout=10)
    try:
        yield name
    finally:
        subprocess.run([IP, "netns", "delete", name], check=True, capture_output=True, timeout=10)


def _nft(ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    assert NFT is not None
    return subprocess.run([IP, "netns", "exec", ns, NFT, *args], capture_output=True, text=True, timeout=20)


RULESETS = {
    "example-pair": _inventory,
    "no-workloads": lambda: _inventory({"workloads": []}),
    "distinct-twins": _with_distinct_twins,
    # the mp rendezvous on a --master-port of its own, and VLLM_PORT's block inside Ray's worker range (nft merges
    # the overlapping intervals of an anonymous set)
    # a service of the user's inside the ephemeral range, accepted before the drop
    "open-ports": lambda: _inventory({"network": {"mtu": 9000, "topology": "direct", "open_ports": [40000, 8443]}}),
    "mp-and-vllm-port": lambda: _inventory(
        {
            "workloads": [
                {
                    "name": "chat",
                    "engine": "vllm",
                    "model": "m/m",
                    "tensor_parallel_size": 2,
                    "port": 8000,
                    "extra_args": ["--master-port", "29611"],
                    "env": {"VLLM_PORT": "10150"},
                },
            ]
        }
    ),
}


@no_nft
@not_root
@pytest.mark.parametrize("inventory", list(RULESETS))
@pytest.mark.parametrize("host", ["spark-a", "spark-b"])
def test_nft_accepts_the_rendered_rules(inventory: str, host: str, netns: str, tmp_path: Path) -> None:
    inv = RULESETS[inventory]()
    path = tmp_path / "firewall.nft"
    path.write_text(lc.render_firewall(inv, inv.host(host)))
    r = _nft(netns, "-c", "-f", str(path))
    assert r.returncode == 0, f"nft -c rejected the rules:\n{r.stderr}\n{path.read_text()}"


@no_nft
@not_root
def test_nft_loads_the_rules_again_over_a_loaded_table(netns: str, tmp_path: Path) -> None:
    """`up` reloads the file whenever Ray is not running: a second load replaces the table."""
    inv = _inventory()
    path = tmp_path / "firewall.nft"
    path.write_text(lc.render_firewall(inv, inv.host("spark-a")))
    for attempt in (1, 2):
        r = _nft(netns, "-f", str(path))
        assert r.returncode == 0, f"load {attempt}: {r.stderr}"
    listed = _nft(netns, "list", "table", "inet", "sparkctl")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.count("chain input") == 1
    assert listed.stdout.count(" drop") == 1, listed.stdout
