"""Rules on the fabric: the twins (presence, NetworkManager, netplan, address, link, profiles), subnets, jumbo paths."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping

from sparkctl import paths
from sparkctl.doctor.evaluators.core import CheckContext, _f, _probed, evaluator
from sparkctl.doctor.rules import Finding, Rule
from sparkctl.inventory.models import Inventory
from sparkctl.inventory.topology import check_pairs, interface, link_of
from sparkctl.plan.fabric import twin_state


@evaluator("twin_present")
def twin_present(ctx: CheckContext, rule: Rule) -> list[Finding]:
    out = []
    for h, f in _probed(ctx):
        for t in h.fabric:
            out.append(
                _f(
                    rule,
                    t.interface in f.interfaces,
                    f"{h.name} {t.interface}",
                    "present"
                    if t.interface in f.interfaces
                    else f"absent; the host has {', '.join(sorted(f.interfaces))}",
                )
            )
    return out


@evaluator("twin_managed")
def twin_managed(ctx: CheckContext, rule: Rule) -> list[Finding]:
    out = []
    for h, f in _probed(ctx):
        for t in h.fabric:
            dev = f.nm_devices.get(t.interface)
            if t.interface not in f.interfaces:
                continue
            state = dev.state if dev else ("NetworkManager not running" if not f.nm_running else "not listed")
            out.append(
                _f(
                    rule,
                    dev is not None and dev.state != "unmanaged",
                    f"{h.name} {t.interface}",
                    f"NetworkManager state: {state}",
                )
            )
    return out


def netplan_renderers(files: Mapping[str, str], interfaces: list[str]) -> dict[str, tuple[str, str]]:
    """interface -> (netplan file defining it, renderer that takes effect), for the interfaces netplan defines.

    Follows netplan's parser (`src/parse.c`): files are read in order of their names, a file in /run shadowing one
    of the same name in /etc and /lib; a definition's renderer is its own `renderer`, else its type section's
    (`ethernets: {renderer: ...}`), else the global `network: {renderer: ...}` read so far
    (`get_default_backend_for_type`), else networkd.
    """
    import yaml

    by_name: dict[str, str] = {}
    for path in files:  # /lib < /etc < /run for one basename
        name = path.rsplit("/", 1)[-1]
        rank = {"/lib/": 0, "/etc/": 1, "/run/": 2}
        old = by_name.get(name)
        if old is None or rank.get(path[:5], 1) >= rank.get(old[:5], 1):
            by_name[name] = path
    found: dict[str, tuple[str, str]] = {}
    global_renderer = ""
    for name in sorted(by_name):
        path = by_name[name]
        try:
            doc = yaml.safe_load(files[path]) or {}
        except yaml.YAMLError:
            continue
        net = doc.get("network") if isinstance(doc, dict) else None
        if not isinstance(net, dict):
            continue
        if isinstance(net.get("renderer"), str):
            global_renderer = net["renderer"]
        for kind in ("ethernets", "bonds", "bridges", "vlans"):
            section = net.get(kind)
            if not isinstance(section, dict):
                continue
            type_renderer = section.get("renderer") if isinstance(section.get("renderer"), str) else ""
            for key, d in section.items():
                if not isinstance(d, dict):
                    continue
                names = {str(key), str((d.get("match") or {}).get("name", "")), str(d.get("set-name", ""))}
                for iface in interfaces:
                    if iface in names:
                        own = d.get("renderer") if isinstance(d.get("renderer"), str) else ""
                        found[iface] = (path, own or type_renderer or global_renderer or "networkd")
    return found


@evaluator("netplan_conflict")
def netplan_conflict(ctx: CheckContext, rule: Rule) -> list[Finding]:
    out = []
    for h, f in _probed(ctx):
        twins = [t.interface for t in h.fabric]
        rendered = netplan_renderers(f.netplan, twins)
        if not rendered:
            out.append(_f(rule, True, h.name, "no netplan file defines a twin"))
            continue
        for iface, (path, renderer) in sorted(rendered.items()):
            if renderer == "NetworkManager":
                evidence = (
                    f"{path} defines {iface} with renderer NetworkManager: netplan hands it to NetworkManager as "
                    "a profile (netplan-*), which sparkctl treats like any other profile on the twin"
                )
                out.append(_f(rule, True, f"{h.name} {iface}", evidence))
            else:
                evidence = (
                    f"{path} defines {iface} with renderer {renderer}: it takes effect through systemd-networkd, "
                    "beside (or instead of) NetworkManager's profile"
                )
                out.append(_f(rule, False, f"{h.name} {iface}", evidence))
    return out


@evaluator("twin_address")
def twin_address(ctx: CheckContext, rule: Rule) -> list[Finding]:
    out = []
    mtu = ctx.inventory.network.mtu
    for h, f in _probed(ctx):
        for t in h.fabric:
            live = f.interfaces.get(t.interface)
            if live is None:
                continue
            ok = twin_state(t, live, mtu).ok
            out.append(
                _f(
                    rule,
                    ok,
                    f"{h.name} {t.interface}",
                    f"has {','.join(live.ipv4) or 'no IPv4'} MTU {live.mtu} {live.operstate}; "
                    f"inventory {t.address} MTU {mtu}",
                )
            )
    return out


def _gts(text: str) -> float | None:
    """`32.0 GT/s PCIe` (sysfs current_link_speed / max_link_speed) -> 32.0."""
    m = re.match(r"\s*(\d+(?:\.\d+)?)\s*GT/s", text)
    return float(m.group(1)) if m else None


@evaluator("twin_link")
def twin_link(ctx: CheckContext, rule: Rule) -> list[Finding]:
    """Each twin's negotiated speed and its function's PCIe link against the Spark's (200 Gb/s, Gen5 x4)."""
    out = []
    a = rule.args
    for h, f in _probed(ctx):
        for t in h.fabric:
            link = f.links.get(t.interface)
            if link is None:
                continue
            subject = f"{h.name} {t.interface}"
            if link.pcie_width is None:
                speed = f"{link.speed_mbps} Mb/s" if link.speed_mbps is not None else "speed unreadable"
                out.append(_f(rule, True, subject, f"not judged: no PCI device (a virtual interface; {speed})"))
                continue
            pcie = f"PCIe x{link.pcie_width} {link.pcie_speed or '?'}"
            pcie += f" (max x{link.pcie_max_width or '?'} {link.pcie_max_speed or '?'})"
            problems = []
            if link.speed_mbps is None:
                speed = "speed unreadable (link down?)"
            else:
                speed = f"{link.speed_mbps // 1000} Gb/s"
                if link.speed_mbps < a["min_speed_mbps"]:
                    problems.append(f"negotiated {speed}, below {a['min_speed_mbps'] // 1000} Gb/s")
            gts = _gts(link.pcie_speed)
            if link.pcie_width < a["min_pcie_width"] or (gts is not None and gts < a["min_pcie_gts"]):
                problems.append(f"{pcie}, below x{a['min_pcie_width']} {a['min_pcie_gts']:g} GT/s (Gen5 x4)")
            evidence = "; ".join(problems) if problems else f"{speed}, {pcie}"
            out.append(_f(rule, not problems, subject, evidence))
    return out


