"""What runs on the hosts, as the facts show it: whether Ray runs as specified and has formed, and each workload's
state and the health it recorded."""

from __future__ import annotations

from collections.abc import Mapping

from sparkctl import paths
from sparkctl.facts.models import HostFacts
from sparkctl.inventory.models import Host, Workload
from sparkctl.plan.context import PlanContext
from sparkctl.plan.layout import fabric_ip, own_container, rank_hosts, ray_wanted, workload_container
from sparkctl.plan.runtime import RAY_CONTAINER, ray_image
from sparkctl.plan.workload_commands import workload_spec

RAY_MARKERS = ("raylet", "gcs_server", "ray::", "ray/dashboard", "ray/_private", "default_worker.py")
"""What the command line of a Ray process contains; the first two are a node's own (its raylet, the head's GCS)."""


def raylet_ips(facts: HostFacts) -> set[str]:
    """The addresses the host's raylets were started on (`--node_ip_address`)."""
    ips = set()
    for p in facts.processes:
        if "raylet" in p.args.split(" ", 1)[0]:
            for arg in p.args.split():
                if arg.startswith("--node_ip_address="):
                    ips.add(arg.split("=", 1)[1])
    return ips


def ray_present(facts: HostFacts) -> str:
    """What of Ray runs on a host, for a diff ('container sparkctl-ray', 'N processes'), or '' when nothing does:
    the login user's Ray processes, or the Ray container (its processes belong to root, not to the login user)."""
    if RAY_CONTAINER in facts.containers:
        return f"container {RAY_CONTAINER}"
    procs = [p for p in facts.processes if p.user == facts.user and any(m in p.args for m in RAY_MARKERS)]
    return f"{len(procs)} processes" if procs else ""


def ray_running_ok(ctx: PlanContext, host: Host) -> bool:
    """Ray runs on this host, on its fabric address, with the cluster's token."""
    facts = ctx.facts[host.name]
    token_ok = facts.files.get("ray-token.sha256") == ctx.digests.get("ray_token")
    if ctx.inventory.runtime.image:  # in its container, from the inventory's image
        return token_ok and facts.containers.get(RAY_CONTAINER) == ray_image(ctx.inventory)
    return token_ok and raylet_ips(facts) == {fabric_ip(host)}


def ray_formed(ctx: PlanContext) -> bool:
    """The facts already show the cluster formed, and nothing earlier in this run changes anything: every host runs
    Ray as specified (fabric address, the cluster's token) and every host's raylet holds its connection to the head's
    GCS from one of its fabric addresses. A raylet whose GCS drops it exits, so the connection is the node's
    membership."""
    if ctx.changed:
        return False
    return all(ray_running_ok(ctx, h) and _gcs_connected(ctx, h) for h in ctx.inventory.hosts)


def _gcs_connected(ctx: PlanContext, host: Host) -> bool:
    """The host's raylet holds its connection to the head's GCS from one of its own fabric addresses (the kernel
    picks the source by route: on a ring, the interface on the head's cable, which is not always fabric[0])."""
    inv = ctx.inventory
    mine = {str(t.address.ip) for t in host.fabric}
    want = (fabric_ip(inv.head), inv.ray.port)
    return any(link.local in mine and (link.peer, link.peer_port) == want for link in ctx.facts[host.name].gcs_links)


def ray_node_state(ctx: PlanContext, host: Host) -> str:
    """One host's Ray node as the facts show it: 'alive' (running as specified and connected to the head's GCS),
    'not connected' (running, but no GCS connection), 'not as specified' (another address or token), or
    'not running'; when no workload needs Ray, 'not needed', or 'left running' (up stops it)."""
    facts = ctx.facts[host.name]
    if not ray_wanted(ctx.inventory):
        return "left running" if ray_present(facts) else "not needed"
    if ray_running_ok(ctx, host):
        return "alive" if _gcs_connected(ctx, host) else "not connected"
    running = any(m in p.args for p in facts.processes for m in RAY_MARKERS[:2]) or RAY_CONTAINER in facts.containers
    return "not as specified" if running else "not running"


def workload_health(ctx: PlanContext, w: Workload, host: Host | None = None) -> str:
    """What the workload recorded about itself on `host` (default its head; '' if nothing): e.g. 'failed <why>'.

    A workload whose process exited by itself (venv mode: its pid is recorded, the process gone) is
    'failed exited by itself: <why>', the why from its log (see facts.probe.EXITED_WORKLOADS)."""
    files = ctx.facts[(host or ctx.inventory.workload_head(w)).name].files
    exited = workload_exit(files, w.name)
    if exited is not None:
        return f"failed exited by itself: {exited}"
    return files.get(f"workload-{w.name}.health", "").strip()


