"""Rules on what NCCL uses: its version and build, known hangs, the RDMA devices and RoCE v2 GID index."""

from __future__ import annotations

from sparkctl.doctor.evaluators.core import CheckContext, _f, _hosts, _probed, evaluator
from sparkctl.doctor.rules import Finding, Rule
from sparkctl.facts.models import NcclLib
from sparkctl.plan.env import detect_gid_index, version_tuple
from sparkctl.plan.layout import workload_ranks


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
