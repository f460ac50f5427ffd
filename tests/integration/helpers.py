"""Helpers for end-to-end tests: run the real CLI, read the hosts' real state through their namespaces."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.testbed import Testbed

REPO = Path(__file__).resolve().parents[2]
TWINS = ("enp1s0f1np1", "enP2p1s0f1np1")


EMBED = {
    "name": "embed",
    "engine": "embed",
    "model": "all-MiniLM-L6-v2",
    "tensor_parallel_size": 2,
    "port": 8100,
    "ready_timeout": 300,
}
"""The built-in embedding worker across the pair (TP=2), as the end-to-end tests and benchmarks/ bring it up."""


def sparkctl(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "sparkctl", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def cli_env(base: dict[str, str], state: Path) -> dict[str, str]:
    """The environment for one test: its own laptop state dir (secrets, journal)."""
    return {**base, "XDG_STATE_HOME": str(state), "PYTHONPATH": str(REPO)}


def ip_addrs(tb: Testbed, host: str) -> dict[str, dict[str, Any]]:
    """`ip -j addr` inside a host, by interface."""
    out = tb.exec(host, ["ip", "-j", "addr", "show"]).stdout
    return {i["ifname"]: i for i in json.loads(out)}


def ipv4(link: dict[str, Any]) -> list[str]:
    return [f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", []) if a["family"] == "inet"]


def host_snapshot(tb: Testbed, host: str) -> dict[str, Any]:
    """What sparkctl could change on a host, read from the host itself."""
    cons = tb.exec(host, ["nmcli", "-t", "-f", "NAME,UUID,AUTOCONNECT,DEVICE", "connection", "show"]).stdout
    addrs = {k: (v["mtu"], ipv4(v)) for k, v in ip_addrs(tb, host).items()}
    files = tb.exec(
        host,
        [
            "sh",
            "-c",
            "ls -a /etc/sparkctl ~spark/.local/state/sparkctl 2>/dev/null; ls /etc/NetworkManager/system-connections",
        ],
    ).stdout
    procs = sorted(p.split(None, 2)[2] for p in tb.processes(host) if p.split()[1] == "spark")
    return {"connections": sorted(cons.splitlines()), "addrs": addrs, "files": files, "procs": procs}


def spark_processes(tb: Testbed, host: str, needle: str) -> list[str]:
    """The login user's processes whose command line contains `needle`."""
    return [p for p in tb.processes(host) if p.split()[1] == "spark" and needle in p]


def journal(state: Path) -> list[dict[str, Any]]:
    path = state / "sparkctl" / "journal.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def env_file(tb: Testbed, host: str) -> dict[str, str]:
    text = tb.exec(host, ["cat", "/etc/sparkctl/worker.env"]).stdout
    return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))


def secrets_of(state: Path, cluster: str = "testbed") -> list[str]:
    """Every secret sparkctl keeps for the cluster on the laptop."""
    folder = state / "sparkctl" / cluster
    return [p.read_text().strip() for p in folder.iterdir()] if folder.exists() else []


def changing(steps: list[dict[str, Any]]) -> list[tuple[str, str, list[list[str]]]]:
    """(host, step id, argv of each command) of the steps that change something."""
    out = []
    for s in steps:
        if s["changes"]:
            sid = f"{s['kind']}:{s['target']}" if s["target"] else s["kind"]
            out.append((s["host"], sid, [c["argv"] for c in s["commands"]]))
    return out


def plan_steps(plan_json: str) -> list[dict[str, Any]]:
    plan = json.loads(plan_json)
    return [s for st in plan["stages"] for s in st["steps"]]


def listening_ports(tb: Testbed, host: str) -> set[int]:
    """Every TCP port something listens on inside a host, on any address (`ss -ltnH`)."""
    out = tb.exec(host, ["ss", "-ltnH"]).stdout
    return {int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if line.strip()}


def open_from_laptop(tb: Testbed, host: str, timeout: float = 0.5) -> set[int]:
    """The listening ports of `host` that accept a TCP connection from the laptop's side.

    Connects from this (root) namespace, the laptop on the management bridge (tests/testbed/layout.py LAPTOP_IP), to
    the host's management address, on every port `ss` lists inside the host, in parallel. A port the firewall drops
    times out (`timeout` s); one bound to a fabric address or loopback only is refused. Before sparkctl starts
    anything, a fake Spark listens on sshd's port 22 alone (tests/testbed/boot.sh: dbus, udev and NetworkManager
    open no TCP socket), so the result needs no baseline subtracted.
    """
    address = tb.mgmt_ip(host)

    def accepts(port: int) -> bool:
        try:
            with socket.create_connection((address, port), timeout=timeout):
                return True
        except OSError:
            return False

    ports = sorted(listening_ports(tb, host))
    with ThreadPoolExecutor(max_workers=32) as pool:
        return {port for port, ok in zip(ports, pool.map(accepts, ports), strict=True) if ok}


__all__ = ["TWINS", "os"]
