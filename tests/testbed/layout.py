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

RING_TWINS: tuple[Twin, ...] = (
    Twin("enp1s0f0np0", "rocep1s0f0", ""),
    Twin("enP2p1s0f0np0", "roceP2p1s0f0", ""),
    Twin("enp1s0f1np1", "rocep1s0f1", ""),
    Twin("enP2p1s0f1np1", "roceP2p1s0f1", ""),
)
"""A ring host's four logical interfaces, as NVIDIA's three-Spark ring addresses them (connect-three-sparks
README, step 3): Port0's two (…f0np0), then Port1's (…f1np1). A ring subnet belongs to a cable, not to a twin."""

RING_HOSTS = 3
RING_SUBNET = "192.168.{}"
RING_FIRST_CABLE = 110
"""Cable c of the ring is 192.168.(110 + c).0/24."""

TOPOLOGIES = ("direct", "switch", "ring")


@dataclass(frozen=True)
class HostSpec:
    """Everything that identifies one fake Spark."""

    name: str
    index: int
    gid_index: int
    topology: str = "direct"

    @property
    def twins(self) -> tuple[Twin, ...]:
        """The fabric interfaces this host has: four on a ring, the two twins of one port otherwise."""
        return RING_TWINS if self.topology == "ring" else TWINS

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
        if self.topology == "ring":
            # cable c joins host c's Port0 (.11, .12) to host c+1's Port1 (.13, .14)
            pos = RING_TWINS.index(twin)
            cable = self.index if pos < 2 else (self.index - 1) % RING_HOSTS
            return f"{RING_SUBNET.format(RING_FIRST_CABLE + cable)}.{11 + pos}"
        return f"{twin.subnet}.{10 + self.index}"

    def fabric_cidr(self, twin: Twin) -> str:
        return f"{self.fabric_ip(twin)}/24"


@dataclass(frozen=True)
class FabricWiring:
    """How the twins are cabled: direct veth pairs (2 hosts), one bridge per twin (a switch), or a veth pair per
    lane of each ring cable (hosts[c] Port0's interfaces to hosts[c+1] Port1's, in order)."""

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


def default_topology(count: int) -> str:
    return "direct" if count <= 2 else "switch"


def build_host_specs(
    count: int, gid_index: Mapping[str, int] | None = None, topology: str | None = None
) -> list[HostSpec]:
    """Specs of `count` hosts; `gid_index` maps host name -> RoCE v2 IPv4 GID index."""
    if not 1 <= count <= MAX_HOSTS:
        raise ValueError(f"hosts must be between 1 and {MAX_HOSTS}, got {count}")
    topology = topology or default_topology(count)
    if topology not in TOPOLOGIES:
        raise ValueError(f"topology must be one of {', '.join(TOPOLOGIES)}, got {topology!r}")
    if topology == "ring" and count != RING_HOSTS:
        raise ValueError(f"a ring has {RING_HOSTS} hosts, got {count}")
    if topology == "direct" and count > 2:
        raise ValueError(f"direct wiring joins at most 2 hosts, got {count}")
    names = [host_name(i) for i in range(count)]
    overrides = dict(gid_index or {})
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ValueError(f"gid_index names unknown hosts {unknown}; hosts are {names}")
    specs = []
    for i, name in enumerate(names):
        idx = overrides.get(name, DEFAULT_GID_INDEX)
        validate_gid_index(idx)
        specs.append(HostSpec(name=name, index=i, gid_index=idx, topology=topology))
    return specs


def validate_gid_index(idx: int) -> None:
    # v1 sits at idx-1 and must not collide with the link-local entries 0 and 1.
    if not 3 <= idx < GID_TABLE_SIZE:
        raise ValueError(f"gid index must be in 3..{GID_TABLE_SIZE - 1}, got {idx}")


def build_wiring(count: int, topology: str | None = None) -> FabricWiring:
    """Two hosts: a veth pair per twin between them. A switch: a root-namespace bridge per twin. A ring: a veth
    pair per lane of each cable."""
    topology = topology or default_topology(count)
    if topology == "direct":
        return FabricWiring(topology="direct", bridges=())
    if topology == "ring":
        return FabricWiring(topology="ring", bridges=())
    return FabricWiring(topology="switch", bridges=tuple(f"{LINK_PREFIX}f{i}" for i in range(len(TWINS))))


def ring_far_end(host: HostSpec, pos: int) -> tuple[int, int]:
    """(host index, twin position) at the other end of a ring host's interface: Port0 (0, 1) goes to the next
    host's Port1 (2, 3), Port1 to the previous host's Port0."""
    if pos < 2:
        return (host.index + 1) % RING_HOSTS, pos + 2
    return (host.index - 1) % RING_HOSTS, pos - 2


def parse_gid_option(values: list[str]) -> dict[str, int]:
    """Parse ["spark-b=5", ...] as given on the command line."""
    out: dict[str, int] = {}
    for value in values:
        name, sep, idx = value.partition("=")
        if not sep or not idx.strip().isdigit():
            raise ValueError(f"expected HOST=INDEX, e.g. spark-b=5, got {value!r}")
        out[name.strip()] = int(idx)
    return out
