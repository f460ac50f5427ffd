"""The cluster's planners and readings under one name, for the callers that use several of them: the Ray stages
(`ray_stages`), the workload stages (`workload_stages`) and what the facts show running (`live_state`). New code
imports from those modules."""

from __future__ import annotations

from sparkctl.plan.live_state import (
    RAY_MARKERS,
    group_health,
    ray_formed,
    ray_node_state,
    ray_running_ok,
    raylet_ips,
    workload_exit,
    workload_health,
    workload_state,
)
from sparkctl.plan.ray_stages import (
    RAY_NOT_WANTED,
    plan_ray_firewall,
    plan_ray_node,
    plan_ray_ready,
    plan_ray_stop,
    plan_ray_token,
    plan_verify_clean,
    plan_verify_fabric,
)
from sparkctl.plan.workload_stages import (
    plan_drop_caches,
    plan_verify_placement,
    plan_workload_ready,
    plan_workload_stop,
    plan_workloads,
    workloads_to_start,
)

__all__ = [
    "RAY_MARKERS",
    "RAY_NOT_WANTED",
    "group_health",
    "plan_drop_caches",
    "plan_ray_firewall",
    "plan_ray_node",
    "plan_ray_ready",
    "plan_ray_stop",
    "plan_ray_token",
    "plan_verify_clean",
    "plan_verify_fabric",
    "plan_verify_placement",
    "plan_workload_ready",
    "plan_workload_stop",
    "plan_workloads",
    "ray_formed",
    "ray_node_state",
    "ray_running_ok",
    "raylet_ips",
    "workload_exit",
    "workload_health",
    "workload_state",
    "workloads_to_start",
]
