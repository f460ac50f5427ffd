"""Load runbooks (built-in or files), validate them, and plan them into a Plan."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from sparkctl.errors import InputError, Problem
from sparkctl.inventory.load import load_model, read_text
from sparkctl.inventory.models import Host, Inventory
from sparkctl.plan.context import PlanContext
from sparkctl.plan.models import Plan, Stage
from sparkctl.runbook.actions import ACTIONS
from sparkctl.runbook.models import Runbook, RunbookStep


class RunbookError(InputError):
    """A runbook file is invalid."""


def builtin_names() -> list[str]:
    """Names of the runbooks shipped in the package."""
    folder = resources.files("sparkctl").joinpath("runbook/builtin")
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def builtin_text(name: str) -> str:
    """YAML of a built-in runbook."""
    if name not in builtin_names():
        raise RunbookError([Problem(name, "no such built-in runbook", f"one of: {', '.join(builtin_names())}")])
    return resources.files("sparkctl").joinpath(f"runbook/builtin/{name}.yaml").read_text()


def _check(rb: Runbook) -> list[tuple[tuple[str | int, ...], str, str]]:
    found: list[tuple[tuple[str | int, ...], str, str]] = []
    names = [s.name for s in rb.steps] + [s.name for s in rb.cleanup]
    for group in ("steps", "cleanup"):
        for i, step in enumerate(getattr(rb, group)):
            action = ACTIONS.get(step.action)
            if action is None:
                import difflib

                close = difflib.get_close_matches(step.action, list(ACTIONS), n=1)
                found.append(
                    (
                        (group, i, "action"),
                        f"unknown action '{step.action}'",
                        f"did you mean '{close[0]}'?" if close else f"one of: {', '.join(sorted(ACTIONS))}",
                    )
                )
                continue
            if action.needs_shell_opt_in and not step.shell:
                found.append(
                    (
                        (group, i, "shell"),
                        f"action '{step.action}' runs arbitrary commands",
                        "opt in with `shell: true` on this step",
                    )
                )
            try:
                action.Args.model_validate(_substitute(step.args, {k: p.default for k, p in rb.parameters.items()}))
            except ValidationError as exc:
                for err in exc.errors():
                    found.append(((group, i, "args", *err["loc"]), err["msg"], ""))
            if isinstance(step.on_failure, list):
                cleanup = {s.name for s in rb.cleanup}
                for ref in step.on_failure:
                    if ref not in cleanup:
                        found.append(
                            (
                                (group, i, "on_failure"),
                                f"'{ref}' is not a cleanup step",
                                "name a step listed under cleanup:",
                            )
                        )
            elif step.on_failure not in ("stop", "continue"):
                found.append(((group, i, "on_failure"), f"'{step.on_failure}' is not stop, continue or a list", ""))
            if step.when:
                param = re.sub(r"^not\s+", "", step.when.strip()).split()[0]
                if param not in rb.parameters:
                    found.append(((group, i, "when"), f"'{param}' is not a parameter of this runbook", ""))
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        found.append((("steps",), f"duplicate step names: {', '.join(sorted(dupes))}", "name every step once"))
    return found


def parse_runbook(text: str, name: str) -> Runbook:
    """Validate runbook YAML; RunbookError lists every problem with file:line."""
    return load_model(text, name, Runbook, _check, error=RunbookError)


def load_runbook(ref: str) -> Runbook:
    """A built-in runbook by name, or a runbook file by path."""
    if ref in builtin_names() and not Path(ref).exists():
        return parse_runbook(builtin_text(ref), f"<builtin {ref}>")
    return parse_runbook(read_text(ref, RunbookError), ref)


def _substitute(value: Any, params: dict[str, Any]) -> Any:
    if isinstance(value, str):
        whole = re.fullmatch(r"\$\{(\w+)\}", value)
        if whole:
            return params.get(whole.group(1))
        return re.sub(r"\$\{(\w+)\}", lambda m: str(params.get(m.group(1), "")), value)
    if isinstance(value, list):
        return [_substitute(v, params) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, params) for k, v in value.items()}
    return value


def resolve_params(rb: Runbook, overrides: dict[str, str]) -> dict[str, Any]:
    """Defaults overridden by `--set k=v` (values parsed as YAML scalars/lists)."""
    import yaml

    unknown = sorted(set(overrides) - set(rb.parameters))
    if unknown:
        raise RunbookError(
            [
                Problem(
                    f"--set {k}",
                    f"'{rb.name}' has no parameter '{k}'",
                    f"parameters: {', '.join(rb.parameters) or '(none)'}",
                )
                for k in unknown
            ]
        )
    params = {k: p.default for k, p in rb.parameters.items()}
    for k, v in overrides.items():
        params[k] = yaml.safe_load(v) if v else v
    missing = [k for k, p in rb.parameters.items() if p.required and params.get(k) in (None, "")]
    if missing:
        raise RunbookError(
            [
                Problem(
                    f"{rb.name}",
                    f"parameter '{k}' needs a value",
                    f"--set {k}=... ({rb.parameters[k].description or 'see the runbook'})",
                )
                for k in missing
            ]
        )
    return params


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
    args = action.Args.model_validate(_substitute(step.args, params))
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


def step_index(rb: Runbook, name: str, option: str = "--from") -> int:
    """Position of a step by name (for --from / --only)."""
    for i, s in enumerate(rb.steps):
        if s.name == name:
            return i
    raise RunbookError([Problem(f"{option} {name}", "no such step", f"steps: {', '.join(s.name for s in rb.steps)}")])
