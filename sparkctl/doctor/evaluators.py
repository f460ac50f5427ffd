"""Evaluators: one function per kind of test in the rule table; each returns findings for its rule."""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from sparkctl import paths
from sparkctl.doctor.rules import Finding, Level, Rule
from sparkctl.errors import Problem
from sparkctl.facts.models import HostFacts, NcclLib
from sparkctl.inventory.models import Host, Inventory, Workload
from sparkctl.inventory.topology import check_pairs, interface, link_of
from sparkctl.plan.env import detect_gid_index, version_tuple
from sparkctl.plan.fabric import twin_state
from sparkctl.plan.images import image_source
from sparkctl.plan.layout import needs_ray, rank_hosts, ray_wanted, workload_ranks
from sparkctl.plan.live_state import RAY_MARKERS, workload_exit


@dataclass(frozen=True)
class CheckContext:
    """What checks look at: the inventory, facts per host, and jumbo-ping outcomes per link direction."""

    inventory: Inventory
    facts: Mapping[str, HostFacts]
    pings: Mapping[tuple[str, str, str], tuple[bool, str]] = field(default_factory=dict)
    """(host, interface, peer address) -> (crossed?, output tail)."""
    unreachable: Mapping[str, Sequence[Problem]] = field(default_factory=dict)
    """Hosts that could not be read (no facts), with why: the other rules judge the hosts that were."""


Evaluator = Callable[[CheckContext, Rule], list[Finding]]
EVALUATORS: dict[str, Evaluator] = {}


def evaluator(name: str) -> Callable[[Evaluator], Evaluator]:
    def register(fn: Evaluator) -> Evaluator:
        EVALUATORS[name] = fn
        return fn

    return register


def _f(
    rule: Rule, ok: bool | None, subject: str, evidence: str, level: Level | None = None, fix: str | None = None
) -> Finding:
    lvl: Level = "pass" if ok else (level or rule.level)
    return Finding(
        rule=rule.id,
        category=rule.category,
        level=lvl,
        subject=subject,
        evidence=evidence,
        fix="" if ok else (fix or rule.fix),
        why=rule.why,
        source=rule.source,
        preflight=rule.preflight,
        force_ok=rule.force_ok,
    )


def _probed(ctx: CheckContext) -> list[tuple[Host, HostFacts]]:
    """Inventory hosts with their facts, in inventory order (hosts without facts are left out)."""
    return [(h, ctx.facts[h.name]) for h in ctx.inventory.hosts if h.name in ctx.facts]


def _hosts(ctx: CheckContext) -> list[tuple[str, HostFacts]]:
    return [(h.name, f) for h, f in _probed(ctx)]


@evaluator("reachable")
def reachable(ctx: CheckContext, rule: Rule) -> list[Finding]:
    """Every host was connected to and read; one that was not is named with the connection's own error and fix."""
    out = []
    for h in ctx.inventory.hosts:
        if h.name in ctx.facts:
            out.append(_f(rule, True, h.name, "connected and read"))
        elif h.name in ctx.unreachable:
            problems = ctx.unreachable[h.name]
            evidence = "; ".join(p.message for p in problems) or "could not be reached"
            fix = "; ".join(dict.fromkeys(p.hint for p in problems if p.hint)) or None
            out.append(_f(rule, False, h.name, f"not read: {evidence}", fix=fix))
    return out


@evaluator("state_free")
def state_free(ctx: CheckContext, rule: Rule) -> list[Finding]:
    """Room where sparkctl writes on each host (its state directory, the workloads' logs): at least `min_free_mib`."""
    need = int(rule.args["min_free_mib"]) * 2**20
    out = []
    for name, f in _hosts(ctx):
        for path, free in f.state_free.items():
            evidence = f"{path}: {free} bytes ({_mib(free)}) free"
            if free < need:
                evidence += f", below the {_mib(need)} a run needs there"
            out.append(_f(rule, free >= need, name, evidence))
    return out


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.1f} GiB"


@evaluator("gpu_name")
def gpu_name(ctx: CheckContext, rule: Rule) -> list[Finding]:
    out = []
    for name, f in _hosts(ctx):
        names = [g.name for g in f.gpus]
        out.append(_f(rule, rule.args["name"] in names, name, f"nvidia-smi: {', '.join(names) or 'no GPU found'}"))
    return out


@evaluator("compute_cap")
def compute_cap(ctx: CheckContext, rule: Rule) -> list[Finding]:
    return [
        _f(
            rule,
            bool(f.gpus) and all(g.compute_cap == rule.args["value"] for g in f.gpus),
            name,
            f"compute capability {', '.join(g.compute_cap for g in f.gpus) or 'unknown'}",
        )
        for name, f in _hosts(ctx)
    ]


