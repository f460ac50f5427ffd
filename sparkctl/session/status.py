"""Where the cluster stands, from the session's facts and the workloads' HTTP probe (reads only)."""

from __future__ import annotations

from collections.abc import Mapping

from sparkctl.errors import Problem
from sparkctl.facts.models import HostFacts
from sparkctl.inventory.models import Host, Inventory, Workload
from sparkctl.inventory.topology import neighbours
from sparkctl.plan import layout as lc
from sparkctl.plan.context import PlanContext
from sparkctl.plan.fabric import twin_state
from sparkctl.plan.live_state import group_health, ray_present, ray_running_ok, workload_state
from sparkctl.session import door
from sparkctl.session.session import Session
from sparkctl.session.views import (
    ClusterStatus,
    FabricTwin,
    HostStatus,
    RayStatus,
    UnreachableHost,
    WorkloadStatus,
)


def read_status(inv: Inventory, accept_new_host_keys: bool) -> tuple[ClusterStatus, list[Problem]]:
    """`status`: what every host that answers shows, and why each other host could not be read. One host down does
    not hide the others."""
    session = door.open_session(inv, accept_new_host_keys, partial=True)
    try:
        return cluster_status(session, session.secrets_for_plan()), session.unreachable_problems()
    finally:
        session.close()


def cluster_status(session: Session, secrets: Mapping[str, str]) -> ClusterStatus:
    """Per host: fabric state and Ray; per workload: endpoint, process and health.

    A host the session could not reach (a partial session) is listed under `unreachable` with why, and left out of
    `hosts`; a workload whose process is judged from such a host has process 'unknown'.
    """
    inv = session.inventory
    ctx = session.context(secrets, {})
    return ClusterStatus(
        cluster=inv.cluster,
        topology=inv.network.topology,
        hosts={h.name: host_status(ctx, h, session.facts[h.name]) for h in inv.hosts if h.name in session.facts},
        workloads={w.name: workload_status(session, ctx, w, secrets) for w in inv.workloads},
        unreachable={
            h.name: UnreachableHost(
                error="; ".join(p.message for p in session.unreachable[h.name]),
                hint="; ".join(dict.fromkeys(p.hint for p in session.unreachable[h.name] if p.hint)),
            )
            for h in inv.hosts
            if h.name in session.unreachable
        },
    )


def host_status(ctx: PlanContext, h: Host, f: HostFacts) -> HostStatus:
    """One reachable host: its twins as the facts show them, its neighbours, Ray, the env file (pure)."""
    inv = ctx.inventory
    fabric = []
    for t in h.fabric:
        live = f.interfaces.get(t.interface)
        fabric.append(
            FabricTwin(
                interface=t.interface,
                want=str(t.address),
                mtu=live.mtu if live else None,
                ipv4=live.ipv4 if live else [],
                ok=twin_state(t, live, inv.network.mtu).ok,
            )
        )
    return HostStatus(
        fabric=fabric,
        neighbours=[n.name for n in neighbours(inv, h)],
        ray=_ray(ctx, h),
        env_file=f.env_file is not None,
    )


def _ray(ctx: PlanContext, h: Host) -> RayStatus:
    if not lc.ray_wanted(ctx.inventory):
        if ray_present(ctx.facts[h.name]):
            return "left running (no workload needs it: up stops it)"
        return "not started (no workload needs it)"
    return "running" if ray_running_ok(ctx, h) else "not running"


def workload_status(session: Session, ctx: PlanContext, w: Workload, secrets: Mapping[str, str]) -> WorkloadStatus:
    """One workload: its endpoint, its process (when every host running it was read) and the HTTP probe's phase."""
    inv = session.inventory
    probe = session.probe(lc.endpoint(inv, w), w.name, secrets.get(f"api_key:{w.name}"), w.engine, timeout=5)
    head = inv.workload_head(w).name
    read = {head, *(r.name for r in lc.rank_hosts(inv, w))} <= session.facts.keys()
    return WorkloadStatus(
        engine=w.engine,
        endpoint=lc.endpoint(inv, w) + "/v1",
        hosts=[h.name for h in inv.group(w)] if w.hosts is not None else None,
        head=head,
        process=workload_state(ctx, w) if read else "unknown",
        health=probe.phase,
        detail=probe.detail,
        recorded=group_health(ctx, w),
    )
