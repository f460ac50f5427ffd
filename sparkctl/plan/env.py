"""Worker environment planner: the per-host env file (with the detected RoCE GID index) and vLLM's Ray list.

Every variable written here is read by the tool it names (sources in docs/compatibility.md):
NCCL_* by NCCL (docs "Environment Variables"), GLOO_SOCKET_IFNAME / TP_SOCKET_IFNAME by torch.distributed's
gloo and tensorpipe backends, UCX_NET_DEVICES by UCX, OMPI_MCA_btl_tcp_if_include by Open MPI, VLLM_HOST_IP by
vLLM (`vllm/envs.py`; `get_ip()` returns it, and the V1 Ray executor's `initialize_ray_cluster` pins the first
placement bundle to `node:<that address>`; the V2 executor, vLLM 0.32's default, pins none),
RAY_memory_monitor_refresh_ms by Ray (`ray_config_def.h`, RAY_<name> overrides).
"""

from __future__ import annotations

import json
import re

from sparkctl import paths
from sparkctl.facts.models import HostFacts
from sparkctl.inventory.models import FabricInterface, Host, Inventory
from sparkctl.plan.context import PlanContext
from sparkctl.plan.models import Command, Step

DEFAULT_GID_INDEX = 3
PER_HOST_VARS = [
    "NCCL_IB_GID_INDEX",
    "NCCL_IB_HCA",
    "NCCL_SOCKET_IFNAME",
    "GLOO_SOCKET_IFNAME",
    "TP_SOCKET_IFNAME",
    "UCX_NET_DEVICES",
    "OMPI_MCA_btl_tcp_if_include",
    "VLLM_HOST_IP",
]
"""Per-host values vLLM must not copy from the head to the Ray workers (its `ray_non_carry_over_env_vars.json`,
read by `vllm/ray/ray_env.py` from $VLLM_CONFIG_ROOT, default $XDG_CONFIG_HOME/vllm = ~/.config/vllm)."""

NCCL_PER_HCA_GID = (2, 21)
"""From NCCL 2.21 on, NCCL_IB_GID_INDEX defaults to -1: NCCL picks the GID per HCA by itself (`ncclIbGetGidIndex`
in src/transport/net_ib: the entry of NCCL_IB_ADDR_FAMILY, default AF_INET, and NCCL_IB_ROCE_VERSION_NUM, default
2). A set NCCL_IB_GID_INDEX is one value for every HCA."""
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.,:/-]*$")


def detect_gid_index(facts: HostFacts, twin: FabricInterface) -> tuple[int | None, bool]:
    """(index of the RoCE v2 GID holding the twin's IPv4, predicted?) for the twin's RDMA device.

    When the twin has no address yet, the kernel will add the IPv4-mapped v1 and v2 entries in the first two
    free slots of the table: that is the prediction. A table read while the kernel is adding them (its v1 entry
    there, the v2 entry not yet) predicts the same slot: the twin's own entries do not count as taken.
    None when the device has no readable table.
    """
    if twin.rdma_device is None:
        return None, False
    table = [g for g in facts.gids if g.device == twin.rdma_device and g.port == 1]
    if not table:
        return None, False
    ip = str(twin.address.ip)
    for g in table:
        if g.type.strip().lower() == "roce v2" and g.ipv4 == ip:
            return g.index, False
    used = {g.index for g in table if g.ipv4 != ip}
    free = [i for i in range(256) if i not in used]
    return (free[1], True) if len(free) >= 2 else (None, False)


