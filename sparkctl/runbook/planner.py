"""Plan a runbook: each step's action over its hosts, in order, into a Plan (pure)."""

from __future__ import annotations

import difflib
import hashlib
import re
import shlex
from collections.abc import Collection
from importlib import resources
from typing import Any

from pydantic import ValidationError

from sparkctl.errors import Problem
from sparkctl.inventory.load import render_loc
from sparkctl.inventory.models import Host, Inventory
from sparkctl.plan import weights
from sparkctl.plan.context import PlanContext, fresh_facts
from sparkctl.plan.models import Plan, Stage
from sparkctl.runbook.actions import ACTIONS
from sparkctl.runbook.models import Runbook, RunbookError, RunbookStep, parse_when

PARAM = re.compile(r"\$\{([^}]*)\}")
"""A `${name}` reference in a runbook string."""
Found = list[tuple[tuple[str | int, ...], str, str]]


def worker_code() -> str:
    """The embedding worker shipped to the head host."""
    return resources.files("sparkctl").joinpath("workers/embed.py").read_text()


def weights_code() -> str:
    """The weights helper shipped to the hosts that fetch or verify model weights."""
    return resources.files("sparkctl").joinpath("workers/weights.py").read_text()


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def substitute(value: Any, params: dict[str, Any], strict: bool = True, quoted: Collection[str] = ()) -> Any:
    """`${name}` -> the parameter's value (a whole-value reference keeps its type). Unknown names are errors
    (found at load time; `strict=False` leaves them as they are for that check). Inside a longer string, the
    values of the `quoted` parameters are inserted shell-quoted."""

    def get(name: str, whole: str) -> Any:
        if name in params:
            return params[name]
        if strict:
            raise RunbookError([Problem(whole, f"unknown parameter '{whole}'", "declare it under parameters:")])
        return whole

    def text(m: re.Match[str]) -> str:
        value = str(get(m.group(1), m.group(0)))
        return shlex.quote(value) if m.group(1) in quoted and m.group(1) in params else value

    if isinstance(value, str):
        whole = PARAM.fullmatch(value)
        if whole:
            return get(whole.group(1), value)
        return PARAM.sub(text, value)
    if isinstance(value, list):
        return [substitute(v, params, strict, quoted) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, params, strict, quoted) for k, v in value.items()}
    return value


def step_args(step: RunbookStep, params: dict[str, Any], raw: Collection[str] = (), strict: bool = True) -> Any:
    """A step's `args` with the parameters substituted.

    A `shell: true` step's argv strings are often shell code (`sh -c "..."`): a value inside a longer one is
    shell-quoted, so the shell reads it as one word and never runs it, unless its parameter is marked `raw`. A
    whole-string reference is one argument of its own, passed as it is; `env:` values go on stdin, unquoted.
    """
    args = substitute(step.args, params, strict)
    if step.shell and isinstance(step.args.get("argv"), list):
        args["argv"] = substitute(step.args["argv"], params, strict, quoted=set(params) - set(raw))
    return args


def when_holds(expr: str | None, params: dict[str, Any]) -> bool:
    """Evaluate a step's `when:` against the parameters (`a==b` and `a == b` read the same)."""
    if not expr:
        return True
    parsed = parse_when(expr)
    if parsed is None:
        raise RunbookError([Problem(f"when: {expr}", "cannot read it", "use 'p', 'not p', 'p == v' or 'p != v'")])
    negated, name, op, value = parsed
    if op is not None:
        equal = str(params.get(name)) == value
        return equal if op == "==" else not equal
    held = bool(params.get(name))
    return not held if negated else held


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


def plan_stage(step: RunbookStep, ctx: PlanContext, params: dict[str, Any], raw: Collection[str] = ()) -> Stage:
    """One runbook step -> one Stage of per-host Steps (`raw`: the runbook's `raw: true` parameters)."""
    action = ACTIONS[step.action]
    args = action.Args.model_validate(step_args(step, params, raw))
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
    inv, found = _workload_overrides(ctx.inventory, names, changes)
    if found:
        raise RunbookError([Problem(f"step {step} {render_loc(('args', *loc))}", m, h) for loc, m, h in found])
    return inv


