"""Load runbooks (built-in or files), validate them, and plan them into a Plan."""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from sparkctl.errors import InputError, Problem
from sparkctl.inventory.load import Source, read_text, render_loc, validate_source
from sparkctl.inventory.models import Host, Inventory
from sparkctl.inventory.reader import ReadError, read_yaml
from sparkctl.plan.context import PlanContext
from sparkctl.plan.models import Plan, Stage
from sparkctl.runbook.actions import ACTIONS
from sparkctl.runbook.models import Runbook, RunbookStep, parse_when

_PARAM = re.compile(r"\$\{([^}]*)\}")
Found = list[tuple[tuple[str | int, ...], str, str]]


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
            found += _unknown_params(rb, step.args, (group, i, "args"))
            try:
                action.Args.model_validate(
                    _substitute(step.args, {k: p.default for k, p in rb.parameters.items()}, strict=False)
                )
            except ValidationError as exc:
                found += _args_problems(action.Args, exc, (group, i, "args"))
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
            when = parse_when(step.when) if step.when else None
            if when is not None and when[1] not in rb.parameters:
                found.append(((group, i, "when"), f"'{when[1]}' is not a parameter of this runbook", _params_hint(rb)))
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        found.append((("steps",), f"duplicate step names: {', '.join(sorted(dupes))}", "name every step once"))
    return found


def _params_hint(rb: Runbook, name: str = "") -> str:
    close = difflib.get_close_matches(name, list(rb.parameters), n=1) if name else []
    if close:
        return f"did you mean '{close[0]}'?"
    known = ", ".join(rb.parameters) or "(none)"
    return f"declare it under parameters: (this runbook has {known})"


def _unknown_params(rb: Runbook, value: Any, loc: tuple[str | int, ...]) -> Found:
    """Every `${name}` in `value` that names no parameter (it would otherwise become an empty string)."""
    if isinstance(value, str):
        return [
            (loc, f"unknown parameter '${{{m.group(1)}}}'", _params_hint(rb, m.group(1)))
            for m in _PARAM.finditer(value)
            if m.group(1) not in rb.parameters
        ]
    if isinstance(value, list):
        return [f for n, v in enumerate(value) for f in _unknown_params(rb, v, (*loc, n))]
    if isinstance(value, dict):
        return [f for k, v in value.items() for f in _unknown_params(rb, v, (*loc, str(k)))]
    return []


def _args_problems(args: type[Any], exc: ValidationError, loc: tuple[str | int, ...], used: str = "") -> Found:
    """An action's argument errors, each with the field's description as its fix."""
    found: Found = []
    for err in exc.errors():
        sub = tuple(err["loc"])
        field = getattr(args, "model_fields", {}).get(sub[0]) if sub else None
        hint = (field.description if field is not None and field.description else "") or (
            "see `sparkctl runbook actions` for this action's arguments"
        )
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] not in ("missing", "extra_forbidden") and not isinstance(err.get("input"), dict | list):
            msg += f" (found {err.get('input')!r})" if not used else f" ({used})"
        found.append(((*loc, *sub), msg, hint))
    return found


def parse_runbook(text: str, name: str) -> Runbook:
    """Validate runbook YAML; RunbookError lists every problem with file:line."""
    source = Source(text, name, RunbookError)
    rb = validate_source(source, Runbook, _check, RunbookError)
    rb._where = source.where
    return rb


def load_runbook(ref: str) -> Runbook:
    """A built-in runbook by name, or a runbook file by path."""
    if ref in builtin_names() and not Path(ref).exists():
        return parse_runbook(builtin_text(ref), f"<builtin {ref}>")
    return parse_runbook(read_text(ref, RunbookError), ref)


def _substitute(value: Any, params: dict[str, Any], strict: bool = True) -> Any:
    """`${name}` -> the parameter's value (a whole-value reference keeps its type). Unknown names are errors
    (found at load time; `strict=False` leaves them as they are for that check)."""

    def get(name: str, whole: str) -> Any:
        if name in params:
            return params[name]
        if strict:
            raise RunbookError([Problem(whole, f"unknown parameter '{whole}'", "declare it under parameters:")])
        return whole

    if isinstance(value, str):
        whole = _PARAM.fullmatch(value)
        if whole:
            return get(whole.group(1), value)
        return _PARAM.sub(lambda m: str(get(m.group(1), m.group(0))), value)
    if isinstance(value, list):
        return [_substitute(v, params, strict) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, params, strict) for k, v in value.items()}
    return value