@evaluator("driver")
def driver(ctx: CheckContext, rule: Rule) -> list[Finding]:
    """Each GPU's driver at least `args.minimum` (a version, any branch); `args.notes` add a branch's known reports to
    the evidence without changing the level."""
    out = []
    minimum = str(rule.args["minimum"])
    for name, f in _hosts(ctx):
        drivers = [g.driver for g in f.gpus]
        if not drivers:
            out.append(_f(rule, False, name, "driver unknown (no nvidia-smi)"))
            continue
        old = [d for d in drivers if version_tuple(d) < version_tuple(minimum)]
        evidence = f"driver {', '.join(drivers)}" + (f" (older than {minimum})" if old else f" (>= {minimum})")
        notes = [str(n["note"]) for n in rule.args.get("notes", []) if any(d.startswith(n["branch"]) for d in drivers)]
        evidence += "".join(f"; note: {n}" for n in notes)
        out.append(_f(rule, not old, name, evidence))
    return out


@evaluator("cuda_major")
def cuda_major(ctx: CheckContext, rule: Rule) -> list[Finding]:
    out = []
    for name, f in _hosts(ctx):
        if not f.cuda_version:
            continue
        major = int(f.cuda_version.split(".")[0]) if f.cuda_version[0].isdigit() else 0
        out.append(_f(rule, major == rule.args["major"], name, f"CUDA {f.cuda_version}"))
    return out


@evaluator("nccl_version")
def nccl_version(ctx: CheckContext, rule: Rule) -> list[Finding]:
    """The runtime's NCCL against `minimum`; in a ring also against `ring_minimum`, the first NCCL that reads the
    NCCL_IB_SUBNET_AWARE_ROUTING sparkctl writes there (an older one ignores it silently)."""
    ring = ctx.inventory.network.topology == "ring"
    out = []
    for name, f in _hosts(ctx):
        if not f.runtime.nccl:
            continue
        have = version_tuple(f.runtime.nccl)
        if have < version_tuple(rule.args["minimum"]):
            out.append(_f(rule, False, name, f"NCCL {f.runtime.nccl}"))
        elif ring and have < version_tuple(rule.args["ring_minimum"]):
            ignored = f"ignores NCCL_IB_SUBNET_AWARE_ROUTING (read from {rule.args['ring_minimum']})"
            out.append(_f(rule, False, name, f"NCCL {f.runtime.nccl} {ignored}"))
        else:
            out.append(_f(rule, True, name, f"NCCL {f.runtime.nccl}"))
    return out


@evaluator("nccl_known_hang")
def nccl_known_hang(ctx: CheckContext, rule: Rule) -> list[Finding]:
    """A vLLM workload spanning `min_ranks` Sparks or more whose hosts' runtime holds NCCL `version`, without the
    workaround `env` in the workload's environment (rules.yaml nccl-2304-nvls)."""
    out = []
    bad = str(rule.args["version"])
    workaround = {str(k): str(v) for k, v in rule.args["env"].items()}
    for w in ctx.inventory.workloads:
        if w.engine != "vllm":
            continue
        ranks = workload_ranks(w)
        hosts = [h.name for h in ctx.inventory.group(w)[:ranks] if h.name in ctx.facts]
        versions = sorted({ctx.facts[n].runtime.nccl for n in hosts} - {""})
        if not versions:
            continue
        subject = f"workload {w.name}"
        have = f"NCCL {', '.join(versions)}, {ranks} rank(s)"
        if bad not in versions or ranks < rule.args["min_ranks"]:
            out.append(_f(rule, True, subject, have))
        elif all(w.env.get(k) == v for k, v in workaround.items()):
            set_ = ", ".join(f"{k}={v}" for k, v in workaround.items())
            out.append(_f(rule, True, subject, f"{have}; {set_} set (the reported workaround)"))
        else:
            out.append(_f(rule, False, subject, f"{have} across Sparks: the NVLS hang of NCCL {bad} at 8 ranks"))
    return out


def _nccl_text(lib: NcclLib, version: str) -> str:
    """`<path> (NCCL <v>, build id <first 8 hex>..., <MB> MB)`, what is known of it."""
    parts = [f"NCCL {version}" if version else "version not in its name"]
    parts.append(f"build id {lib.build_id[:8]}..." if lib.build_id else "no build id")
    if lib.size:
        parts.append(f"{lib.size // 1_000_000} MB")
    return f"{lib.path} ({', '.join(parts)})"


