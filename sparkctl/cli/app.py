"""The sparkctl command line. Heavy modules (fabric, ray, torch) load only inside commands that need them."""

from __future__ import annotations

import typer

from sparkctl import __version__
from sparkctl.cli import cluster, doctor, inspect

app = typer.Typer(
    name="sparkctl",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Turn two or more DGX Sparks into one inference cluster: plan, up, down, status.",
)
runbook_app = typer.Typer(help="Built-in runbooks and validation of runbook files.", no_args_is_help=True)
history_app = typer.Typer(help="Runs recorded in the journal.")
app.add_typer(runbook_app, name="runbook")
app.add_typer(history_app, name="history")
bench_app = typer.Typer(help="Measure the cluster.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

cluster.register(app)
inspect.register(app, runbook_app, history_app)
doctor.register(app, bench_app)


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
