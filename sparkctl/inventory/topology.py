"""The fabric's links, derived from `network.topology` and the order of each host's `fabric` list.

A *link* is one subnet: the interfaces that share it, and the *lanes* among them (interfaces that reach each
other at layer 2). sparkctl never asks for links in the inventory: it derives them, then checks the addresses
against them (checks.py) and, once hosts answer, the wiring (the jumbo-frame checks and `doctor`).

- `direct` (2 hosts, one cable): link j joins fabric[j] of both hosts (the twins of the cable: NVIDIA's
  "Connect two Sparks" playbook, one /24 per logical interface).
- `switch` (2..N hosts, one cable per host to a switch): link j joins fabric[j] of every host, one subnet per
  twin index; the switch puts all ports of one twin index in one layer-2 domain (a bridge or VLAN). NVIDIA's
  playbook "Connect Multiple DGX Spark through a Switch" (nvidia/multi-sparks-through-switch/README.md, step 4:
  every port on one switch bridge).
- `ring` (3 hosts, two cables per host): NVIDIA's "Connect Three DGX Spark in a Ring Topology"
  (nvidia/connect-three-sparks/README.md, step 2): Node1 Port0 -> Node2 Port1, Node2 Port0 -> Node3 Port1,
  Node3 Port0 -> Node1 Port1, and (step 3) all four logical interfaces of each node addressed, one /24 per cable
  (both logical interfaces of a port in the cable's subnet). In the inventory each ring host lists
  fabric[0], fabric[1]: the two logical interfaces of Port0 (e.g. enp1s0f0np0, enP2p1s0f0np0), then fabric[2],
  fabric[3]: those of Port1 (enp1s0f1np1, enP2p1s0f1np1). Cable c joins hosts[c] Port0 to hosts[c+1] Port1
  (hosts[2] Port0 to hosts[0] Port1); its lanes pair the logical interfaces in order (fabric[0] with the peer's
  fabric[2], fabric[1] with fabric[3]).
"""

from __future__ import annotations

from dataclasses import dataclass

from sparkctl.inventory.models import FabricInterface, Host, Inventory

RING_HOSTS = 3
RING_TWINS = 4
PORT0 = (0, 1)
"""Ring: the fabric positions of a host's Port0 (the CX-7 port next to the Ethernet port)."""
PORT1 = (2, 3)


@dataclass(frozen=True, order=True)
class End:
    """One interface of a link: hosts[host].fabric[twin]."""

    host: int
    twin: int


@dataclass(frozen=True)
class Link:
    """One subnet of the fabric: its interfaces and the lanes (layer-2 segments) among them."""

    index: int
    label: str
    ends: tuple[End, ...]
    lanes: tuple[tuple[End, ...], ...]


def links(inv: Inventory) -> list[Link]:
    """The links of the inventory's topology (only the ends that exist: the checks report the missing ones)."""
    hosts = inv.hosts
    if inv.network.topology == "ring":
        out = []
        n = len(hosts)
        for c in range(n):
            d = (c + 1) % n
            if d == c:
                break
            lanes = tuple(
                (End(c, a), End(d, b))
                for a, b in zip(PORT0, PORT1, strict=True)
                if len(hosts[c].fabric) > a and len(hosts[d].fabric) > b
            )
            ends = tuple(e for lane in lanes for e in lane)
            label = f"cable {c} ({hosts[c].name} Port0 - {hosts[d].name} Port1)"
            out.append(Link(index=c, label=label, ends=ends, lanes=lanes))
        return out
    width = max((len(h.fabric) for h in hosts), default=0)
    out = []
    for j in range(width):
        ends = tuple(End(i, j) for i, h in enumerate(hosts) if len(h.fabric) > j)
        out.append(Link(index=j, label=f"link {j} (fabric[{j}] of every host)", ends=ends, lanes=(ends,)))
    return out


def interface(inv: Inventory, end: End) -> FabricInterface:
    """The inventory entry of one end."""
    return inv.hosts[end.host].fabric[end.twin]


