"""Names, addresses and wiring of the fake Sparks: pure data, no side effects."""

from __future__ import annotations

import os
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ROOT = Path("/var/tmp/sparkctl-testbed")
"""Everything the testbed creates lives here (not under /tmp: the hosts get a private /tmp)."""

ROOT_ENV = "SPARKCTL_TESTBED_DIR"

BRIDGE = "sptb0"
LINK_PREFIX = "sptb"
NETNS_PREFIX = "sptb-"
LAPTOP_IP = "10.77.0.1"
MGMT_PREFIX_LEN = 24
MGMT_IFNAME = "enP7s7"
MGMT_HOST_OFFSET = 11

LOGIN_USER = "spark"
SUDO_PASSWORD = "spark-testbed-sudo"
"""Password of the login user on hosts whose sudo asks for one (every host but the first)."""

RUNTIME_VENV = "/opt/sparkctl-runtime"
RAY_PORT = 6379

DEFAULT_GID_INDEX = 3
GID_TABLE_SIZE = 16
DEFAULT_DRIVER_VERSION = "580.142"
DEFAULT_GPU_TEMPERATURE = 41

MAX_HOSTS = 8

SIM_MOUNTPOINT = "/run/testbed-sim"
"""Where each host sees its own simulated-hardware state directory."""


@dataclass(frozen=True)
class Twin:
    """One of the two logical ConnectX-7 interfaces a Spark shows per cable."""

    interface: str
    rdma_device: str
    subnet: str
    """First three octets of the twin's /24, e.g. 192.168.100."""


TWINS: tuple[Twin, ...] = (
    Twin("enp1s0f1np1", "rocep1s0f1", "192.168.100"),
    Twin("enP2p1s0f1np1", "roceP2p1s0f1", "192.168.101"),
)


@dataclass(frozen=True)
class HostSpec:
    """Everything that identifies one fake Spark."""

    name: str
    index: int
    gid_index: int

    @property
    def netns(self) -> str:
        return f"{NETNS_PREFIX}{self.name}"

    @property
    def mgmt_ip(self) -> str:
        return f"10.77.0.{MGMT_HOST_OFFSET + self.index}"

    @property
    def mgmt_peer(self) -> str:
        """Root-namespace end of the management veth (enslaved to the bridge)."""
        return f"{LINK_PREFIX}m{self.index}"

    @property
    def sudo_nopasswd(self) -> bool:
        return self.index == 0

    def fabric_ip(self, twin: Twin) -> str:
        return f"{twin.subnet}.{10 + self.index}"

    def fabric_cidr(self, twin: Twin) -> str:
        return f"{self.fabric_ip(twin)}/24"


@dataclass(frozen=True)
class FabricWiring:
    """How the twins are cabled: direct veth pairs (2 hosts) or one bridge per twin (more)."""

    topology: str
    bridges: tuple[str, ...]

    def port_name(self, twin_pos: int, host: HostSpec) -> str:
        """Root-namespace end of a host's twin in the switched topology."""
        return f"{LINK_PREFIX}f{twin_pos}h{host.index}"


def host_name(index: int) -> str:
    """spark-a, spark-b, ..."""
    return f"spark-{string.ascii_lowercase[index]}"


def default_root() -> Path:
    return Path(os.environ.get(ROOT_ENV, str(DEFAULT_ROOT)))


def build_host_specs(count: int, gid_index: Mapping[str, int] | None = None) -> list[HostSpec]:
    """Specs of `count` hosts; `gid_index` maps host name -> RoCE v2 IPv4 GID index."""
    if not 1 <= count <= MAX_HOSTS:
        raise ValueError(f"hosts must be between 1 and {MAX_HOSTS}, got {count}")
    names = [host_name(i) for i in range(count)]
    overrides = dict(gid_index or {})
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ValueError(f"gid_index names unknown hosts {unknown}; hosts are {names}")
    specs = []
    for i, name in enumerate(names):
        idx = overrides.get(name, DEFAULT_GID_INDEX)
        validate_gid_index(idx)
        specs.append(HostSpec(name=name, index=i, gid_index=idx))
    return specs


def validate_gid_index(idx: int) -> None:
    # v1 sits at idx-1 and must not collide with the link-local entries 0 and 1.
    if not 3 <= idx < GID_TABLE_SIZE:
        raise ValueError(f"gid index must be in 3..{GID_TABLE_SIZE - 1}, got {idx}")


def build_wiring(count: int) -> FabricWiring:
    """Two hosts: a veth pair per twin between them. More: a root-namespace bridge per twin."""
    if count <= 2:
        return FabricWiring(topology="direct", bridges=())
    return FabricWiring(topology="switch", bridges=tuple(f"{LINK_PREFIX}f{i}" for i in range(len(TWINS))))


def parse_gid_option(values: list[str]) -> dict[str, int]:
    """Parse ["spark-b=5", ...] as given on the command line."""
    out: dict[str, int] = {}
    for value in values:
        name, sep, idx = value.partition("=")
        if not sep or not idx.strip().isdigit():
            raise ValueError(f"expected HOST=INDEX, e.g. spark-b=5, got {value!r}")
        out[name.strip()] = int(idx)
    return out
