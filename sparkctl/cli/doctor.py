"""doctor, discover: read-only checks of the hosts, and an inventory proposed from what they report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from sparkctl import state
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
    from sparkctl.doctor.evaluate import evaluate
    from sparkctl.doctor.evaluators import CheckContext
    from sparkctl.session.reads import measure_jumbo

    inv = c.start(debug, inventory)
    # A host that does not answer is a failed `host-reachable` finding; the others are judged all the same.
    session = c.open_session(inv, accept_new_host_keys, partial=True)
    try:
        findings = evaluate(CheckContext(inv, session.facts, measure_jumbo(session), session.unreachable))
    finally:
        session.close()
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
    from sparkctl.facts.discover import DISCOVER_PROBE, parse_discovery, propose_inventory
    from sparkctl.inventory.models import SshSettings
    from sparkctl.session.discovery import open_discovery

    c.set_debug(debug)
    settings = SshSettings(user=user, port=port, identity_file=identity, known_hosts=known_hosts)
    if identity:
        state.refuse_exposed(identity, "--identity-file")
    outputs = open_discovery(hosts, settings, accept_new_host_keys).probe(DISCOVER_PROBE)
    found = [parse_discovery(addr, outputs[addr]) for addr in hosts]
    used = {
        "user": user,
        "port": port,
        "identity_file": identity,
        "known_hosts": known_hosts if known_hosts != "~/.ssh/known_hosts" else None,
    }
    text, unknown = propose_inventory(found, cluster, used)
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