@evaluator("nccl_build")
def nccl_build(ctx: CheckContext, rule: Rule) -> list[Finding]:
    """Which NCCL the runtime loads, against the host's own (DGX OS's): a different build of the same version is a
    warning where a vLLM workload spans Sparks (rules.yaml nccl-two-builds); with runtime.nccl: system, the host
    must have the file VLLM_NCCL_SO_PATH names.

    Which one loads: torch preloads the nvidia-nccl wheel's library when the runtime has one (`_preload_cuda_deps`,
    torch/__init__.py), and vLLM's pynccl asks for "libnccl.so.2", which then resolves to that one; without a wheel
    both get what the dynamic loader finds (the system's). In an image, the image's (wheel, else its own system
    library)."""
    inv = ctx.inventory
    system_path = str(rule.args["system_path"])
    across = [w.name for w in inv.workloads if w.engine == "vllm" and workload_ranks(w) > 1 and len(inv.group(w)) > 1]
    wants_system = inv.runtime.nccl == "system"
    out = []
    for name, f in _hosts(ctx):
        libs = f.nccl_libs
        system, wheel = libs.get("system"), libs.get("runtime")
        # nothing read at all (no python3 on the host to read them) is nothing to judge
        if wants_system and libs and (system is None or system.path != system_path):
            have = f"the host's NCCL is {system.path}" if system else "no system NCCL found"
            evidence = f"runtime.nccl: system, but {system_path} is absent ({have})"
            out.append(_f(rule, False, name, evidence, level="fail"))
            continue
        loaded = wheel or (libs.get("image") if inv.runtime.image else system)
        if loaded is None or system is None:
            continue
        loaded_version = f.runtime.nccl if loaded is wheel else loaded.version
        shown = f"runtime loads {_nccl_text(loaded, loaded_version)}; system {_nccl_text(system, system.version)}"
        if wants_system:
            shown = (
                f"vLLM's collectives load {_nccl_text(system, system.version)} (VLLM_NCCL_SO_PATH); torch's "
                f"process group keeps {_nccl_text(loaded, loaded_version)}"
            )
            out.append(_f(rule, True, name, shown))
            continue
        same_file = loaded.real == system.real
        differs = (
            not same_file
            and bool(loaded_version)
            and loaded_version.split("+")[0] == system.version
            and loaded.build_id != system.build_id
        )
        if differs and across:
            evidence = f"{shown}: the same version, another build, for {', '.join(across)} across Sparks"
            out.append(_f(rule, False, name, evidence))
        else:
            out.append(_f(rule, True, name, shown))
    return out


@evaluator("gpu_temperature")
def gpu_temperature(ctx: CheckContext, rule: Rule) -> list[Finding]:
    return [
        _f(rule, g.temperature <= rule.args["max"], name, f"GPU at {g.temperature} C")
        for name, f in _hosts(ctx)
        for g in f.gpus
        if g.temperature is not None
    ]


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


def host_key_fingerprint(key: str) -> str:
    """`ssh-ed25519 <base64>` -> `SHA256:<unpadded base64 of the blob's sha256>`, as ssh-keygen -l prints it."""
    import base64
    import binascii
    import hashlib

    try:
        blob = base64.b64decode(key.split()[1], validate=True)
    except (IndexError, binascii.Error):
        return key[:40]
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


@evaluator("unique_identity")
def unique_identity(ctx: CheckContext, rule: Rule) -> list[Finding]:
    """Hosts sharing /etc/machine-id or an SSH host key (cloned from one image): one finding for the cluster."""
    hosts = _hosts(ctx)
    problems = []
    for what, attr in (("/etc/machine-id", "machine_id"), ("SSH host key", "ssh_host_key")):
        by_value: dict[str, list[str]] = {}
        for name, f in hosts:
            if getattr(f, attr):
                by_value.setdefault(str(getattr(f, attr)), []).append(name)
        for v, names in by_value.items():
            if len(names) > 1:
                shown = host_key_fingerprint(v) if attr == "ssh_host_key" else v
                problems.append(f"{', '.join(names)} share the {what} {shown}")
    if not any(f.machine_id or f.ssh_host_key for _, f in hosts):
        return []
    evidence = "; ".join(problems) or f"{len(hosts)} hosts, each with its own machine ID and SSH host key"
    return [_f(rule, not problems, "cluster", evidence)]


