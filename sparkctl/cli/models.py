"""sparkctl models: the model weights on the hosts."""

from __future__ import annotations

import typer

from sparkctl.cli import common as c

app = typer.Typer(help="Model weights on the hosts.", no_args_is_help=True, rich_markup_mode=None)


@app.command("sync")
@c.guard
def models_sync(
    inventory: c.InventoryOpt = None,
    dry_run: c.DryRunOpt = False,
    yes: c.YesOpt = False,
    as_json: c.JsonOpt = False,
    accept_new_host_keys: c.AcceptKeysOpt = False,
    plain: c.PlainOpt = False,
    debug: c.DebugOpt = False,
) -> None:
    """Fetch each vllm workload's Hugging Face weights once and copy them to its group over the fabric.

    The same stages as `up` runs before Ray (the fabric first, as the copy goes over it); nothing is started.
    """
    from sparkctl.cli.cluster import execute
    from sparkctl.runbook.load import load_runbook

    inv = c.start(debug, inventory)
    execute(
        inv,
        load_runbook("models-sync"),
        {},
        dry_run=dry_run,
        yes=yes,
        as_json=as_json,
        accept_new_host_keys=accept_new_host_keys,
        command="sparkctl models sync",
        plain=plain,
    )
