"""Links of the testbed: the management bridge, the hosts' network namespaces and the fabric twins."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ._proc import TestbedError, run
from .layout import BRIDGE, LAPTOP_IP, MGMT_IFNAME, MGMT_PREFIX_LEN, TWINS, HostSpec, build_wiring, ring_far_end

Record = Callable[[str, str], None]
"""record(kind, name) with kind "link" or "netns": called before the resource is created."""


def ip(command: str) -> None:
    """Run `ip <command>`; every word is one argument (interface and netns names have no spaces)."""
    run(["ip", *command.split()])


def lonely_peer(twin_ifname: str) -> str:
    """Far end of a twin on a single-host testbed (lives in the same namespace)."""
    return f"{twin_ifname[:10]}-p"


def wire_hosts(specs: Sequence[HostSpec], record: Record) -> None:
    """Create the bridge, one netns + management veth per host, and the fabric twins (MTU 1500, up)."""
    record("link", BRIDGE)
    ip(f"link add {BRIDGE} type bridge")
    ip(f"addr add {LAPTOP_IP}/{MGMT_PREFIX_LEN} dev {BRIDGE}")
    ip(f"link set {BRIDGE} up")
    for spec in specs:
        record("netns", spec.netns)
        ip(f"netns add {spec.netns}")
        record("link", spec.mgmt_peer)
        ip(f"link add {spec.mgmt_peer} type veth peer name {MGMT_IFNAME} netns {spec.netns}")
        ip(f"link set {spec.mgmt_peer} master {BRIDGE} up")
    wiring = build_wiring(len(specs), specs[0].topology)
    if wiring.topology == "ring":
        # one veth pair per lane: hosts[c] Port0's interfaces to hosts[c+1] Port1's (NVIDIA's ring cabling)
        for spec in specs:
            for pos in (0, 1):
                far_host, far_pos = ring_far_end(spec, pos)
                far = specs[far_host]
                ip(
                    f"link add name {spec.twins[pos].interface} netns {spec.netns} type veth"
                    f" peer name {far.twins[far_pos].interface} netns {far.netns}"
                )
    elif wiring.topology == "switch":
        for pos, (twin, bridge) in enumerate(zip(TWINS, wiring.bridges, strict=True)):
            record("link", bridge)
            ip(f"link add {bridge} mtu 9000 type bridge")
            ip(f"link set {bridge} up")
            for spec in specs:
                port = wiring.port_name(pos, spec)
                record("link", port)
                ip(f"link add {port} mtu 9000 type veth peer name {twin.interface} netns {spec.netns}")
                ip(f"link set {port} master {bridge} up")
    elif len(specs) == 2:
        a, b = specs
        for twin in TWINS:
            ip(f"link add name {twin.interface} netns {a.netns} type veth peer name {twin.interface} netns {b.netns}")
    else:
        ns = specs[0].netns
        for twin in TWINS:
            peer = lonely_peer(twin.interface)
            ip(f"link add name {twin.interface} netns {ns} type veth peer name {peer} netns {ns}")
            ip(f"-n {ns} link set {peer} up")
    for spec in specs:
        for twin in spec.twins:
            ip(f"-n {spec.netns} link set {twin.interface} mtu 1500 up")


def set_far_end(specs: Sequence[HostSpec], host: HostSpec, ifname: str, updown: str) -> None:
    """Set the other end of one of host's links up or down (so ifname gains or loses carrier)."""
    if ifname == MGMT_IFNAME:
        ip(f"link set {host.mgmt_peer} {updown}")
        return
    positions = [i for i, t in enumerate(host.twins) if t.interface == ifname]
    if not positions:
        raise TestbedError(f"{ifname} is neither a twin nor the management interface of {host.name}")
    wiring = build_wiring(len(specs), host.topology)
    if wiring.topology == "ring":
        far_host, far_pos = ring_far_end(host, positions[0])
        far = specs[far_host]
        ip(f"-n {far.netns} link set {far.twins[far_pos].interface} {updown}")
    elif wiring.topology == "switch":
        ip(f"link set {wiring.port_name(positions[0], host)} {updown}")
    elif len(specs) == 2:
        peer = next(s for s in specs if s.name != host.name)
        ip(f"-n {peer.netns} link set {ifname} {updown}")
    else:
        ip(f"-n {host.netns} link set {lonely_peer(ifname)} {updown}")