@evaluator("workload_health")
def workload_health(ctx: CheckContext, rule: Rule) -> list[Finding]:
    out: list[Finding] = []
    inv = ctx.inventory
    for w in inv.workloads:
        # its head, and each host running a rank of vLLM's multiprocessing executor (a headless `vllm serve`)
        hosts = dict.fromkeys([inv.workload_head(w).name, *(h.name for h in rank_hosts(inv, w))])
        for name in hosts:
            f = ctx.facts.get(name)
            if f is None or not {f"workload-{w.name}.pid", f"workload-{w.name}.spec"} & f.files.keys():
                continue  # not running there: nothing to judge
            exited = workload_exit(f.files, w.name)
            health = f"failed exited by itself: {exited}" if exited is not None else None
            health = health or f.files.get(f"workload-{w.name}.health", "").strip()
            out.append(
                _f(rule, not health.startswith("failed"), f"{name} workload {w.name}", health or "no health recorded")
            )
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


@evaluator("rdma_device")
def rdma_device(ctx: CheckContext, rule: Rule) -> list[Finding]:
    out = []
    for h, f in _probed(ctx):
        have = {g.device for g in f.gids}
        for t in h.fabric:
            if not t.rdma_device:
                continue
            ndevs = {g.ndev for g in f.gids if g.device == t.rdma_device and g.ndev}
            ok = t.rdma_device in have and (not ndevs or t.interface in ndevs)
            evidence = (
                f"{t.rdma_device} not found (host has {', '.join(sorted(have)) or 'no RDMA devices'})"
                if t.rdma_device not in have
                else f"{t.rdma_device} -> {', '.join(sorted(ndevs)) or '?'}"
            )
            out.append(_f(rule, ok, f"{h.name} {t.interface}", evidence))
    return out


@evaluator("gid_index")
def gid_index(ctx: CheckContext, rule: Rule) -> list[Finding]:
    out = []
    per_host: dict[str, int] = {}
    for h, f in _probed(ctx):
        for t in h.fabric:
            idx, predicted = detect_gid_index(f, t)
            if idx is None or predicted:
                out.append(
                    _f(
                        rule,
                        False,
                        f"{h.name} {t.rdma_device or t.interface}",
                        "no RoCE v2 GID holds the twin's IPv4 address (address not set, or no RDMA device)",
                    )
                )
                continue
            per_host.setdefault(h.name, idx)
            env_value = _env_value(f.env_file, "NCCL_IB_GID_INDEX")
            ok = env_value in (None, str(idx))
            out.append(
                _f(
                    rule,
                    ok,
                    f"{h.name} {t.rdma_device}",
                    f"RoCE v2 GID index {idx}" + ("" if ok else f"; env file says {env_value}"),
                )
            )
    if len(set(per_host.values())) > 1:
        text = ", ".join(f"{h}={i}" for h, i in per_host.items())
        out.append(
            _f(
                rule,
                False,
                "cluster",
                f"hosts disagree on the GID index ({text}): each host's env file must carry its own value",
                level="warn",
            )
        )
    return out


def _env_value(text: str | None, key: str) -> str | None:
    for line in (text or "").splitlines():
        if line.startswith(key + "="):
            return line.split("=", 1)[1]
    return None


@evaluator("page_cache")
def page_cache(ctx: CheckContext, rule: Rule) -> list[Finding]:
    out = []
    for name, f in _hosts(ctx):
        total, cached = f.meminfo_kb.get("MemTotal", 0), f.meminfo_kb.get("Cached", 0)
        if not total:
            continue
        frac = cached / total
        out.append(
            _f(
                rule,
                frac <= rule.args["max_fraction"],
                name,
                f"page cache {cached // 1024} MiB of {total // 1024} MiB ({frac:.0%}); "
                f"available {f.meminfo_kb.get('MemAvailable', 0) // 1024} MiB",
            )
        )
    return out


_SIZE = re.compile(r"(\d+(?:\.\d+)?)[bB](?![a-zA-Z])")


def estimate_weights_gb(model: str) -> float | None:
    """Rough weight size from a model name: parameters (e.g. '30B') times bytes per parameter by dtype hints."""
    sizes = [float(x) for x in _SIZE.findall(model.split("/")[-1])]
    if not sizes:
        return None
    params = max(sizes)
    lower = model.lower()
    if any(k in lower for k in ("awq", "gptq", "int4", "4bit", "nvfp4", "mxfp4", "fp4", "gpt-oss")):
        per = 0.55
    elif any(k in lower for k in ("fp8", "int8", "8bit")):
        per = 1.05
    else:
        per = 2.0
    return params * per


