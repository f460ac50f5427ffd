"""Load runbooks (built-in or files), validate them, resolve their parameters."""

from __future__ import annotations

import difflib
from collections.abc import Collection
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from sparkctl.errors import Problem
from sparkctl.inventory.load import Source, read_text, validate_source
from sparkctl.inventory.reader import ReadError, read_yaml
from sparkctl.runbook.actions import ACTIONS
from sparkctl.runbook.models import Runbook, RunbookError, RunbookStep, parse_when
from sparkctl.runbook.planner import PARAM, Found, check_overrides, once, step_args


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
    found: Found = []
    overrides: Found = []
    names = [s.name for s in rb.steps] + [s.name for s in rb.cleanup]
    for group in ("steps", "cleanup"):
        for i, step in enumerate(getattr(rb, group)):
            on_step, on_set = _check_step(rb, (group, i), step)
            found += on_step
            overrides += on_set
    found += _check_commits(rb)
    found += _check_on_interrupt(rb)
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        found.append((("steps",), f"duplicate step names: {', '.join(sorted(dupes))}", "name every step once"))
    return found + once(overrides)


def _check_step(rb: Runbook, at: tuple[str, int], step: RunbookStep) -> tuple[Found, Found]:
    """One step's problems: (its action, shell opt-in, arguments, on_failure and when; what its `set:` overrides
    with the defaults would break, gathered apart so that a default used by several steps is one problem)."""
    found: Found = []
    overrides: Found = []
    action = ACTIONS.get(step.action)
    if action is None:
        close = difflib.get_close_matches(step.action, list(ACTIONS), n=1)
        found.append(
            (
                (*at, "action"),
                f"unknown action '{step.action}'",
                f"did you mean '{close[0]}'?" if close else f"one of: {', '.join(sorted(ACTIONS))}",
            )
        )
        return found, overrides
    if action.needs_shell_opt_in and not step.shell:
        found.append(
            (
                (*at, "shell"),
                f"action '{step.action}' runs arbitrary commands",
                "opt in with `shell: true` on this step",
            )
        )
    found += _unknown_params(rb, step.args, (*at, "args"))
    try:
        defaults = {k: p.default for k, p in rb.parameters.items()}
        args = action.Args.model_validate(step_args(step, defaults, rb.raw_params(), strict=False))
    except ValidationError as exc:
        found += _args_problems(action.Args, exc, (*at, "args"))
    else:
        # `set:` with the defaults, as a run without --set would use them
        bad = check_overrides(getattr(args, "set", None))
        overrides += [((*at, "args", *loc), msg, hint) for loc, msg, hint in bad]
    found += _check_on_failure(rb, at, step)
    when = parse_when(step.when) if step.when else None
    if when is not None and when[1] not in rb.parameters:
        found.append(((*at, "when"), f"'{when[1]}' is not a parameter of this runbook", _params_hint(rb)))
    return found, overrides


def _check_on_failure(rb: Runbook, at: tuple[str, int], step: RunbookStep) -> Found:
    """`on_failure:` is stop, continue, or a list of cleanup steps."""
    if isinstance(step.on_failure, list):
        cleanup = {s.name for s in rb.cleanup}
        return [
            ((*at, "on_failure"), f"'{ref}' is not a cleanup step", "name a step listed under cleanup:")
            for ref in step.on_failure
            if ref not in cleanup
        ]
    if step.on_failure not in ("stop", "continue"):
        return [
            (
                (*at, "on_failure"),
                f"'{step.on_failure}' is not stop, continue or a list",
                "use stop, continue, or a list of cleanup step names",
            )
        ]
    return []


def _check_commits(rb: Runbook) -> Found:
    """A step whose changes the hosts roll back unless committed has a later step that commits them."""
    found: Found = []
    for i, step in enumerate(rb.steps):
        needs = [a for a in ACTIONS.values() if a.commits and a.commits == step.action]
        later = {s.action for s in rb.steps[i + 1 :]}
        for commit in needs:
            if commit.name not in later:
                found.append(
                    (
                        ("steps", i, "action"),
                        f"'{step.action}' changes are rolled back by the hosts unless a later step commits them",
                        f"add a later step with `action: {commit.name}` (after the check that proves the change, "
                        "e.g. verify_fabric)",
                    )
                )
    return found