_KINDS: list[tuple[type | tuple[type, ...], str, str]] = [
    (bool, "true or false", "true"),
    (int, "a whole number", "3"),
    (float, "a number", "0.5"),
    (str, "text", "text"),
    (list, "a list", "[a, b]"),
    (dict, "a mapping", "{a: 1}"),
]


def _kind(value: Any) -> tuple[str, str] | None:
    for kind, text, example in _KINDS:
        if isinstance(value, kind):
            return text, example
    return None


def _typed(name: str, raw: str, value: Any, default: Any, secret: bool) -> Any:
    """`--set name=raw` read as YAML, then held to the type of the parameter's default (if it has one)."""
    if default is None or value is None:
        return value
    if isinstance(default, str) and isinstance(value, bool | int | float):
        return raw.strip()  # a text parameter: `--set tag=3` means the text "3"
    fits = (
        isinstance(value, bool) == isinstance(default, bool)
        and (isinstance(value, type(default)) or (isinstance(default, float) and isinstance(value, int)))
    )
    if fits:
        return value
    want, example = _kind(default) or ("the default's type", "")
    found = "" if secret else f", found {raw!r}"
    raise RunbookError(
        [
            Problem(
                f"--set {name}",
                f"expected {want} like the default {default!r}{found}",
                f"e.g. --set {name}={example}",
            )
        ]
    )


def resolve_params(rb: Runbook, overrides: dict[str, str]) -> dict[str, Any]:
    """Defaults overridden by `--set k=v` (values read as YAML, held to the default's type), then every step's
    arguments checked with these values: a bad value is reported here, at the step that uses it."""
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
    problems: list[Problem] = []
    for k, v in overrides.items():
        secret = rb.parameters[k].secret
        try:
            value = read_yaml(v).data if v else v
            params[k] = _typed(k, v, value, rb.parameters[k].default, secret)
        except ReadError as exc:
            shown = "" if secret else f" {v!r}"
            hint = f"the value is read as YAML: quote text in it, e.g. --set {k}='\"...\"'"
            if "alias" in exc.message or "tag" in exc.message:
                hint = exc.hint
            problems.append(Problem(f"--set {k}", f"cannot read the value{shown}: {exc.message}", hint))
        except RunbookError as exc:
            problems += exc.problems
    if problems:
        raise RunbookError(problems)
    missing = [k for k, p in rb.parameters.items() if p.required and params.get(k) in (None, "")]
    if missing:
        raise RunbookError(
            [
                Problem(
                    rb.where(("parameters", k)),
                    f"parameter '{k}' needs a value",
                    f"--set {k}=... ({rb.parameters[k].description or 'see the runbook'})",
                )
                for k in missing
            ]
        )
    check_params(rb, params, set(overrides))
    return params


def check_params(rb: Runbook, params: dict[str, Any], overridden: Collection[str] = ()) -> None:
    """Every step's arguments validated with these parameter values: RunbookError at the step's file:line."""
    found: Found = []
    for group in ("steps", "cleanup"):
        for i, step in enumerate(getattr(rb, group)):
            action = ACTIONS.get(step.action)
            if action is None:
                continue
            try:
                action.Args.model_validate(_substitute(step.args, params))
            except ValidationError as exc:
                used = sorted(m.group(1) for m in _PARAM.finditer(str(step.args)) if m.group(1) in overridden)
                note = ", ".join(f"from --set {u}" for u in used)
                found += _args_problems(action.Args, exc, (group, i, "args"), note)
    if found:
        raise RunbookError([Problem(rb.where(loc), msg, hint) for loc, msg, hint in found])


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
    """The hosts a step runs on."""
    inv = ctx.inventory
    if selector == "all":
        return list(inv.hosts)
    if selector == "head":
        return [inv.head]
    if selector == "workers":
        return [h for h in inv.hosts if h.name != inv.head.name]
    try:
        return [inv.host(selector)]
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
        return inv, found
    new = inv.model_copy(update={"workloads": workloads})
    return new, [(("set", *loc[2:]), msg, hint) for loc, msg, hint in check_inventory(new) if loc[:1] == ("workloads",)]


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
                args = action.Args.model_validate(_substitute(step.args, params))
            except (ValidationError, RunbookError):
                continue  # reported by check_params
            _, bad = _workload_overrides(inv, getattr(args, "workloads", None), getattr(args, "set", None))
            found += [((group, i, "args", *loc), msg, hint) for loc, msg, hint in bad]
    if found:
        raise RunbookError([Problem(rb.where(loc), msg, hint) for loc, msg, hint in found])


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
        hosts=[h.name for h in ctx.inventory.hosts],
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