@evaluator("kho_cma")
def kho_cma(ctx: CheckContext, rule: Rule) -> list[Finding]:
    """CmaFree above CmaTotal in /proc/meminfo: the kexec-handover scratch of the 7.0 nvidia kernels, with which RDMA
    memory registration fails (rules.yaml kernel-kho-cma). Judged on the signature, not on the version string, so a
    kernel booted with kho=off passes."""
    out = []
    for name, f in _hosts(ctx):
        if not f.kernel:
            continue
        total, free = f.meminfo_kb.get("CmaTotal"), f.meminfo_kb.get("CmaFree")
        kho_off = "kho=off" in f.kernel_cmdline.split()
        if total is None or free is None:
            out.append(_f(rule, True, name, f"kernel {f.kernel}: no CMA in /proc/meminfo"))
            continue
        evidence = f"kernel {f.kernel}: CmaTotal {total} kB, CmaFree {free} kB"
        if free > total:
            evidence += " (CmaFree above CmaTotal: the KHO scratch area)"
        elif kho_off:
            evidence += " (booted with kho=off)"
        out.append(_f(rule, free <= total, name, evidence))
    return out


@evaluator("memory_fit")
def memory_fit(ctx: CheckContext, rule: Rule) -> list[Finding]:
    out = []
    for w in ctx.inventory.workloads:
        if w.engine != "vllm":
            continue
        need = estimate_weights_gb(w.model)
        if need is None:
            continue
        per_rank = need / w.tensor_parallel_size
        budget = rule.args["unified_gb"] * w.gpu_memory_utilization
        out.append(
            _f(
                rule,
                per_rank < budget * 0.9,
                f"workload {w.name}",
                f"~{need:.0f} GB of weights, ~{per_rank:.0f} GB per rank vs {budget:.0f} GB "
                f"({w.gpu_memory_utilization:g} of {rule.args['unified_gb']} GB)",
            )
        )
    return out


def _arg_value(w: Workload, flag: str) -> str | None:
    args = w.extra_args
    for i, a in enumerate(args):
        if a == flag:
            nxt = args[i + 1] if i + 1 < len(args) else ""
            return "" if nxt.startswith("--") else nxt
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


@evaluator("utilization_flag")
def utilization_flag(ctx: CheckContext, rule: Rule) -> list[Finding]:
    out = []
    for w in ctx.inventory.workloads:
        values = [w.gpu_memory_utilization]
        extra = _arg_value(w, "--gpu-memory-utilization")
        if extra:
            with contextlib.suppress(ValueError):
                values.append(float(extra))
        top = max(values)
        out.append(_f(rule, top <= rule.args["max"], f"workload {w.name}", f"gpu_memory_utilization {top:g}"))
    return out


@evaluator("workload_flag")
def workload_flag(ctx: CheckContext, rule: Rule) -> list[Finding]:
    out = []
    flag, want = rule.args["flag"], rule.args.get("value")
    for w in ctx.inventory.workloads:
        if w.engine != "vllm":
            continue
        value = _arg_value(w, flag)
        # args.exact: the value is the named choice itself (`--moe-backend cutlass`, not `flashinfer_cutlass`, a
        # different choice of the same flag); otherwise a substring (`--attention-backend FLASHINFER...`).
        if value is None or want is None:
            flag_hit = value is not None
        elif rule.args.get("exact"):
            flag_hit = value.lower() == want.lower()
        else:
            flag_hit = want.lower() in value.lower()
        value_hit = flag_hit
        if flag_hit and rule.args.get("contains"):
            flag_hit = rule.args["contains"] in " ".join([w.model, *w.extra_args]).lower()
        env_hits = [k for k, v in (rule.args.get("env") or {}).items() if w.env.get(k, "").upper() == v]
        hit = flag_hit or bool(env_hits)
        if flag_hit:
            evidence = f"{flag}{'=' + value if value else ''} in extra_args"
        elif env_hits:
            evidence = f"set through the environment ({', '.join(env_hits)})"
        elif value_hit:
            evidence = f"{flag} {value}, but no {rule.args['contains']} in the model or its flags"
        elif value:
            evidence = f"{flag} {value} (not {want})"
        else:
            evidence = f"no {flag}"
        out.append(_f(rule, not hit, f"workload {w.name}", evidence, fix=versioned_fix(rule, _vllm_version(ctx))))
    return out


def _vllm_version(ctx: CheckContext) -> str:
    head = ctx.facts.get(ctx.inventory.head.name)
    return head.runtime.vllm if head else ""


