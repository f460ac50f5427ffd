"""Shared CLI options, loading helpers and the error boundary."""

from __future__ import annotations

import getpass
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sparkctl.errors import EXIT_FAILED, EXIT_INTERRUPTED, SparkctlError

# Commands import what they need when they run: `--help` and offline planning stay free of SSH, Ray and the
# models they do not use.
if TYPE_CHECKING:
    from sparkctl.inventory.models import Inventory
    from sparkctl.runbook.run import Session

InventoryOpt = Annotated[
    Path | None,
    typer.Option(
        "--inventory",
        "-i",
        help="Inventory YAML (default: $SPARKCTL_INVENTORY, else the bundled example).",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print data as JSON.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks and SSH debug logs.")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Apply without asking.")]
AcceptKeysOpt = Annotated[
    bool,
    typer.Option(
        "--accept-new-host-keys", help="Record unknown host keys on first use (changed keys are always refused)."
    ),
]

_debug = False


def set_debug(on: bool) -> None:
    global _debug
    _debug = _debug or on
    if on:
        logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(name)s %(message)s")


def inventory(path: Path | None) -> Inventory:
    """Load the inventory named by -i, $SPARKCTL_INVENTORY, or the bundled example."""
    from sparkctl.inventory import example_inventory_text, load_inventory, parse_inventory

    chosen = path or (Path(os.environ["SPARKCTL_INVENTORY"]) if os.environ.get("SPARKCTL_INVENTORY") else None)
    if chosen is not None:
        return load_inventory(chosen)

    return parse_inventory(example_inventory_text(), "<bundled example-pair.yaml>")


def open_session(inv: Inventory, accept_new_host_keys: bool) -> Session:
    """Connect to and probe every host (one SSH connection each, in parallel)."""
    from sparkctl.runbook.run import Session, ssh_connect

    session = Session(inv, ssh_connect(accept_new_host_keys))
    session.open()
    return session


class EarlySession:
    """A session opening in the background (connect and probe every host) while the command loads the rest of
    what it needs: the hosts' answers and the laptop's imports overlap."""

    def __init__(self, inv: Inventory, accept_new_host_keys: bool) -> None:
        import threading

        from sparkctl.runbook.run import Session, ssh_connect

        self.session = Session(inv, ssh_connect(accept_new_host_keys))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._open, name="sparkctl-open", daemon=True)
        self._thread.start()

    def _open(self) -> None:
        try:
            self.session.open()
        except BaseException as exc:  # handed to the command's thread by wait()
            self._error = exc

    def wait(self) -> Session:
        """The open session; raises what opening raised (Unreachable names the hosts)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self.session

    def abandon(self) -> None:
        """The command failed before it used the session: close whatever opened."""
        self._thread.join()
        self.session.close()


def sudo_password(inv: Inventory) -> str | None:
    """The sudo password: env var, file, or one prompt on a terminal. Never from argv."""
    value = os.environ.get(inv.sudo.password_env)
    if value:
        return value
    if inv.sudo.password_file:
        try:
            return Path(inv.sudo.password_file).expanduser().read_text().splitlines()[0]
        except (OSError, IndexError):
            return None
    if sys.stdin.isatty():
        return getpass.getpass("sudo password for the hosts: ")
    return None


def confirm(message: str, yes: bool) -> bool:
    """Ask on a terminal; without one, --yes is required."""
    if yes:
        return True
    if not sys.stdin.isatty():
        raise SparkctlError(f"{message} needs confirmation", "re-run with --yes (no terminal to ask on)")
    return typer.confirm(message, default=False)


def echo(text: str = "", err: bool = False) -> None:
    typer.echo(text, err=err)


def fail(exc: SparkctlError) -> None:
    for p in exc.problems:
        typer.echo(p.render(), err=True)
    raise typer.Exit(exc.exit_code)


def guard(fn: Any) -> Any:
    """Decorator: the one error boundary for every command."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SparkctlError as exc:
            fail(exc)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except typer.Exit:
            raise
        except Exception as exc:
            if _debug:
                raise
            typer.echo(f"error: unexpected {type(exc).__name__}: {exc}", err=True)
            typer.echo("hint: re-run with --debug for the traceback", err=True)
            raise typer.Exit(EXIT_FAILED) from None

    return wrapper
