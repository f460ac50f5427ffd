"""The sparkctl command line: one module per command group, each thin (parse, call, render).

Heavy modules (fabric, ray, torch) load only inside commands that need them.
"""

from __future__ import annotations

import typer

from sparkctl import __version__
from sparkctl.cli import access, bench, cluster, doctor, history, inspect, runbook

# rich_markup_mode=None: plain help and error text (click's formatter). rich's renderer costs more to import
# than the rest of `--help`.

app = typer.Typer(
    name="sparkctl",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Turn two or more DGX Sparks into one inference cluster: plan, up, down, status.",
    rich_markup_mode=None,
)
cluster.register(app)
inspect.register(app)
access.register(app)
doctor.register(app)
app.add_typer(runbook.app, name="runbook")
app.add_typer(history.app, name="history")
app.add_typer(bench.app, name="bench")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sparkctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """sparkctl."""


def main() -> None:
    """Console entry point."""
    from sparkctl.cli.interrupts import INTERRUPTS

    INTERRUPTS.install()
    app()