def versioned_fix(rule: Rule, vllm: str) -> str | None:
    """The fix for the head's vLLM version when the rule's fix depends on it (args.fix_by_vllm: entries with
    `before: <version>` are tried in order, the last one without `before` applies otherwise). Unknown version:
    every variant, each with its range."""
    variants = rule.args.get("fix_by_vllm")
    if not variants:
        return None
    if not vllm:
        return "; ".join(f"{'vLLM < ' + v['before'] if 'before' in v else 'newer vLLM'}: {v['fix']}" for v in variants)
    for v in variants:
        if "before" not in v or version_tuple(vllm) < version_tuple(str(v["before"])):
            return str(v["fix"])
    return None


@evaluator("load_format_package")
def load_format_package(ctx: CheckContext, rule: Rule) -> list[Finding]:
    """`--load-format <x>` names a loader whose optional package (`args.package`) must be in every host's runtime:
    vLLM imports it lazily (`vllm/model_executor/model_loader/weight_utils.py`: PlaceholderModule), so a missing
    package is an ImportError at weight loading, not at start."""
    out = []
    flag, want, field = rule.args["flag"], rule.args["value"], rule.args["package"]
    for w in ctx.inventory.workloads:
        if w.engine != "vllm":
            continue
        value = _arg_value(w, flag)
        if value is None or value.lower() != want:
            out.append(_f(rule, True, f"workload {w.name}", f"no {flag} {want}"))
            continue
        lacking = [n for n, f in _hosts(ctx) if not getattr(f.runtime, field)]
        have = sorted({getattr(f.runtime, field) for _, f in _hosts(ctx)} - {""})
        if lacking:
            evidence = f"{flag} {want}, but {field} is not installed in the runtime on {', '.join(lacking)}"
        else:
            evidence = f"{flag} {want} with {field} {', '.join(have) or '?'} in every runtime"
        out.append(_f(rule, not lacking, f"workload {w.name}", evidence))
    return out


@evaluator("mxfp4")
def mxfp4(ctx: CheckContext, rule: Rule) -> list[Finding]:
    """`--quantization mxfp4`: fine on vLLM >= `args.online_from` (online MXFP4 for an unquantized checkpoint, the
    checkpoint's own MXFP4 otherwise); on an older or unknown vLLM it needs an MXFP4 checkpoint, which only a model
    name naming gpt-oss (all of whose checkpoints are MXFP4) shows; any other name cannot be judged from here."""
    out = []
    vllm = _vllm_version(ctx)
    online = bool(vllm) and version_tuple(vllm) >= version_tuple(str(rule.args["online_from"]))
    for w in ctx.inventory.workloads:
        q = _arg_value(w, "--quantization")
        if q is None or q.lower() != "mxfp4":
            out.append(_f(rule, True, f"workload {w.name}", f"no --quantization mxfp4 ({q or 'none'})"))
            continue
        if online:
            evidence = f"--quantization mxfp4 on vLLM {vllm}: online MXFP4 unless {w.model} is already MXFP4"
            out.append(_f(rule, True, f"workload {w.name}", evidence))
        elif "gpt-oss" in w.model.lower():
            out.append(_f(rule, True, f"workload {w.name}", f"--quantization mxfp4 with {w.model} (MXFP4 weights)"))
        else:
            where = f"vLLM {vllm}" if vllm else "an unknown vLLM"
            evidence = (
                f"--quantization mxfp4 with {w.model} on {where} (no online MXFP4 before {rule.args['online_from']}): "
                "loads only if the checkpoint is MXFP4"
            )
            out.append(_f(rule, False, f"workload {w.name}", evidence))
    return out


def _needed_ports(inv: Inventory, host: str) -> dict[int, str]:
    ports = {p: "ray" for p in inv.ray.ports.model_dump().values()}
    ports.pop(inv.ray.ports.min_worker, None)
    ports.pop(inv.ray.ports.max_worker, None)
    if host == inv.head.name:
        ports[inv.ray.port] = "ray"
    for w in inv.workloads:  # the API listens on the workload's head (the first host of its group)
        if inv.workload_head(w).name == host:
            ports[w.port] = f"workload {w.name}"
    return ports


def _ours(owner: str, ray_running: bool, f: HostFacts) -> bool:
    """A busy port belongs to this cluster: Ray's while Ray runs, a workload's while sparkctl records it."""
    if owner == "ray":
        return ray_running
    return f"workload-{owner.removeprefix('workload ')}.pid" in f.files


