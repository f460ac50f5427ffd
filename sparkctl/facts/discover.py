"""discover: read hosts' twins, RDMA devices and GPU, and propose a complete inventory (pure parts here)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from sparkctl.facts.parse import parse_ip_addr, parse_nvidia_smi, parse_route_dev, parse_sections
from sparkctl.facts.probe import MARK, NVIDIA_QUERY

DISCOVER_PROBE = f"""export LC_ALL=C PATH="$PATH:/usr/sbin:/sbin"
echo '{MARK} identity'; id -un; hostname
echo '{MARK} ssh'; ip -j route get "${{SSH_CONNECTION%% *}}" 2>/dev/null || echo '[]'
echo '{MARK} ip_addr'; ip -j addr show
echo '{MARK} rdma'; if command -v ibdev2netdev >/dev/null; then ibdev2netdev; else
  for d in /sys/class/infiniband/*; do [ -d "$d/device/net" ] || continue
    for n in "$d"/device/net/*; do echo "${{d##*/}} port 1 ==> ${{n##*/}} (?)"; done; done; fi; true
echo '{MARK} gpus'; command -v nvidia-smi >/dev/null && nvidia-smi {NVIDIA_QUERY} --format=csv,noheader; true
echo '{MARK} end'
"""


@dataclass
class Discovered:
    """What one host showed."""

    address: str
    user: str = ""
    hostname: str = ""
    ssh_interface: str = ""
    twins: list[tuple[str, str]] = field(default_factory=list)  # (netdev, rdma device), up ones, sorted
    used_nets: list[str] = field(default_factory=list)
    gpu: str = ""
    unknown: list[str] = field(default_factory=list)


def parse_discovery(address: str, output: str) -> Discovered:
    """The discover probe's output -> what we learned and what we could not."""
    s = parse_sections(output)
    ident = ([*s.get("identity", "").splitlines(), "", ""])[:2]
    d = Discovered(address=address, user=ident[0].strip(), hostname=ident[1].strip())
    d.ssh_interface = parse_route_dev(s.get("ssh", ""))
    ifaces = parse_ip_addr(s.get("ip_addr", "") or "[]")
    d.used_nets = sorted({str(ipaddress.ip_interface(a).network) for i in ifaces.values() for a in i.ipv4})
    for line in s.get("rdma", "").splitlines():
        m = re.match(r"^(\S+) port \d+ ==> (\S+)", line)
        netdev = m.group(2) if m else ""
        if (
            m
            and netdev in ifaces
            and netdev != d.ssh_interface
            and (ifaces[netdev].up or ifaces[netdev].operstate == "UP")
        ):
            d.twins.append((netdev, m.group(1)))
    # Port0's logical interfaces (…np0) before Port1's (…np1), each port's in name order: a ring's inventory order
    d.twins.sort(key=lambda t: (_port(t[0]), t[0].lower()))
    if not d.twins:
        d.unknown.append("no up ConnectX-7 twin found (ibdev2netdev and sysfs show no RDMA netdev that is up)")
    gpus = parse_nvidia_smi(s.get("gpus", ""))
    d.gpu = ", ".join(f"{g.name} (compute {g.compute_cap}, driver {g.driver})" for g in gpus)
    if not gpus:
        d.unknown.append("no GPU reported by nvidia-smi")
    return d


def _port(netdev: str) -> int:
    m = re.search(r"np(\d)$", netdev)
    return int(m.group(1)) if m else 0


def guess_topology(found: list[Discovered]) -> str:
    """The topology what is up suggests: three hosts with four interfaces up each are NVIDIA's ring (both ports
    cabled); two hosts with one port each, a direct cable; more hosts with one port each, a switch."""
    counts = {len(d.twins) for d in found}
    if len(found) == 3 and counts == {4}:
        return "ring"
    if len(found) == 2:
        return "direct"
    return "switch"


def _free_subnets(found: list[Discovered], count: int) -> list[ipaddress.IPv4Network]:
    """Up to `count` /24s from 192.168.100.0 on that overlap no network the hosts already use, one per link."""
    used = {ipaddress.ip_network(n) for d in found for n in d.used_nets}
    subnets: list[ipaddress.IPv4Network] = []
    third = 100
    while len(subnets) < count and third < 255:
        net = ipaddress.IPv4Network(f"192.168.{third}.0/24")
        if not any(net.overlaps(u) for u in used):
            subnets.append(net)
        third += 1
    return subnets


def propose_inventory(
    found: list[Discovered], cluster: str = "spark-pair", ssh: Mapping[str, object] | None = None
) -> tuple[str, list[str]]:
    """A complete inventory as YAML, and what could not be determined."""
    topology = guess_topology(found)
    links = len(found) if topology == "ring" else max((len(d.twins) for d in found), default=0)
    subnets = _free_subnets(found, links)
    problems = [f"{d.address}: {u}" for d in found for u in d.unknown]
    counts = {len(d.twins) for d in found}
    if len(counts) > 1:
        problems.append(f"hosts show different numbers of twins: {[len(d.twins) for d in found]}")
    lines = [
        f"# proposed by `sparkctl discover` from {', '.join(d.address for d in found)}",
        f"cluster: {cluster}",
        "ssh:",
    ]
    settings = {k: v for k, v in (ssh or {}).items() if v not in (None, "")}
    if found and found[0].user:
        settings.setdefault("user", found[0].user)
    lines += [f"  {k}: {v}" for k, v in settings.items()]
    lines += ["network:", "  mtu: 9000", f"  topology: {topology}"]
    if topology == "ring":
        lines.append(
            "  # ring: each host's Port0 is cabled to the next host's Port1, the last host's Port0 to the first's "
            "Port1; reorder the hosts if yours run the other way (sparkctl up's jumbo checks verify it)"
        )
    lines.append("hosts:")
    names = [
        re.sub(r"[^A-Za-z0-9_.-]", "-", d.hostname or f"spark-{i}").lstrip("-.") or f"spark-{i}"
        for i, d in enumerate(found)
    ]
    for i, d in enumerate(found):
        name = names[i]
        lines += [f"  - name: {name}", f"    address: {d.address}"]
        if d.gpu:
            lines.append(f"    # GPU: {d.gpu}")
        lines.append("    fabric:")
        for j, (netdev, rdma) in enumerate(d.twins):
            if topology == "ring":
                # Port0 (j 0, 1) on cable i, Port1 (j 2, 3) on cable i-1: .11/.12 for the Port0 end, .13/.14 Port1's
                cable = i if j < 2 else (i - 1) % len(found)
                if cable >= len(subnets):
                    break
                addr = f"{subnets[cable].network_address + 11 + j}/{subnets[cable].prefixlen}"
            else:
                if j >= len(subnets):
                    break
                addr = f"{subnets[j].network_address + 10 + i}/{subnets[j].prefixlen}"
            lines += [f"      - interface: {netdev}", f"        address: {addr}", f"        rdma_device: {rdma}"]
        if not d.twins:
            lines.append("      []  # could not determine the twins: fill in by hand")
    lines += ["runtime:", "  venv: /opt/sparkctl-runtime", "ray:", f"  head: {names[0] if names else ''}"]
    lines += ["workloads: []"]
    return "\n".join(lines) + "\n", problems
