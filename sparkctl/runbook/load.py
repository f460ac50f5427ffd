"""Load runbooks (built-in or files), validate them, resolve their parameters."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from sparkctl.errors import Problem
from sparkctl.inventory.load import load_model, read_text
from sparkctl.runbook.actions import ACTIONS
from sparkctl.runbook.models import Runbook, RunbookError
from sparkctl.runbook.planner import substitute


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
                action.Args.model_validate(substitute(step.args, {k: p.default for k, p in rb.parameters.items()}))
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


def step_index(rb: Runbook, name: str, option: str = "--from") -> int:
    """Position of a step by name (for --from / --only)."""
    for i, s in enumerate(rb.steps):
        if s.name == name:
            return i
    raise RunbookError([Problem(f"{option} {name}", "no such step", f"steps: {', '.join(s.name for s in rb.steps)}")])
