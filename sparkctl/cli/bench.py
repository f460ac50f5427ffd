"""sparkctl bench: measure the cluster."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from sparkctl.cli import common as c
from sparkctl.errors import EXIT_FAILED

app = typer.Typer(help="Measure the cluster.", no_args_is_help=True, rich_markup_mode=None)


@app.command("fabric")
@c.guard
def bench_fabric(
    inventory: c.InventoryOpt = None,
    as_json: c.JsonOpt = False,
    mb: Annotated[int, typer.Option("--mb", help="MB sent over each link.")] = 512,
    accept_new_host_keys: c.AcceptKeysOpt = False,
    debug: c.DebugOpt = False,
) -> None:
    """Measure the link without RDMA tools: jumbo frames per twin, one TCP stream per link (said so)."""
    from sparkctl.cli.render import render_bench
    from sparkctl.runbook.load import load_runbook, resolve_params
    from sparkctl.runbook.reports import summarise_bench

    inv = c.start(debug, inventory)
    rb = load_runbook("bench-fabric")
    params = resolve_params(rb, {"mb": str(mb)})
    session = c.open_session(inv, accept_new_host_keys)
    try:
        secrets = session.secrets_for_plan()
        report = session.apply(rb, session.plan(rb, params, secrets), params, secrets)
    finally:
        session.close()
    result = summarise_bench(report)
    c.echo(json.dumps(result, indent=2) if as_json else render_bench(result))
    if not report.ok:
        raise typer.Exit(EXIT_FAILED)
