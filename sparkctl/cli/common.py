"""Shared CLI options, loading helpers and the error boundary."""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from sparkctl.errors import EXIT_FAILED, EXIT_INTERRUPTED, SparkctlError
from sparkctl.inventory import load_inventory, parse_inventory
from sparkctl.inventory.models import Inventory
from sparkctl.runbook.session import Session, ssh_connect

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
    chosen = path or (Path(os.environ["SPARKCTL_INVENTORY"]) if os.environ.get("SPARKCTL_INVENTORY") else None)
    if chosen is not None:
        return load_inventory(chosen)
    from sparkctl.inventory import example_inventory_text

    return parse_inventory(example_inventory_text(), "<bundled example-pair.yaml>")


def open_session(inv: Inventory, accept_new_host_keys: bool) -> Session:
    """Connect to and probe every host (one SSH connection each, in parallel)."""
    session = Session(inv, ssh_connect(accept_new_host_keys))
    session.open()
    return session


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
    with contextlib.suppress(OSError):  # the terminal may be gone (SIGHUP): the cleanup must still run
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
