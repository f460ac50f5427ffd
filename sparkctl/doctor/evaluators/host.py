"""Rules on one host at a time: reachability, room to write, GPU, driver, CUDA, kernel, memory, identity."""

from __future__ import annotations

from sparkctl.doctor.evaluators.core import CheckContext, _f, _hosts, evaluator
from sparkctl.doctor.rules import Finding, Rule
from sparkctl.plan.env import version_tuple


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


@evaluator("gpu_temperature")
def gpu_temperature(ctx: CheckContext, rule: Rule) -> list[Finding]:
    return [
        _f(rule, g.temperature <= rule.args["max"], name, f"GPU at {g.temperature} C")
        for name, f in _hosts(ctx)
        for g in f.gpus
        if g.temperature is not None
    ]


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
