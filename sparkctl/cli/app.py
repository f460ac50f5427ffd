"""The sparkctl command line: one module per command group, each thin (parse, call, render).

Heavy modules (fabric, ray, torch) load only inside commands that need them.
"""

from __future__ import annotations

import os
from typing import NoReturn

import typer

from sparkctl import __version__
from sparkctl.cli import access, bench, cluster, doctor, history, inspect, models, runbook

# rich_markup_mode=None: plain help and error text (click's formatter). rich's renderer costs more to import
# than the rest of `--help`.

app = typer.Typer(
    name="sparkctl",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, PowerShell)
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
app.add_typer(models.app, name="models")


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
    from sparkctl.cli.common import quiet_logs
    from sparkctl.session.interrupts import INTERRUPTS

    quiet_logs()
    INTERRUPTS.install()
    # pydantic looks for plugins in every installed distribution's entry points when it builds the first model
    # (pydantic/plugin/_loader.py, pydantic 2.13): 7 ms with 180 packages, more in a larger environment.
    # sparkctl's models use none. Set the variable to "" to let pydantic load them anyway.
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    try:
        app(prog_name="sparkctl")  # also under `python -m sparkctl`: completion scripts name the installed command
    except SystemExit as exc:
        leave(exc.code)
    leave(0)


def leave(code: object) -> NoReturn:
    """End the process as `sys.exit(code)` would, without tearing down the interpreter.

    Python's own exit then frees every module and object one by one: 0.08 s after a connected command, a quarter
    of what a converged `plan` costs above the network (docs/benchmarks.md). The parts of that teardown a run
    relies on are kept: the atexit handlers (logging's flush among them), then the standard streams are flushed.
    While a thread the interpreter would wait for is still running, this falls back to the normal exit.
    """
    import atexit
    import sys
    import threading

    waiting = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if waiting:
        raise SystemExit(code)
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"): the message goes to stderr and the status is 1
        print(code, file=sys.stderr)
        status = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`sparkctl plan | head`): Python exits 120 on this too
            status = status or 120
    os._exit(status)
