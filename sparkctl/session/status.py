"""Where the cluster stands, from the session's facts and the workloads' HTTP probe (reads only)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sparkctl.inventory.topology import neighbours
from sparkctl.plan import layout as lc
from sparkctl.plan.fabric import twin_state
from sparkctl.plan.live_state import group_health, ray_running_ok, workload_state
from sparkctl.session.session import Session


def cluster_status(session: Session, secrets: Mapping[str, str]) -> dict[str, Any]:
    """Per host: fabric state and Ray; per workload: endpoint, process and health.

    A host the session could not reach (a partial session) is listed under `unreachable` with why, and left out of
    `hosts`; a workload whose process is judged from such a host has process 'unknown'.
    """
    inv = session.inventory
    ctx = session.context(secrets, {})
    hosts: dict[str, Any] = {}
    for h in inv.hosts:
        if h.name not in session.facts:
            continue
        f = session.facts[h.name]
        fabric = []
        for t in h.fabric:
            live = f.interfaces.get(t.interface)
            ok = twin_state(t, live, inv.network.mtu).ok
            fabric.append(
                {
                    "interface": t.interface,
                    "want": str(t.address),
                    "mtu": live.mtu if live else None,
                    "ipv4": live.ipv4 if live else [],
                    "ok": ok,
                }
            )
        hosts[h.name] = {
            "fabric": fabric,
            "neighbours": [n.name for n in neighbours(inv, h)],
            "ray": "running"
            if ray_running_ok(ctx, h)
            else "not running"
            if lc.ray_wanted(inv)
            else "not started (no workload needs it)",
            "env_file": f.env_file is not None,
        }
    workloads = {}
    for w in inv.workloads:
        probe = session.probe(lc.endpoint(inv, w), w.name, secrets.get(f"api_key:{w.name}"), w.engine, timeout=5)
        head = inv.workload_head(w).name
        read = {head, *(r.name for r in lc.rank_hosts(inv, w))} <= session.facts.keys()
        workloads[w.name] = {
            "engine": w.engine,
            "endpoint": lc.endpoint(inv, w) + "/v1",
            "hosts": [h.name for h in inv.group(w)] if w.hosts is not None else None,
            "head": head,
            "process": workload_state(ctx, w) if read else "unknown",
            "health": probe.phase,
            "detail": probe.detail,
            "recorded": group_health(ctx, w),
        }
    unreachable = {
        h.name: {
            "error": "; ".join(p.message for p in session.unreachable[h.name]),
            "hint": "; ".join(dict.fromkeys(p.hint for p in session.unreachable[h.name] if p.hint)),
        }
        for h in inv.hosts
        if h.name in session.unreachable
    }
    return {
        "cluster": inv.cluster,
        "topology": inv.network.topology,
        "hosts": hosts,
        "workloads": workloads,
        "unreachable": unreachable,
    }
