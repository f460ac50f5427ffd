"""sparkctl history: the runs recorded in the journal."""

from __future__ import annotations

import json

import typer

from sparkctl import state
from sparkctl.cli import common as c
from sparkctl.errors import InputError, Problem

app = typer.Typer(help="Runs recorded in the journal.", rich_markup_mode=None)


@app.callback(invoke_without_command=True)
@c.guard
def history_list(ctx: typer.Context, as_json: c.JsonOpt = False) -> None:
    """Runs recorded in the journal."""
    if ctx.invoked_subcommand:
        return
    runs = state.read_journal()
    if as_json:
        c.echo(
            json.dumps(
                [
                    {k: r.get(k) for k in ("id", "cluster", "runbook", "ok", "started", "ended", "planned_changes")}
                    for r in runs
                ],
                indent=2,
            )
        )
        return
    for r in runs:
        changed = sum(1 for s in r.get("steps", []) if s.get("status") == "changed")
        status = "ok" if r.get("ok") else ("interrupted" if r.get("interrupted") else "failed")
        c.echo(f"{r['id']}  {r.get('cluster')}  {r.get('runbook')}  {status}  {changed} changed")


@app.command("show")
@c.guard
def history_show(run_id: str, as_json: c.JsonOpt = False) -> None:
    """One recorded run: per host, per step."""
    for r in state.read_journal():
        if r["id"] == run_id:
            if as_json:
                c.echo(json.dumps(r, indent=2))
                return
            c.echo(f"{r['id']} {r['runbook']} on {r['cluster']}: {'ok' if r['ok'] else 'failed'}")
            for s in r.get("steps", []):
                c.echo(
                    f"  {s['host']} {s['stage']}/{s['step']}: {s['status']}"
                    + (f" - {s['error']}" if s.get("error") else "")
                )
                for cmd in s.get("commands", []):
                    c.echo(f"      $ {cmd['command']}  -> {cmd['exit_code']}")
            return
    raise InputError([Problem(run_id, "no such run in the journal", "sparkctl history lists runs")])