def _check_on_interrupt(rb: Runbook) -> Found:
    """`on_interrupt:` names cleanup steps or built-in runbooks."""
    return [
        (
            ("on_interrupt", i),
            f"'{ref}' is neither a cleanup step nor a built-in runbook",
            f"name a step listed under cleanup:, or one of: {', '.join(builtin_names())}",
        )
        for i, ref in enumerate(rb.on_interrupt)
        if ref not in {s.name for s in rb.cleanup} and ref not in builtin_names()
    ]


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
            for m in PARAM.finditer(value)
            if m.group(1) not in rb.parameters
        ]
    if isinstance(value, list):
        return [f for n, v in enumerate(value) for f in _unknown_params(rb, v, (*loc, n))]
    if isinstance(value, dict):
        return [f for k, v in value.items() for f in _unknown_params(rb, v, (*loc, str(k)))]
    return []


def _args_problems(
    args: type[Any], exc: ValidationError, loc: tuple[str | int, ...], used: str = "", hide: bool = False
) -> Found:
    """An action's argument errors, each with the field's description as its fix (`hide`: never the value)."""
    found: Found = []
    for err in exc.errors():
        sub = tuple(err["loc"])
        field = getattr(args, "model_fields", {}).get(sub[0]) if sub else None
        hint = (field.description if field is not None and field.description else "") or (
            "see `sparkctl runbook actions` for this action's arguments"
        )
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] not in ("missing", "extra_forbidden") and not isinstance(err.get("input"), dict | list):
            msg += f" ({used})" if used else "" if hide else f" (found {err.get('input')!r})"
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
    fits = isinstance(value, bool) == isinstance(default, bool) and (
        isinstance(value, type(default)) or (isinstance(default, float) and isinstance(value, int))
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
    found: Found = _secrets_on_command_lines(rb)
    for group in ("steps", "cleanup"):
        for i, step in enumerate(getattr(rb, group)):
            action = ACTIONS.get(step.action)
            if action is None:
                continue
            try:
                action.Args.model_validate(step_args(step, params, rb.raw_params()))
            except ValidationError as exc:
                refs = {m.group(1) for m in PARAM.finditer(str(step.args))}
                note = ", ".join(f"from --set {u}" for u in sorted(refs & set(overridden)))
                hide = any(rb.parameters[r].secret for r in refs if r in rb.parameters)
                found += _args_problems(action.Args, exc, (group, i, "args"), note, hide)
    if found:
        raise RunbookError([Problem(rb.where(loc), msg, hint) for loc, msg, hint in found])


def _secrets_on_command_lines(rb: Runbook) -> Found:
    """`secret: true` parameters where the host would run them on a command line, which other users of the host can
    read in its process list: a `shell` step's argv, a workload override (`set:`, whose fields become the workload's
    command line and environment assignments)."""
    secret = {k for k, p in rb.parameters.items() if p.secret}
    found: Found = []
    if not secret:
        return found
    for group in ("steps", "cleanup"):
        for i, step in enumerate(getattr(rb, group)):
            places: list[tuple[tuple[str | int, ...], Any]] = []
            if step.action == "shell" and isinstance(step.args.get("argv"), list):
                places = [(("argv", j), v) for j, v in enumerate(step.args["argv"])]
            elif "set" in step.args:
                places = [(("set",), step.args["set"])]
            for sub, value in places:
                used = sorted({m.group(1) for m in PARAM.finditer(str(value))} & secret)
                if not used:
                    continue
                hint = (
                    f'pass it in the step\'s env: (e.g. env: {{TOKEN: "${{{used[0]}}}"}}), which reaches the host on '
                    "stdin, and let the program read the variable"
                    if step.action == "shell"
                    else "a workload's fields reach the host's command line: keep secrets out of `set:`"
                )
                names = ", ".join(f"'{u}'" for u in used)
                found.append(
                    ((group, i, "args", *sub), f"secret parameter {names} would be on the host's command line", hint)
                )
    return found


def step_index(rb: Runbook, name: str, option: str = "--from") -> int:
    """Position of a step by name (for --from / --only)."""
    for i, s in enumerate(rb.steps):
        if s.name == name:
            return i
    raise RunbookError([Problem(f"{option} {name}", "no such step", f"steps: {', '.join(s.name for s in rb.steps)}")])
