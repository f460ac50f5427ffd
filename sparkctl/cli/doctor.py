"""doctor, discover: read-only checks of the hosts, and an inventory proposed from what they report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from sparkctl.cli import common as c
from sparkctl.errors import EXIT_FAILED


@c.guard
def doctor_cmd(
    inventory: c.InventoryOpt = None,
    as_json: c.JsonOpt = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show passed checks too.")] = False,
    accept_new_host_keys: c.AcceptKeysOpt = False,
    debug: c.DebugOpt = False,
) -> None:
    """Read-only checks on every host and across the pair: pass / warn / fail, evidence and fix."""
    from sparkctl.cli.render import render_findings
    from sparkctl.session.diagnose import doctor_findings

    inv = c.start(debug, inventory)
    findings = doctor_findings(inv, accept_new_host_keys)
    if as_json:
        c.echo(json.dumps([f.model_dump() for f in findings], indent=2))
    else:
        c.echo(render_findings(findings, verbose))
    if any(f.level == "fail" for f in findings):
        raise typer.Exit(EXIT_FAILED)


@c.guard
def discover_cmd(
    hosts: Annotated[list[str], typer.Argument(help="Management addresses of the Sparks.")],
    user: Annotated[str | None, typer.Option("--user", "-u")] = None,
    port: Annotated[int | None, typer.Option("--port", "-p")] = None,
    identity: Annotated[str | None, typer.Option("--identity-file")] = None,
    known_hosts: Annotated[str, typer.Option("--known-hosts")] = "~/.ssh/known_hosts",
    cluster: Annotated[str, typer.Option("--cluster")] = "spark-pair",
    output: Annotated[Path | None, typer.Option("--output", "-o")] = None,
    accept_new_host_keys: c.AcceptKeysOpt = False,
    debug: c.DebugOpt = False,
) -> None:
    """Connect to the given hosts and write a complete inventory for them."""
    from sparkctl.inventory.models import SshSettings
    from sparkctl.session.diagnose import discover_inventory

    c.set_debug(debug)
    settings = SshSettings(user=user, port=port, identity_file=identity, known_hosts=known_hosts)
    used = {
        "user": user,
        "port": port,
        "identity_file": identity,
        "known_hosts": known_hosts if known_hosts != "~/.ssh/known_hosts" else None,
    }
    text, unknown = discover_inventory(hosts, settings, accept_new_host_keys, cluster, used)
    for u in unknown:
        c.echo(f"warning: could not determine: {u}", err=True)
    if output:
        output.write_text(text)
        c.echo(f"wrote {output}", err=True)
    else:
        c.echo(text.rstrip())


def register(app: typer.Typer) -> None:
    """These commands sit at the top level of `sparkctl`."""
    app.command("doctor")(doctor_cmd)
    app.command("discover")(discover_cmd)
