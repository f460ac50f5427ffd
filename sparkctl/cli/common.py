"""Shared CLI option types, loading helpers and the one error boundary."""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from sparkctl import state
from sparkctl.cli.complete import complete_workload, complete_yaml_file
from sparkctl.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, InputError, Problem, SparkctlError

# Commands import what they need when they run: `--help` loads Typer and these signatures only (no pydantic,
# models, YAML, SSH or engine), and offline planning loads neither SSH nor the engine.
if TYPE_CHECKING:
    from sparkctl.cli.live import LiveProgress
    from sparkctl.inventory.models import Inventory

InventoryOpt = Annotated[
    Path | None,
    typer.Option(
        "--inventory",
        "-i",
        help="Inventory YAML (default: $SPARKCTL_INVENTORY, else the bundled example).",
        show_default=False,
        autocompletion=complete_yaml_file,
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

PlainOpt = Annotated[
    bool, typer.Option("--plain", help="Plain progress lines even on a terminal (no live view, no colours).")
]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Only show the plan.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Runbook parameter: --set name=value (repeatable).")]
WorkloadOpt = Annotated[
    list[str] | None,
    typer.Option("--workload", "-w", help="Only this workload (repeatable).", autocompletion=complete_workload),
]

_debug = False
_silent = logging.NullHandler()


def quiet_logs() -> None:
    """Keep every logger (paramiko's, fabric's, sparkctl's) off the terminal until --debug asks for them.

    A record that finds no handler goes to logging's "last resort" handler, which prints WARNING and above to
    stderr: paramiko's transport thread logs a traceback there when a host drops the connection before the SSH
    banner, ahead of sparkctl's own error. A silent handler on the root logger leaves the last resort unused,
    and the records still propagate to the root, where --debug prints them.
    """
    logging.getLogger().addHandler(_silent)


def set_debug(on: bool) -> None:
    global _debug
    _debug = _debug or on
    if on:
        logging.getLogger().removeHandler(_silent)
        logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(name)s %(message)s")


def inventory(path: Path | None) -> Inventory:
    """Load the inventory named by -i, $SPARKCTL_INVENTORY, or the bundled example."""
    from sparkctl.inventory import example_inventory_text, load_inventory, parse_inventory

    chosen = path or (Path(os.environ["SPARKCTL_INVENTORY"]) if os.environ.get("SPARKCTL_INVENTORY") else None)
    if chosen is not None:
        return load_inventory(chosen)
    return parse_inventory(example_inventory_text(), "<bundled example-pair.yaml>")


def start(debug: bool, path: Path | None) -> Inventory:
    """What every command that targets a cluster does first: debug logging on request, then the inventory."""
    set_debug(debug)
    return inventory(path)


def parse_sets(sets: list[str] | None) -> dict[str, str]:
    """`--set name=value` options as a mapping."""
    out = {}
    for item in sets or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise InputError([Problem(f"--set {item}", "expected name=value", "e.g. --set model=Qwen/Qwen3-8B")])
        out[key.strip()] = value
    return out


def sudo_password(inv: Inventory) -> str | None:
    """The sudo password: env var, file, or one prompt on a terminal. Never from argv."""
    value = os.environ.get(inv.sudo.password_env)
    if value:
        return value
    if inv.sudo.password_file:
        state.refuse_exposed(inv.sudo.password_file, "sudo.password_file")
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


def live_wanted(plain: bool, as_json: bool) -> bool:
    """The live view: only when both stdout and stderr are terminals that can draw it, and not asked off."""
    if plain or as_json or os.environ.get("TERM", "") in ("", "dumb"):
        return False
    try:
        return sys.stdout.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def live_view(plain: bool, as_json: bool) -> LiveProgress | None:
    """The live view on stderr when `live_wanted`, else None (plain progress lines)."""
    if not live_wanted(plain, as_json):
        return None
    from sparkctl.cli.live import LiveProgress

    return LiveProgress(stream=sys.stderr)


@contextlib.contextmanager
def drawing(live: LiveProgress | None) -> Iterator[None]:
    """While a run applies its plan, the live view (if any) draws."""
    if live is not None:
        live.start()
    try:
        yield
    finally:
        if live is not None:
            live.stop()


def echo(text: str = "", err: bool = False) -> None:
    """Print text that may hold values from inventories, runbooks or hosts: control characters escaped."""
    from sparkctl.cli.render import escape_controls

    with contextlib.suppress(OSError):  # the terminal may be gone (SIGHUP): the cleanup must still run
        typer.echo(escape_controls(text), err=err)


def fail(exc: SparkctlError) -> None:
    for p in exc.problems:
        echo(p.render(), err=True)
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
            if _is_validation_error(exc):  # a value from the command line that a model refuses: bad input
                _bad_input(exc)
            echo(f"error: unexpected {type(exc).__name__}: {exc}", err=True)
            typer.echo("hint: re-run with --debug for the traceback", err=True)
            raise typer.Exit(EXIT_FAILED) from None

    return wrapper


def _is_validation_error(exc: Exception) -> bool:
    """pydantic's ValidationError, without importing pydantic: a command that raised one has loaded it."""
    core = sys.modules.get("pydantic_core")
    return core is not None and isinstance(exc, core.ValidationError)


def _bad_input(exc: Any) -> NoReturn:
    for err in exc.errors():
        where = ".".join(map(str, err["loc"]))
        ctx = err.get("ctx") or {}
        msg = str(ctx["message"]) if err["type"] == "sparkctl" else err["msg"]
        echo(f"error: {where}: {msg}" if where else f"error: {msg}", err=True)
        echo(f"hint: {ctx.get('hint') or 'check the value given on the command line'}", err=True)
    raise typer.Exit(EXIT_BAD_INPUT) from None
