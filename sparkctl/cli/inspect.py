"""status, logs, dashboard: commands that read, never change."""

from __future__ import annotations

import json
import shlex
from typing import Annotated

import typer

from sparkctl.cli import common as c
from sparkctl.cli.complete import complete_host, complete_log_name
from sparkctl.errors import HostError, InputError, Problem


@c.guard
def status_cmd(
    inventory: c.InventoryOpt = None,
    as_json: c.JsonOpt = False,
    watch: Annotated[
        bool,
        typer.Option(
            "--watch",
            help="Refresh until Ctrl-C: GPU, memory, fabric, Ray per host; health and rates per workload.",
        ),
    ] = False,
    interval: Annotated[float, typer.Option("--interval", min=0.5, help="Seconds between refreshes (--watch).")] = 3.0,
    accept_new_host_keys: c.AcceptKeysOpt = False,
    debug: c.DebugOpt = False,
) -> None:
    """Per host the fabric and Ray state; each workload's endpoint and health."""
    from sparkctl.cli.render import render_status
    from sparkctl.session.status import read_status

    inv = c.start(debug, inventory)
    if watch:
        if as_json:
            raise InputError([Problem("--watch/--json", "use one of them", "--json prints one reading")])
        from sparkctl.cli.watch import watch as watch_view

        watch_view(inv, interval=interval, accept_new_host_keys=accept_new_host_keys)
        return
    # One host down must not hide the others: what the reachable hosts say is shown, the others are named (exit 1).
    st, lost = read_status(inv, accept_new_host_keys)
    c.echo(json.dumps(st.model_dump(mode="json"), indent=2) if as_json else render_status(st))
    if lost:
        c.fail(HostError(lost))


@c.guard
def logs_cmd(
    name: Annotated[str, typer.Argument(help="'ray' or a workload name.", autocompletion=complete_log_name)],
    inventory: c.InventoryOpt = None,
    host: Annotated[
        str | None,
        typer.Option(
            "--host", help="Host (default: the Ray head or the workload's head).", autocompletion=complete_host
        ),
    ] = None,
    lines: Annotated[int, typer.Option("--lines", "-n")] = 100,
    follow: Annotated[bool, typer.Option("--follow", "-f")] = False,
    accept_new_host_keys: c.AcceptKeysOpt = False,
    debug: c.DebugOpt = False,
) -> None:
    """Show the log of Ray or a workload on a host."""
    from sparkctl.session.reads import host_log

    inv = c.start(debug, inventory)
    if name != "ray" and name not in {w.name for w in inv.workloads}:
        raise InputError([Problem(name, "not 'ray' nor a workload", "see the inventory's workloads")])
    target = inv.host(host) if host else inv.head if name == "ray" else inv.workload_head(inv.workload(name))
    c.echo(host_log(inv, accept_new_host_keys, target.name, name, lines=lines, follow=follow).rstrip())


@c.guard
def dashboard_cmd(
    inventory: c.InventoryOpt = None, local_port: Annotated[int, typer.Option("--local-port")] = 8265
) -> None:
    """Print the SSH tunnel command that reaches the Ray dashboard (it listens on the head's 127.0.0.1)."""
    from sparkctl.plan.layout import ray_wanted

    inv = c.inventory(inventory)
    head = inv.head
    user = head.ssh.user or inv.ssh.user
    target = f"{user}@{head.address}" if user else head.address
    port = head.ssh.port or inv.ssh.port
    cmd = ["ssh", "-N", "-L", f"{local_port}:127.0.0.1:{inv.ray.ports.dashboard}", target]
    if port:
        cmd[1:1] = ["-p", str(port)]
    c.echo(shlex.join(cmd))
    c.echo(f"then open http://127.0.0.1:{local_port}")
    if not ray_wanted(inv):
        c.echo(
            "note: no workload of this inventory needs Ray, so `up` does not start it and the dashboard does not "
            "answer; `ray.form: always` in the inventory starts it anyway",
            err=True,
        )


def register(app: typer.Typer) -> None:
    """These commands sit at the top level of `sparkctl`."""
    app.command("status")(status_cmd)
    app.command("logs")(logs_cmd)
    app.command("dashboard")(dashboard_cmd)
