"""Plan a runbook: each step's action over its hosts, in order, into a Plan (pure)."""

from __future__ import annotations

import re
from typing import Any

from sparkctl.errors import Problem
from sparkctl.inventory.models import Host, Inventory
from sparkctl.plan.context import PlanContext
from sparkctl.plan.models import Plan, Stage
from sparkctl.runbook.actions import ACTIONS
from sparkctl.runbook.models import Runbook, RunbookError, RunbookStep


def substitute(value: Any, params: dict[str, Any]) -> Any:
    if isinstance(value, str):
        whole = re.fullmatch(r"\$\{(\w+)\}", value)
        if whole:
            return params.get(whole.group(1))
        return re.sub(r"\$\{(\w+)\}", lambda m: str(params.get(m.group(1), "")), value)
    if isinstance(value, list):
        return [substitute(v, params) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, params) for k, v in value.items()}
    return value


def when_holds(expr: str | None, params: dict[str, Any]) -> bool:
    """Evaluate a step's `when:` against the parameters."""
    if not expr:
        return True
    expr = expr.strip()
    m = re.match(r"^(\w+)\s*(==|!=)\s*(\S+)$", expr)
    if m:
        equal = str(params.get(m.group(1))) == m.group(3)
        return equal if m.group(2) == "==" else not equal
    if expr.startswith("not "):
        return not params.get(expr[4:].strip())
    return bool(params.get(expr))


def select_hosts(ctx: PlanContext, selector: str) -> list[Host]:
    """The hosts a step runs on (of those with facts: a teardown goes on without the hosts it cannot reach)."""
    inv = ctx.inventory
    if selector == "all":
        chosen = list(inv.hosts)
    elif selector == "head":
        chosen = [inv.head]
    elif selector == "workers":
        chosen = [h for h in inv.hosts if h.name != inv.head.name]
    else:
        chosen = []
    if chosen or selector in ("all", "head", "workers"):
        return [h for h in chosen if h.name in ctx.facts]
    try:
        return [h for h in [inv.host(selector)] if h.name in ctx.facts]
    except KeyError:
        raise RunbookError(
            [
                Problem(
                    f"hosts: {selector}",
                    "no such host",
                    f"use all, head, workers or one of {[h.name for h in inv.hosts]}",
                )
            ]
        ) from None


def plan_stage(step: RunbookStep, ctx: PlanContext, params: dict[str, Any]) -> Stage:
    """One runbook step -> one Stage of per-host Steps."""
    action = ACTIONS[step.action]
    args = action.Args.model_validate(substitute(step.args, params))
    step_ctx = ctx
    if hasattr(args, "workloads"):
        inv = _override_workloads(ctx, step.name, args.workloads, getattr(args, "set", None))
        step_ctx = PlanContext(
            inv, ctx.facts, {**ctx.params, "workloads": args.workloads}, ctx.digests, ctx.changed, ctx.offline
        )
    steps = [s for h in select_hosts(ctx, step.hosts) for s in action.plan(step_ctx, h, args)]
    return Stage(
        name=step.name,
        action=step.action,
        steps=steps,
        on_failure=step.on_failure if isinstance(step.on_failure, str) else ",".join(step.on_failure),
    )


def _override_workloads(
    ctx: PlanContext, step: str, names: list[str] | None, changes: dict[str, Any] | None
) -> Inventory:
    """The inventory with `set:` applied to the selected workloads, validated like the inventory itself."""
    inv = ctx.inventory
    unknown = sorted(set(names or []) - {w.name for w in inv.workloads})
    if unknown:
        raise RunbookError(
            [
                Problem(
                    f"step {step} args.workloads",
                    f"no workload named {', '.join(unknown)}",
                    f"the inventory has: {', '.join(w.name for w in inv.workloads) or 'none'}",
                )
            ]
        )
    changes = {k: v for k, v in (changes or {}).items() if v is not None}  # null keeps the inventory's value
    if not changes:
        return inv
    from pydantic import ValidationError

    from sparkctl.inventory.checks import check_inventory
    from sparkctl.inventory.models import Workload

    try:
        workloads = [
            Workload.model_validate({**w.model_dump(), **changes}) if not names or w.name in names else w
            for w in inv.workloads
        ]
        new = inv.model_copy(update={"workloads": workloads})
    except ValidationError as exc:
        raise RunbookError(
            [
                Problem(f"step {step} args.set.{'.'.join(map(str, e['loc']))}", e["msg"].removeprefix("Value error, "))
                for e in exc.errors()
            ]
        ) from None
    found = check_inventory(new)
    if found:
        raise RunbookError([Problem(f"step {step} args.set", msg, hint) for _, msg, hint in found])
    return new


def build_runbook_plan(
    rb: Runbook,
    ctx: PlanContext,
    params: dict[str, Any],
    *,
    start: int = 0,
    only: str | None = None,
    offline: bool = False,
) -> Plan:
    """Plan every step of a runbook in order; later steps see which kinds earlier ones change."""
    stages = []
    notes = []
    for i, step in enumerate(rb.steps):
        if i < start or (only and step.name != only):
            continue
        if not when_holds(step.when, params):
            notes.append(f"step '{step.name}' skipped: when: {step.when}")
            continue
        stage = plan_stage(step, ctx, params)
        stages.append(stage)
        ctx = ctx.after({s.kind for s in stage.steps if s.changes})
    for stage in stages:
        for s in stage.steps:
            if s.kind == "worker_env":  # how each host's GID index was found deserves a line of its own
                notes += [f"{s.host}: {n}" for n in s.notes if f"{s.host}: {n}" not in notes]
    return Plan(
        cluster=ctx.inventory.cluster,
        runbook=rb.name,
        hosts=[h.name for h in ctx.inventory.hosts if h.name in ctx.facts],
        stages=stages,
        notes=notes,
        offline=offline,
    )