@evaluator("ports_free")
def ports_free(ctx: CheckContext, rule: Rule) -> list[Finding]:
    out = []
    for name, f in _hosts(ctx):
        ray_running = any(m in p.args for p in f.processes for m in RAY_MARKERS[:2]) or "sparkctl-ray" in f.containers
        needed = _needed_ports(ctx.inventory, name)
        busy = sorted({ln.port for ln in f.listeners if ln.port in needed})

        foreign = [p for p in busy if not _ours(needed[p], ray_running, f)]
        if foreign:
            evidence = "held by something else: " + ", ".join(f"{p} ({needed[p]})" for p in foreign)
        else:
            evidence = f"ports in use by this cluster: {', '.join(map(str, busy))}" if busy else "needed ports free"
        out.append(_f(rule, not foreign, name, evidence))
    return out


@evaluator("ray_exposure")
def ray_exposure(ctx: CheckContext, rule: Rule) -> list[Finding]:
    out = []
    for h, f in _probed(ctx):
        ray_ports = set(_needed_ports(ctx.inventory, h.name)) - {w.port for w in ctx.inventory.workloads}
        fabric = {str(t.address.ip) for t in h.fabric}
        exposed = sorted(
            {
                f"{ln.address}:{ln.port}"
                for ln in f.listeners
                if ln.port in ray_ports and ln.address not in fabric | {"127.0.0.1", "::1"}
            }
        )
        if not any("raylet" in p.args for p in f.processes):
            continue
        guarded = "table inet sparkctl" in f.files.get("firewall.nft", "")
        if exposed and guarded:
            evidence = (
                f"Ray listens on {len(exposed)} wildcard socket(s); the sparkctl firewall admits them only "
                "on the fabric and loopback"
            )
        elif exposed:
            evidence = f"Ray listening beyond the fabric, no sparkctl firewall: {', '.join(exposed)}"
        else:
            evidence = "Ray listens on the fabric address and loopback only"
        out.append(_f(rule, not exposed or guarded, h.name, evidence))
    return out


def _image_source(ctx: CheckContext) -> str | None:
    """Container mode: the host whose image `up` copies to the others (plan/images.py), None if none has it."""
    host = image_source(ctx.inventory, {n: f.runtime.image_id for n, f in _hosts(ctx)})
    return host.name if host else None


@evaluator("runtime_versions")
def runtime_versions(ctx: CheckContext, rule: Rule) -> list[Finding]:
    hosts = _hosts(ctx)
    if ctx.inventory.runtime.image:  # `up` copies the source's image to every other host: only it is judged
        source = _image_source(ctx)
        ids = {n: f.runtime.image_id for n, f in hosts}
        others = [n for n, _ in hosts if source is not None and ids[n] != ids[source]]
        hosts = [(n, f) for n, f in hosts if n == source]
        if others and source is not None:
            lacking = ", ".join(f"{n} ({'image ' + ids[n][:19] if ids[n] else 'no image'})" for n in others)
            evidence = f"{source}: image {ids[source][:19]}; {lacking}: up copies {source}'s image there"
            return [_f(rule, False, "cluster", evidence, level="warn")]
    seen = {name: (f.runtime.python, f.runtime.ray, f.runtime.vllm, f.runtime.image_id) for name, f in hosts}
    if not seen:
        return []
    distinct = set(seen.values())
    text = "; ".join(
        f"{n}: python {v[0] or '?'} ray {v[1] or '?'}"
        + (f" vllm {v[2]}" if v[2] else "")
        + (f" image {v[3][:19]}" if v[3] else "")
        for n, v in seen.items()
    )
    missing = [n for n, v in seen.items() if not v[1] and not v[3]]
    if missing:
        return [_f(rule, False, "cluster", f"no runtime found on {', '.join(missing)} ({text})")]
    return [_f(rule, len(distinct) == 1, "cluster", text)]


def _ray_users(inv: Inventory) -> str:
    """Who needs Ray: the workloads that use it, named, else sparkctl's Ray cluster itself (`ray_wanted`)."""
    users = [w.name for w in inv.workloads if needs_ray(w)]
    return f"workload {', '.join(users)}" if users else "sparkctl's Ray cluster"


