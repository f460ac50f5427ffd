"""Worker environment planner: the per-host env file (with the detected RoCE GID index) and vLLM's Ray list."""

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
    "RAY_NODE_IP_ADDRESS",
]
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.,:/-]*$")


def detect_gid_index(facts: HostFacts, twin: FabricInterface) -> tuple[int | None, bool]:
    """(index of the RoCE v2 GID holding the twin's IPv4, predicted?) for the twin's RDMA device.

    When the twin has no address yet, the kernel will add the IPv4-mapped v1 and v2 entries in the first two
    free slots of the table: that is the prediction. None when the device has no readable table.
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
    used = {g.index for g in table}
    free = [i for i in range(256) if i not in used]
    return (free[1], True) if len(free) >= 2 else (None, False)


def gid_index(facts: HostFacts, host: Host) -> tuple[int, list[str], bool]:
    """The NCCL_IB_GID_INDEX for a host, notes explaining it, and whether it is predicted."""
    notes: list[str] = []
    found: dict[str, tuple[int, bool]] = {}
    for twin in host.fabric:
        idx, pred = detect_gid_index(facts, twin)
        if idx is not None:
            found[twin.rdma_device or twin.interface] = (idx, pred)
    if not found:
        notes.append(
            f"RoCE GID table not readable on {host.name}: NCCL_IB_GID_INDEX={DEFAULT_GID_INDEX} (the usual value)"
        )
        return DEFAULT_GID_INDEX, notes, False
    values = sorted({i for i, _ in found.values()})
    if len(values) > 1:
        shown = {dev: i for dev, (i, _) in found.items()}
        notes.append(f"RDMA devices disagree on the RoCE v2 GID index ({shown}); using the first twin's")
    first, predicted = next(iter(found.values()))
    if predicted:
        notes.append(f"GID index {first} predicted from the free slots of the GID table; checked after the fabric step")
    return first, notes, predicted


def render_env(inv: Inventory, host: Host, gid: int) -> str:
    """The env file for a host: KEY=value lines readable by sh and `docker --env-file` alike."""
    primary = host.fabric[0]
    ip = str(primary.address.ip)
    hcas = ",".join(t.rdma_device for t in host.fabric if t.rdma_device)
    values: dict[str, str] = {"NCCL_IB_GID_INDEX": str(gid)}
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
    values |= {
        "VLLM_HOST_IP": ip,
        "RAY_NODE_IP_ADDRESS": ip,
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
                description=f"write {paths.ENV_FILE} (NCCL_IB_GID_INDEX={gid}, fabric {host.fabric[0].interface})",
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