def _workload_overrides(
    inv: Inventory, names: list[str] | None, changes: dict[str, Any] | None
) -> tuple[Inventory, Found]:
    """(the inventory with `set:` applied, problems located relative to the step's args)."""
    from sparkctl.inventory.checks import check_inventory
    from sparkctl.inventory.models import Workload

    known = [w.name for w in inv.workloads]
    unknown = [n for n in names or [] if n not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"the inventory has: {', '.join(known) or 'none'}"
        return inv, [(("workloads",), f"no workload named {', '.join(unknown)}", hint)]
    changes = {k: v for k, v in (changes or {}).items() if v is not None}  # null keeps the inventory's value
    if not changes:
        return inv, []
    try:
        workloads = [
            Workload.model_validate({**w.model_dump(), **changes}) if not names or w.name in names else w
            for w in inv.workloads
        ]
    except ValidationError as exc:
        return inv, _override_errors(exc)
    new = inv.model_copy(update={"workloads": workloads})
    return new, [(("set", *loc[2:]), msg, hint) for loc, msg, hint in check_inventory(new) if loc[:1] == ("workloads",)]


def check_overrides(changes: dict[str, Any] | None) -> Found:
    """The `set:` fields no workload could take, whatever the inventory: unknown fields, values out of range
    (what `runbook validate` can tell without an inventory; the inventory's own checks come at plan time)."""
    from sparkctl.inventory.models import Workload

    # null keeps the inventory's value; a field holding a parameter without a value yet is checked at plan time
    changes = {k: v for k, v in (changes or {}).items() if _known(v)}
    if not changes:
        return []
    try:
        # the fields `set:` does not name are a valid workload's: every problem is one of `set:`
        Workload.model_validate({"name": "w", "engine": "vllm", **changes})
    except ValidationError as exc:
        return _override_errors(exc)
    return []


def _known(value: Any) -> bool:
    """No null anywhere in `value`."""
    if isinstance(value, dict):
        return all(_known(v) for v in value.values())
    if isinstance(value, list):
        return all(_known(v) for v in value)
    return value is not None


def _override_errors(exc: ValidationError) -> Found:
    """A workload's validation errors, located under the step's `set:`, each with the field's fix."""
    from sparkctl.inventory.models import Workload

    found: Found = []
    for e in exc.errors():
        loc = tuple(e["loc"])
        field = Workload.model_fields.get(str(loc[0])) if loc else None
        ctx = dict(e.get("ctx") or {})
        msg = str(ctx["message"]) if e["type"] == "sparkctl" else e["msg"]
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[0]), list(Workload.model_fields), n=1)
            hint = f"did you mean '{close[0]}'?" if close else "set: takes the fields of an inventory workload"
            msg = f"unknown workload field '{loc[0]}'"
        else:
            hint = str(ctx.get("hint") or (field.description if field else "") or "")
        found.append((("set", *loc), msg, hint or "see docs/inventory.md for the workload's fields"))
    return found


def once(found: Found) -> Found:
    """One value used by several steps (a `--set`, a parameter's default) is one problem: the first is kept."""
    seen: set[tuple[str, str]] = set()
    unique: Found = []
    for loc, msg, hint in found:
        if (msg, hint) not in seen:
            seen.add((msg, hint))
            unique.append((loc, msg, hint))
    return unique


def check_against(rb: Runbook, inv: Inventory, params: dict[str, Any]) -> None:
    """What only the inventory can tell (host selectors, workload names, `set:` overrides), for every step
    and cleanup step, at plan time: RunbookError at the step's file:line."""
    found: Found = []
    names = [h.name for h in inv.hosts]
    for group in ("steps", "cleanup"):
        for i, step in enumerate(getattr(rb, group)):
            if step.hosts not in ("all", "head", "workers", *names):
                close = difflib.get_close_matches(step.hosts, ["all", "head", "workers", *names], n=1)
                found.append(
                    (
                        (group, i, "hosts"),
                        f"'{step.hosts}' is not a host of {inv.cluster} nor all, head or workers",
                        f"did you mean '{close[0]}'?"
                        if close
                        else f"use all, head, workers or one of {', '.join(names)}",
                    )
                )
            action = ACTIONS.get(step.action)
            if action is None or "workloads" not in action.Args.model_fields:
                continue
            try:
                args = action.Args.model_validate(step_args(step, params, rb.raw_params()))
            except (ValidationError, RunbookError):
                continue  # reported by check_params
            _, bad = _workload_overrides(inv, getattr(args, "workloads", None), getattr(args, "set", None))
            found += [((group, i, "args", *loc), msg, hint) for loc, msg, hint in bad]
    if found:
        raise RunbookError([Problem(rb.where(loc), msg, hint) for loc, msg, hint in once(found)])


def _commits(action: str, other: str) -> bool:
    """`action` makes `other`'s change final (so `--only other` runs it too)."""
    found = ACTIONS.get(action)
    return bool(other) and found is not None and found.commits == other


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
    check_against(rb, ctx.inventory, params)
    stages = []
    notes = []
    only_action = next((s.action for s in rb.steps if s.name == only), "") if only else ""
    for i, step in enumerate(rb.steps):
        if i < start or (only and step.name != only and not _commits(step.action, only_action)):
            continue
        if not when_holds(step.when, params):
            notes.append(f"step '{step.name}' skipped: when: {step.when}")
            continue
        stage = plan_stage(step, ctx, params, rb.raw_params())
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


def offline_plan(
    inv: Inventory, rb: Runbook, params: dict[str, Any], *, start: int = 0, only: str | None = None
) -> Plan:
    """A plan against fresh hosts, contacting nobody and reading no secrets (digests are placeholders)."""
    facts = {h.name: fresh_facts(inv, h) for h in inv.hosts}
    ctx = PlanContext(
        inv,
        facts,
        params,
        {
            "ray_token": "(generated on first up)",
            "worker_code": sha256(worker_code()),
            weights.CODE_BLOB: sha256(weights_code()),
        },
        offline=True,
    )
    return build_runbook_plan(rb, ctx, params, start=start, only=only, offline=True)
