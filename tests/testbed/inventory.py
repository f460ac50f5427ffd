"""The sparkctl inventory describing the fake Sparks (format of inventories/example-pair.yaml)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from .layout import LOGIN_USER, RAY_PORT, RUNTIME_VENV, HostSpec

HEADER = (
    "# Written by the sparkctl testbed (tests/testbed) for its fake Sparks in network namespaces.\n"
    "# Regenerated on every Testbed.inventory_path() call; edits are lost.\n"
)


def build_inventory(
    specs: Sequence[HostSpec],
    *,
    identity_file: Path,
    known_hosts: Path,
    topology: str = "direct",
    workloads: Sequence[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Inventory data for the given hosts; pure."""
    return {
        "cluster": "testbed",
        "ssh": {
            "user": LOGIN_USER,
            "port": 22,
            "identity_file": str(identity_file),
            "known_hosts": str(known_hosts),
            "connect_timeout": 5,
            "command_timeout": 120,
        },
        "network": {"mtu": 9000, "topology": topology},
        "hosts": [
            {
                "name": spec.name,
                "address": spec.mgmt_ip,
                "fabric": [
                    {
                        "interface": twin.interface,
                        "address": spec.fabric_cidr(twin),
                        "rdma_device": twin.rdma_device,
                    }
                    for twin in spec.twins
                ],
            }
            for spec in specs
        ],
        "runtime": {"venv": RUNTIME_VENV},
        "ray": {"head": specs[0].name, "port": RAY_PORT},
        "workloads": [dict(w) for w in (workloads or [])],
    }


def render_inventory(data: dict[str, Any]) -> str:
    return HEADER + yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def write_inventory(path: Path, data: dict[str, Any]) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_inventory(data))
    tmp.replace(path)
    return path