def version_tuple(v: str) -> tuple[int, ...]:
    """The first three numbers of a version string, to compare: "2.28.9+cuda13.0" -> (2, 28, 9)."""
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def gid_index(facts: HostFacts, host: Host) -> tuple[int | None, list[str], bool]:
    """The NCCL_IB_GID_INDEX for a host (None: leave it unset), notes explaining it, and whether it is predicted.

    NCCL_IB_GID_INDEX is one value for all of a host's HCAs. When the twins' RoCE v2 IPv4 entries sit at the same
    index, that index is written. When they differ, no single value is right for both HCAs: the variable is left
    unset so that NCCL (>= 2.21, whose default -1 selects the RoCE v2 IPv4 GID per HCA) picks each HCA's own entry.
    Only when the runtime is known to hold an older NCCL is the first twin's index written, with a note.
    """
    notes: list[str] = []
    found: dict[str, tuple[int, bool]] = {}
    for twin in host.fabric:
        idx, pred = detect_gid_index(facts, twin)
        if idx is not None:
            found[twin.rdma_device or twin.interface] = (idx, pred)
    if not found:
        # Nothing read is nothing to write: NCCL >= 2.21 picks the RoCE v2 IPv4 GID per HCA by itself (its default
        # -1, NCCL_PER_HCA_GID), as NVIDIA's Spark playbooks rely on (they never set the variable). Only a runtime
        # known to hold an older NCCL, whose default is index 0, gets the usual value, said as a guess.
        nccl = facts.runtime.nccl
        if nccl and version_tuple(nccl) < NCCL_PER_HCA_GID:
            notes.append(
                f"RoCE GID table not readable on {host.name} and NCCL {nccl} cannot pick per HCA: "
                f"NCCL_IB_GID_INDEX={DEFAULT_GID_INDEX}, a guess (the usual index of the RoCE v2 IPv4 entry)"
            )
            return DEFAULT_GID_INDEX, notes, False
        notes.append(
            f"RoCE GID table not readable on {host.name}: NCCL_IB_GID_INDEX left unset, "
            "so NCCL (>= 2.21) selects the RoCE v2 IPv4 GID of each HCA itself"
        )
        return None, notes, False
    predicted = any(p for _, p in found.values())
    values = sorted({i for i, _ in found.values()})
    if len(values) > 1:
        shown = ", ".join(f"{dev}={i}" for dev, (i, _) in found.items())
        nccl = facts.runtime.nccl
        if nccl and version_tuple(nccl) < NCCL_PER_HCA_GID:
            first = next(iter(found.values()))[0]
            notes.append(
                f"RDMA devices disagree on the RoCE v2 GID index ({shown}) and NCCL {nccl} cannot pick per HCA: "
                f"NCCL_IB_GID_INDEX={first} (the first twin's); NCCL >= 2.21 would pick each HCA's own"
            )
            return first, notes, predicted
        notes.append(
            f"RDMA devices disagree on the RoCE v2 GID index ({shown}): NCCL_IB_GID_INDEX left unset, "
            "so NCCL (>= 2.21) selects the RoCE v2 IPv4 GID of each HCA itself"
        )
        return None, notes, predicted
    if predicted:
        notes.append(
            f"GID index {values[0]} predicted from the free slots of the GID table; checked after the fabric step"
        )
    return values[0], notes, predicted