def group_health(ctx: PlanContext, w: Workload) -> str:
    """What the workload recorded about itself: its head's record, else (vLLM's multiprocessing executor across
    Sparks) the first rank host's that recorded something, named: e.g. 'spark-b: failed exited by itself: ...'."""
    head = ctx.inventory.workload_head(w)
    said = workload_health(ctx, w, head) if head.name in ctx.facts else ""
    if said:
        return said
    for h in rank_hosts(ctx.inventory, w):
        if h.name != head.name and h.name in ctx.facts and (rank := workload_health(ctx, w, h)):
            return f"{h.name}: {rank}"
    return ""


def workload_exit(files: Mapping[str, str], name: str) -> str | None:
    """Why the workload's recorded process exited without sparkctl stopping it; None while it runs (or no record)."""
    if f"workload-{name}.exit" not in files:
        return None
    return files[f"workload-{name}.exit"].strip() or "its log shows no error"


def _ray_container_replaced(ctx: PlanContext, host: Host) -> bool:
    """Container mode: an earlier stage of this run replaces this host's Ray container (`docker rm -f` ends every
    process in it, its workloads included, and forgets their pid records: ray_commands.build_ray_stop)."""
    facts = ctx.facts[host.name]
    if not ctx.inventory.runtime.image or "ray_node" not in ctx.changed or RAY_CONTAINER not in facts.containers:
        return False
    head = ctx.inventory.head
    depends = bool(ctx.changed & {"ray_token", "worker_env", "fabric_active"})  # as plan_ray_node decides
    return depends or not ray_running_ok(ctx, host) or not ray_running_ok(ctx, head)


def workload_state(ctx: PlanContext, w: Workload, host: Host | None = None) -> str:
    """'ok', 'stopped', 'broken' (running, but it reports a failed backend) or 'changed' for a workload on `host`;
    without one, on every host running it ('unknown' when one of those was not read).

    A workload of vLLM's multiprocessing executor runs on several hosts: it is 'ok' only when all are, and is
    otherwise restarted everywhere (its ranks meet only at start).
    """
    if "workload_stopped" in ctx.changed:  # an earlier step of this run stops the selected workloads
        return "stopped"
    own = own_container(ctx.inventory, w)
    if host is not None and not own and _ray_container_replaced(ctx, host):
        return "stopped"
    if host is None:
        ranks = rank_hosts(ctx.inventory, w)
        if any(h.name not in ctx.facts for h in ranks):  # a rank's host was not read (unreachable)
            return "unknown"
        states = [workload_state(ctx, w, h) for h in ranks] if ranks else []
        if not states:
            return workload_state(ctx, w, ctx.inventory.workload_head(w))
        if set(states) == {"ok"}:
            return "ok"
        # a rank that died (on any host) makes the group broken; else the head's state, or 'changed'
        return "broken" if "broken" in states else (states[0] if states[0] != "ok" else "changed")
    facts = ctx.facts[host.name]
    pid = facts.files.get(f"workload-{w.name}.pid", "").strip()
    if own:  # a container of its own on each of its hosts
        alive = workload_container(w.name) in facts.containers
    elif ctx.inventory.runtime.image:  # a process in the head's Ray container (`docker exec`)
        alive = RAY_CONTAINER in facts.containers and w.name in facts.container_workloads
    else:
        # the recorded pid, running a workload (after a reboot the number may belong to another process)
        alive = pid.isdigit() and any(
            p.pid == int(pid) and any(m in p.args for m in paths.WORKLOAD_MARKERS) for p in facts.processes
        )
    if not alive:
        # venv mode: recorded but gone, and sparkctl never stopped it (e.g. vLLM's API server ends once a Ray
        # worker of its engine died): broken, restarted like a group that lost a rank
        return "broken" if workload_exit(facts.files, w.name) is not None else "stopped"
    if workload_health(ctx, w, host).startswith("failed"):  # e.g. a tensor-parallel rank died: restart the group
        return "broken"
    spec = facts.files.get(f"workload-{w.name}.spec", "")
    return "ok" if spec == workload_spec(ctx.inventory, w, ctx.home(host), host) else "changed"
