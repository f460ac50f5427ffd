"""status, logs, dashboard, history, runbook: commands that read, never change."""

from __future__ import annotations

import json
import shlex
from typing import Annotated, Any

import typer

from sparkctl import paths, state
from sparkctl.cli import common as c
from sparkctl.errors import InputError, Problem
from sparkctl.execute.http import probe_workload
from sparkctl.inventory.models import Inventory
from sparkctl.plan import commands as lc
from sparkctl.plan.cluster import ray_running_ok, workload_state
from sparkctl.runbook.actions import ACTIONS
from sparkctl.runbook.load import builtin_names, builtin_text, load_runbook
from sparkctl.runbook.session import Session


def cluster_status(session: Session, inv: Inventory, secrets: dict[str, str]) -> dict[str, Any]:
    """Per host: fabric state and Ray; per workload: endpoint, process and health."""
    ctx = session.context(secrets, {})
    hosts: dict[str, Any] = {}
    for h in inv.hosts:
        f = session.facts[h.name]
        fabric = []
        for t in h.fabric:
            live = f.interfaces.get(t.interface)
            ok = live is not None and str(t.address) in live.ipv4 and live.mtu == inv.network.mtu
            fabric.append(
                {
                    "interface": t.interface,
                    "want": str(t.address),
                    "mtu": live.mtu if live else None,
                    "ipv4": live.ipv4 if live else [],
                    "ok": ok,
                }
            )
        hosts[h.name] = {
            "fabric": fabric,
            "ray": "running" if ray_running_ok(ctx, h) else "not running",
            "env_file": f.env_file is not None,
        }
    workloads = {}
    for w in inv.workloads:
        probe = probe_workload(lc.endpoint(inv, w), w.name, secrets.get(f"api_key:{w.name}"), w.engine, timeout=5)
        workloads[w.name] = {
            "engine": w.engine,
            "endpoint": lc.endpoint(inv, w) + "/v1",
            "process": workload_state(ctx, w),
            "health": probe.phase,
            "detail": probe.detail,
        }
    return {"cluster": inv.cluster, "hosts": hosts, "workloads": workloads}


def _render_status(st: dict[str, Any]) -> str:
    lines = [f"cluster {st['cluster']}"]
    for name, h in st["hosts"].items():
        lines.append(f"  {name}: ray {h['ray']}")
        for t in h["fabric"]:
            lines.append(
                f"    {t['interface']}: {','.join(t['ipv4']) or 'no IPv4'} MTU {t['mtu']} "
                f"({'ok' if t['ok'] else 'want ' + t['want']})"
            )
    for name, w in st["workloads"].items():
        lines.append(f"  workload {name} ({w['engine']}): {w['endpoint']} process {w['process']}, {w['health']}")
    return "\n".join(lines)


def register(app: typer.Typer, runbook_app: typer.Typer, history_app: typer.Typer) -> None:
    @app.command("status")
    @c.guard
    def status_cmd(
        inventory: c.InventoryOpt = None,
        as_json: c.JsonOpt = False,
        accept_new_host_keys: c.AcceptKeysOpt = False,
        debug: c.DebugOpt = False,
    ) -> None:
        """Per host the fabric and Ray state; each workload's endpoint and health."""
        c.set_debug(debug)
        inv = c.inventory(inventory)
        session = c.open_session(inv, accept_new_host_keys)
        try:
            st = cluster_status(session, inv, session.secrets_for_plan())
        finally:
            session.close()
        c.echo(json.dumps(st, indent=2) if as_json else _render_status(st))

    @app.command("logs")
    @c.guard
    def logs_cmd(
        name: Annotated[str, typer.Argument(help="'ray' or a workload name.")],
        inventory: c.InventoryOpt = None,
        host: Annotated[str | None, typer.Option("--host", help="Host (default: the head).")] = None,
        lines: Annotated[int, typer.Option("--lines", "-n")] = 100,
        follow: Annotated[bool, typer.Option("--follow", "-f")] = False,
        accept_new_host_keys: c.AcceptKeysOpt = False,
        debug: c.DebugOpt = False,
    ) -> None:
        """Show the log of Ray or a workload on a host."""
        c.set_debug(debug)
        inv = c.inventory(inventory)
        if name != "ray" and name not in {w.name for w in inv.workloads}:
            raise InputError([Problem(name, "not 'ray' nor a workload", "see the inventory's workloads")])
        target = inv.host(host) if host else inv.head
        session = c.open_session(inv, accept_new_host_keys)
        try:
            path = paths.log_path(session.facts[target.name].home, name)
            cmd = f"tail -n {lines} {'-F ' if follow else ''}{shlex.quote(path)}"
            r = session.transports[target.name].run(cmd, timeout=10**6 if follow else 30)
            c.echo(r.stdout.rstrip())
        finally:
            session.close()

    @app.command("dashboard")
    @c.guard
    def dashboard_cmd(
        inventory: c.InventoryOpt = None, local_port: Annotated[int, typer.Option("--local-port")] = 8265
    ) -> None:
        """Print the SSH tunnel command that reaches the Ray dashboard (it listens on the head's 127.0.0.1)."""
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

    @runbook_app.command("list")
    @c.guard
    def runbook_list() -> None:
        """Built-in runbooks and the actions runbooks can use."""
        for name in builtin_names():
            c.echo(f"{name}: {load_runbook(name).description}")
        c.echo("\nactions:")
        for name, action in sorted(ACTIONS.items()):
            c.echo(f"  {name}: {action.help}")

    @runbook_app.command("show")
    @c.guard
    def runbook_show(name: str) -> None:
        """Print a built-in runbook as YAML, to copy and adapt."""
        c.echo(builtin_text(name).rstrip())

    @runbook_app.command("validate")
    @c.guard
    def runbook_validate(files: list[str]) -> None:
        """Validate runbook files (exit 2 with file:line problems)."""
        problems = []
        for f in files:
            try:
                load_runbook(f)
                c.echo(f"{f}: ok")
            except InputError as exc:
                problems += exc.problems
        if problems:
            raise InputError(problems)

    @history_app.callback(invoke_without_command=True)
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

    @history_app.command("show")
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