def render_env(inv: Inventory, host: Host, gid: int | None) -> str:
    """The env file for a host: KEY=value lines readable by sh and `docker --env-file` alike."""
    primary = host.fabric[0]
    ip = str(primary.address.ip)
    hcas = ",".join(t.rdma_device for t in host.fabric if t.rdma_device)
    values: dict[str, str] = {} if gid is None else {"NCCL_IB_GID_INDEX": str(gid)}
    if hcas:
        values["NCCL_IB_HCA"] = hcas
    for key in (
        "NCCL_SOCKET_IFNAME",
        "GLOO_SOCKET_IFNAME",
        "TP_SOCKET_IFNAME",
        "UCX_NET_DEVICES",
        "OMPI_MCA_btl_tcp_if_include",
    ):
        values[key] = primary.interface
    if inv.network.topology == "ring":
        # A ring port reaches one neighbour only: NCCL must not merge the ports of a host into one virtual NIC and
        # must pick, per peer, the HCA on that peer's subnet. NVIDIA's cluster script passes these three for its
        # three-Spark ring (dgx-spark-playbooks, nvidia/multi-sparks-through-switch/assets/spark_cluster_setup/
        # spark_cluster_setup.py, run_nccl_test: NCCL_IB_SUBNET_AWARE_ROUTING=1 always, NCCL_IB_MERGE_NICS=0 and
        # NCCL_NET_PLUGIN=none for the ring). NCCL reads only the variables it knows (src/misc/param.cc): stock
        # NCCL from v2.30.7-1 on (src/transport/net_ib/connect.cc, NCCL_PARAM(IbSubnetAwareRouting, ...); doctor's
        # nccl-version rule warns in a ring below that), NCCL_IB_MERGE_NICS in src/transport/net_ib/init.cc, "none"
        # as no external plugin in src/plugin/net.cc.
        values |= {"NCCL_IB_SUBNET_AWARE_ROUTING": "1", "NCCL_IB_MERGE_NICS": "0", "NCCL_NET_PLUGIN": "none"}
        # Subnet-aware routing compares the IPv4 addresses of the local and remote GIDs under one prefix length,
        # NCCL_IB_SUBNET_PREFIX_LEN (default 24, 1..32; v2.30.7-1 src/transport/net_ib/connect.cc,
        # ncclIbFindDevBySubnet): the ring's own length is written, so a ring on /25 or /16 links routes right too.
        # inventory/checks.py refuses a ring whose addresses mix lengths.
        values["NCCL_IB_SUBNET_PREFIX_LEN"] = str(primary.address.network.prefixlen)
    values |= {
        "VLLM_HOST_IP": ip,
        "RAY_memory_monitor_refresh_ms": "0",
        "NCCL_IGNORE_CPU_AFFINITY": "1",
    }
    for key, value in values.items():
        if not _SAFE_VALUE.match(value):  # validated upstream; this keeps the file safe to source
            raise ValueError(f"unsafe value for {key}: {value!r}")
    head = f"# Managed by sparkctl for {host.name} (cluster {inv.cluster}); `sparkctl up` rewrites it.\n"
    return head + "".join(f"{k}={v}\n" for k, v in values.items())


def render_non_carry_over() -> str:
    """vLLM's list of variables Ray must not copy from the head to the workers."""
    return json.dumps(PER_HOST_VARS, indent=2) + "\n"


def _file_diff(path: str, before: str | None, after: str) -> list[str]:
    old = (before or "").splitlines()
    new = after.splitlines()
    diff = [f"--- {path}" + (" (absent)" if before is None else ""), f"+++ {path}"]
    diff += [f"- {line}" for line in old if line not in new]
    diff += [f"+ {line}" for line in new if line not in old]
    return diff


def plan_worker_env(ctx: PlanContext, host: Host) -> list[Step]:
    """Write the env file and the non-carry-over list where they differ from what the host has."""
    inv, facts = ctx.inventory, ctx.facts[host.name]
    gid, notes, predicted = gid_index(facts, host)
    env = render_env(inv, host, gid)
    steps = []
    if facts.env_file != env:
        steps.append(
            Step(
                host=host.name,
                kind="worker_env",
                target=paths.ENV_FILE,
                description=f"write {paths.ENV_FILE} (NCCL_IB_GID_INDEX={'per HCA' if gid is None else gid}, "
                f"fabric {host.fabric[0].interface})",
                commands=[
                    Command(argv=["install", "-D", "-m", "0644", "/dev/stdin", paths.ENV_FILE], sudo=True, stdin=env)
                ],
                diff=_file_diff(paths.ENV_FILE, facts.env_file, env),
                notes=notes,
                depends_on_earlier=predicted,
            )
        )
    nco = render_non_carry_over()
    if facts.non_carry_over != nco:
        target = f"{facts.home or '~'}/{paths.NON_CARRY_OVER}"
        steps.append(
            Step(
                host=host.name,
                kind="worker_env_ray_list",
                target=target,
                description="tell vLLM which variables Ray must not copy from the head",
                commands=[Command(argv=["install", "-D", "-m", "0644", "/dev/stdin", target], stdin=nco)],
                diff=_file_diff(target, facts.non_carry_over, nco),
            )
        )
    return steps