def link_of(inv: Inventory, host_index: int, twin: int) -> Link | None:
    """The link hosts[host_index].fabric[twin] belongs to."""
    for link in links(inv):
        if End(host_index, twin) in link.ends:
            return link
    return None


def check_pairs(inv: Inventory) -> list[tuple[End, End]]:
    """Which interface pings which to prove a lane carries jumbo frames, both ways through every port.

    On each lane, the k interfaces in host order each ping the next one (the last pings the first): k pings
    per lane. Two ends (a cable): both directions. A switch lane of N hosts: N pings, so every switch port sends
    and receives a jumbo frame once, rather than N*(N-1) for a full mesh. A port on the wrong VLAN or MTU fails
    two of them (into it and out of it), which names it; a full mesh would only repeat the same evidence, and its
    cost grows with the square of the hosts (56 pings per twin for 8 hosts instead of 8).
    """
    pairs: list[tuple[End, End]] = []
    for link in links(inv):
        for lane in link.lanes:
            if len(lane) == 2:
                pairs += [(lane[0], lane[1]), (lane[1], lane[0])]
            elif len(lane) > 2:
                pairs += [(lane[i], lane[(i + 1) % len(lane)]) for i in range(len(lane))]
    return pairs


def neighbours(inv: Inventory, host: Host) -> list[Host]:
    """Hosts sharing a link with `host`, in inventory order."""
    me = next(i for i, h in enumerate(inv.hosts) if h.name == host.name)
    found: set[int] = set()
    for link in links(inv):
        if any(e.host == me for e in link.ends):
            found |= {e.host for e in link.ends if e.host != me}
    return [inv.hosts[i] for i in sorted(found)]


def ring_routes(inv: Inventory, host: Host) -> dict[int, list[tuple[str, str]]]:
    """Ring only: static routes that make every host's fabric address (fabric[0]) reachable from every host.

    hosts[h].fabric[0] sits on cable h, shared with hosts[h+1] only. hosts[h+2] (= hosts[h-1]) reaches it through
    hosts[h+1]'s Port1 address on cable h... which is one hop for hosts[h+1] itself. So each host needs one route:
    the subnet of the cable it is not on (cable h+1) via hosts[h+1]'s fabric[2] address on cable h, carried by
    the profile of its fabric[0]. Returns {fabric position: [(destination subnet, next hop)]}.
    """
    if inv.network.topology != "ring" or len(inv.hosts) != RING_HOSTS:
        return {}
    n = len(inv.hosts)
    h = next(i for i, x in enumerate(inv.hosts) if x.name == host.name)
    nxt = inv.hosts[(h + 1) % n]
    if len(nxt.fabric) < RING_TWINS or len(host.fabric) < RING_TWINS:
        return {}
    far = nxt.fabric[0].address.network  # cable h+1
    return {0: [(str(far), str(nxt.fabric[2].address.ip))]}


RING_TABLE = 5100
"""Ring: routing table (and rule priority) of fabric[j] is RING_TABLE + j."""


def ring_source_policy(inv: Inventory, host: Host, position: int) -> tuple[str, str] | None:
    """Ring only: (route, rule) that send what hosts[..].fabric[position] answers out of fabric[position] itself.

    Both logical interfaces of a ring port hold addresses of one /24 (NVIDIA's addressing), so the main table
    reaches that subnet through one of them only; a reply to a ping bound to the other one (the jumbo check of the
    second lane) would leave through the first and never reach the bound socket. A table per interface holding
    the cable's subnet on that interface, looked up for traffic from the interface's address, keeps each lane's
    traffic on its lane: `ip rule` "from ADDR lookup TABLE" (ip-rule(8)); a lookup that finds no route in the table
    goes on to the next rule, so everything else still uses the main table.
    """
    if inv.network.topology != "ring" or position >= len(host.fabric):
        return None
    twin = host.fabric[position]
    table = RING_TABLE + position
    return f"{twin.address.network} table={table}", f"priority {table} from {twin.address.ip} table {table}"
