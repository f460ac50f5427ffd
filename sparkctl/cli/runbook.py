"""sparkctl runbook: the built-in runbooks, the action library, and validation of runbook files."""

from __future__ import annotations

import typer

from sparkctl.cli import common as c
from sparkctl.errors import InputError

app = typer.Typer(
    help="Built-in runbooks and validation of runbook files.", no_args_is_help=True, rich_markup_mode=None
)


@app.command("list")
@c.guard
def runbook_list() -> None:
    """Built-in runbooks and the actions runbooks can use."""
    from sparkctl.runbook.actions import ACTIONS
    from sparkctl.runbook.load import builtin_names, load_runbook

    for name in builtin_names():
        c.echo(f"{name}: {load_runbook(name).description}")
    c.echo("\nactions:")
    for name, action in sorted(ACTIONS.items()):
        c.echo(f"  {name}: {action.help}")


@app.command("show")
@c.guard
def runbook_show(name: str) -> None:
    """Print a built-in runbook as YAML, to copy and adapt."""
    from sparkctl.runbook.load import builtin_text

    c.echo(builtin_text(name).rstrip())


@app.command("validate")
@c.guard
def runbook_validate(files: list[str]) -> None:
    """Validate runbook files (exit 2 with file:line problems)."""
    from sparkctl.runbook.load import load_runbook

    problems = []
    for f in files:
        try:
            load_runbook(f)
            c.echo(f"{f}: ok")
        except InputError as exc:
            problems += exc.problems
    if problems:
        raise InputError(problems)