@evaluator("runtime_support")
def runtime_support(ctx: CheckContext, rule: Rule) -> list[Finding]:
    """Each host's runtime holds what sparkctl relies on: Ray >= the minimum (token auth), vLLM for vLLM workloads."""
    inv = ctx.inventory
    where = f"venv {inv.runtime.venv}" if inv.runtime.venv else f"image {inv.runtime.image}"
    minimum = str(rule.args["ray_minimum"])
    needs_vllm = any(w.engine == "vllm" for w in inv.workloads)
    out = []
    source = _image_source(ctx) if inv.runtime.image else None
    for name, f in _hosts(ctx):
        rt = f.runtime
        here = where
        problems, fixes = [], []
        image_missing = bool(inv.runtime.image) and not rt.image_id
        if image_missing and source is None:
            out.append(
                _f(
                    rule,
                    True,
                    name,
                    f"image {inv.runtime.image} is on no host yet: up pulls it on "
                    f"{inv.head.name}, then copies it (judged once it is there)",
                )
            )
            continue
        if inv.runtime.image and source is not None and rt.image_id != ctx.facts[source].runtime.image_id:
            # up copies the source's image here before anything runs: what counts is what that image holds
            rt = ctx.facts[source].runtime
            here = f"image {inv.runtime.image} (as {source} holds it: up copies it here)"
        if not rt.python:
            problems.append(f"no Python found in the {here}")
            fixes.append(f"create the runtime on {name} ({rule.args['install']})")
        elif not rt.ray and ray_wanted(inv) and inv.runtime.add_ray:
            here += f" (Ray {inv.runtime.add_ray} added by sparkctl: {inv.runtime.ray_image})"
            if version_tuple(inv.runtime.add_ray) < version_tuple(minimum):
                problems.append(f"runtime.add_ray {inv.runtime.add_ray} is older than {minimum} (no token auth)")
                fixes.append(f"set runtime.add_ray to a Ray version >= {minimum}")
        elif not rt.ray and ray_wanted(inv):
            problems.append(f"no Ray in the {here}, which {_ray_users(inv)} needs")
            fixes.append(
                f"install Ray >= {minimum} into the runtime on {name} ({rule.args['install']})"
                if inv.runtime.venv
                else f"set runtime.add_ray: <Ray version>, e.g. {minimum}.0 or newer (sparkctl builds an image FROM "
                f"{inv.runtime.image} with Ray added, on each host), or use an image that ships Ray >= {minimum} "
                f"on {name}"
            )
        elif rt.ray and version_tuple(rt.ray) < version_tuple(minimum):
            problems.append(f"Ray {rt.ray} in the {here} is older than {minimum} (no token authentication)")
            fixes.append(f"upgrade Ray on {name} to >= {minimum} ({rule.args['install']})")
        if needs_vllm and rt.python and not rt.vllm:
            problems.append(f"no vLLM in the {here}, but the inventory has a vllm workload")
            fixes.append(f"install vLLM into the runtime on {name}, or use an NGC vLLM image")
        found = f"Python {rt.python or '?'}, Ray {rt.ray or 'absent'}, vLLM {rt.vllm or 'absent'}"
        if not ray_wanted(inv):
            found += " (Ray not needed: no workload uses it)"
        evidence = "; ".join(problems) + f" (found: {found})" if problems else f"{here}: {found}"
        out.append(_f(rule, not problems, name, evidence, fix="; ".join(fixes) or None))
    return out


@evaluator("image_driver")
def image_driver(ctx: CheckContext, rule: Rule) -> list[Finding]:
    """Container mode: each host's driver supports the CUDA the image requires (its NVIDIA_REQUIRE_CUDA, else its
    CUDA_VERSION: facts.parse.image_cuda_requirement), the image judged being the one `up` runs there (the source's,
    copied). The NVIDIA Container Toolkit refuses such a container anyway ("unsatisfied condition: cuda>=..."), after
    sparkctl had changed the hosts; this says it before."""
    inv = ctx.inventory
    if not inv.runtime.image:
        return [_f(rule, True, name, f"venv {inv.runtime.venv}: no image") for name, _ in _hosts(ctx)]
    source = _image_source(ctx)
    if source is None:
        return [_f(rule, True, name, "not judged: the image is on no host yet") for name, _ in _hosts(ctx)]
    need = ctx.facts[source].runtime.image_cuda
    out = []
    for name, f in _hosts(ctx):
        driver = f.gpus[0].driver if f.gpus else "?"
        if not need or not f.cuda_version:
            what = "the image states no CUDA requirement" if not need else "the driver's CUDA version is unknown"
            out.append(_f(rule, True, name, f"not judged: {what}"))
            continue
        ok = version_tuple(f.cuda_version) >= version_tuple(need)
        evidence = f"image {inv.runtime.image} requires CUDA >= {need}; driver {driver} supports CUDA {f.cuda_version}"
        out.append(_f(rule, ok, name, evidence))
    return out


__all__ = ["EVALUATORS", "CheckContext"]