@evaluator("duplicate_profiles")
def duplicate_profiles(ctx: CheckContext, rule: Rule) -> list[Finding]:
    out = []
    for h, f in _probed(ctx):
        for t in h.fabric:
            name = paths.connection_name(t.interface)
            found = [c for c in f.nm_connections if c.name == name]
            evidence = (
                f"{len(found)} profiles named {name}: "
                + ", ".join(f"{c.uuid}{' (active on ' + c.device + ')' if c.device else ''}" for c in found)
                if len(found) > 1
                else f"{len(found)} profile named {name}"
            )
            out.append(_f(rule, len(found) <= 1, f"{h.name} {t.interface}", evidence))
    return out


@evaluator("twin_subnets")
def twin_subnets(ctx: CheckContext, rule: Rule) -> list[Finding]:
    out = []
    inv = ctx.inventory
    for h, f in _probed(ctx):
        # a subnet holds the host's interfaces of one link (both logical interfaces of a ring port share one)
        me = inv.hosts.index(h)
        nets: dict[ipaddress.IPv4Network, list[str]] = {}
        link_nets: dict[int, ipaddress.IPv4Network] = {}
        for j, t in enumerate(h.fabric):
            nets.setdefault(t.address.network, []).append(t.interface)
            link = link_of(inv, me, j)
            link_nets.setdefault(link.index if link else -1 - j, t.address.network)
        intruders = []
        for iface in f.interfaces.values():
            for a in iface.ipv4:
                net = ipaddress.ip_interface(a).network
                for fnet, twins in nets.items():
                    if net.overlaps(fnet) and iface.name not in twins:  # a twin on its own subnet is the point
                        intruders.append(f"{iface.name} {a} overlaps {twins[0]}'s {fnet}")
        distinct = len(set(link_nets.values())) == len(link_nets)
        evidence = "; ".join(intruders) or ("each twin on its own subnet" if distinct else "twins share a subnet")
        out.append(_f(rule, distinct and not intruders, h.name, evidence))
    return out


def _expected_peer(inv: Inventory, host: str, iface: str, address: str) -> tuple[str, str]:
    """(the peer the topology puts at the far end, e.g. `spark-2 enp1s0f1np1`; the link's label) of one ping."""
    for src, dst in check_pairs(inv):
        a, b = interface(inv, src), interface(inv, dst)
        if inv.hosts[src.host].name == host and a.interface == iface and str(b.address.ip) == address:
            link = link_of(inv, src.host, src.twin)
            return f"{inv.hosts[dst.host].name} {b.interface}", link.label if link else ""
    return "", ""


@evaluator("jumbo_path")
def jumbo_path(ctx: CheckContext, rule: Rule) -> list[Finding]:
    inv = ctx.inventory
    out = []
    for (host, iface, peer), (ok, tail) in sorted(ctx.pings.items()):
        expected, label = _expected_peer(inv, host, iface, peer)
        subject = f"{host} {iface} -> {expected} {peer}" if expected else f"{host} {iface} -> {peer}"
        evidence = tail or ("crossed" if ok else "did not cross")
        fix = None
        if not ok and expected:
            evidence += f"; expected {expected} ({peer}) at the other end of {label}"
            if inv.network.topology == "ring":
                fix = (
                    f"check that {label} is cabled as the inventory says (Port0 is the CX-7 port next to the "
                    f"Ethernet port) and that {expected.split()[0]} runs MTU {inv.network.mtu} (sparkctl up)"
                )
            elif inv.network.topology == "switch":
                fix = (
                    f"check that the switch ports of {host} {iface} and {expected} are in the same bridge/VLAN "
                    f"with MTU {inv.network.mtu} or more, then run sparkctl up"
                )
        out.append(_f(rule, ok, subject, evidence, fix=fix))
    return out
