"""plan, up, down, restore-network, run: the commands that plan and apply a runbook."""

from __future__ import annotations

from typing import Annotated

import typer

from sparkctl.cli import common as c
from sparkctl.cli.render import Progress, render_plan, render_report
from sparkctl.doctor.evaluators import CheckContext
from sparkctl.doctor.preflight import preflight
from sparkctl.errors import EXIT_FAILED, EXIT_INTERRUPTED, InputError, Problem
from sparkctl.inventory.models import Inventory
from sparkctl.plan.models import Plan
from sparkctl.runbook.engine import Report, Secrets
from sparkctl.runbook.load import load_runbook, resolve_params, step_index
from sparkctl.runbook.models import Runbook
from sparkctl.runbook.planner import offline_plan

OfflineOpt = Annotated[
    bool, typer.Option("--offline", help="Plan as if the hosts were fresh, without contacting them.")
]
ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force", help="Override preflight failures that are safe to override (e.g. an unexpected GPU or driver)."
    ),
]


def _workloads(inv: Inventory, chosen: list[str] | None) -> list[str] | None:
    """`-w NAME` options, each a workload of the inventory (checked here, before any step names it)."""
    import difflib

    known = [w.name for w in inv.workloads]
    bad = [n for n in chosen or [] if n not in known]
    if bad:
        raise InputError(
            [
                Problem(
                    f"--workload {n}",
                    f"{inv.cluster} has no workload named {n}",
                    f"did you mean '{close[0]}'?"
                    if (close := difflib.get_close_matches(n, known, n=1))
                    else f"workloads: {', '.join(known) or 'none'}",
                )
                for n in bad
            ]
        )
    return chosen or None


def show_plan(plan: Plan, as_json: bool, secrets: Secrets) -> str:
    """The plan as printed (text or JSON), with every secret value redacted, `secret: true` parameters too."""
    shown = Plan.model_validate(secrets.scrub(plan.model_dump()))
    return shown.model_dump_json(indent=2) if as_json else render_plan(shown)


def show_report(report: Report, as_json: bool, secrets: Secrets) -> str:
    """The report as printed: the executed steps' commands may hold secret parameter values."""
    shown = Report.model_validate(secrets.scrub(report.model_dump()))
    return shown.model_dump_json(indent=2) if as_json else render_report(shown)


def execute(
    inv: Inventory,
    rb: Runbook,
    params: dict[str, object],
    *,
    dry_run: bool,
    yes: bool,
    as_json: bool,
    accept_new_host_keys: bool,
    start: int = 0,
    only: str | None = None,
    checks: bool = False,
    force: bool = False,
) -> None:
    """Connect, gather, plan, (confirm), apply, report. Shared by up, down, run and restore-network."""
    session = c.open_session(inv, accept_new_host_keys, emit=Progress(quiet=False))
    try:
        secrets = session.secrets_for_plan()
        plan = session.plan(rb, params, secrets, start=start, only=only)
        if checks and not dry_run:
            warnings, stop = preflight(CheckContext(session.inventory, session.facts), force)
            for f in warnings:
                c.echo(f"warning: {f.rule} {f.subject}: {f.evidence}", err=True)
            if stop:
                raise stop
        hidden = Secrets({**secrets, **rb.secret_values(params)})
        if dry_run:
            c.echo(show_plan(plan, as_json, hidden))
            return
        if not as_json:
            c.echo(show_plan(plan, False, hidden))
        if plan.changes and not c.confirm(f"apply {plan.changes} change(s) to {inv.cluster}?", yes):
            raise typer.Exit(EXIT_FAILED)
        secrets = {**secrets, **session.check_sudo(plan, lambda: c.sudo_password(inv))}
        report = session.apply(rb, plan, params, secrets, confirm=lambda m: c.confirm(m, yes), start=start)
        c.echo(show_report(report, as_json, Secrets({**secrets, **rb.secret_values(params)})))
        if report.interrupted:
            raise typer.Exit(EXIT_INTERRUPTED)
        if not report.ok:
            raise typer.Exit(EXIT_FAILED)
    finally:
        session.close()


@c.guard
def plan_cmd(
    inventory: c.InventoryOpt = None,
    offline: OfflineOpt = False,
    workload: c.WorkloadOpt = None,
    as_json: c.JsonOpt = False,
    accept_new_host_keys: c.AcceptKeysOpt = False,
    debug: c.DebugOpt = False,
) -> None:
    """Show what `up` would change on every host: steps, exact commands, diffs. Changes nothing."""
    inv = c.start(debug, inventory)
    rb = load_runbook("up")
    params = resolve_params(rb, {}) | {"workloads": _workloads(inv, workload)}
    if offline:
        plan = offline_plan(inv, rb, params)
        c.echo(show_plan(plan, as_json, Secrets(rb.secret_values(params))))
        return
    execute(inv, rb, params, dry_run=True, yes=False, as_json=as_json, accept_new_host_keys=accept_new_host_keys)


@c.guard
def up_cmd(
    inventory: c.InventoryOpt = None,
    dry_run: c.DryRunOpt = False,
    yes: c.YesOpt = False,
    workload: c.WorkloadOpt = None,
    as_json: c.JsonOpt = False,
    force: ForceOpt = False,
    accept_new_host_keys: c.AcceptKeysOpt = False,
    debug: c.DebugOpt = False,
) -> None:
    """Configure the fabric and env, form Ray, start the workloads and wait until they answer."""
    inv = c.start(debug, inventory)
    rb = load_runbook("up")
    params = resolve_params(rb, {}) | {"workloads": _workloads(inv, workload)}
    execute(
        inv,
        rb,
        params,
        dry_run=dry_run,
        yes=yes,
        as_json=as_json,
        accept_new_host_keys=accept_new_host_keys,
        checks=True,
        force=force,
    )


@c.guard
def down_cmd(
    inventory: c.InventoryOpt = None,
    as_json: c.JsonOpt = False,
    accept_new_host_keys: c.AcceptKeysOpt = False,
    debug: c.DebugOpt = False,
) -> None:
    """Stop workloads and Ray on every host and check nothing is left. The network stays configured."""
    inv = c.start(debug, inventory)
    execute(
        inv,
        load_runbook("down"),
        {},
        dry_run=False,
        yes=True,
        as_json=as_json,
        accept_new_host_keys=accept_new_host_keys,
    )


@c.guard
def restore_cmd(
    inventory: c.InventoryOpt = None,
    yes: c.YesOpt = False,
    as_json: c.JsonOpt = False,
    accept_new_host_keys: c.AcceptKeysOpt = False,
    debug: c.DebugOpt = False,
) -> None:
    """Put the twins back as before sparkctl: delete its profiles, re-enable the ones it disabled."""
    inv = c.start(debug, inventory)
    execute(
        inv,
        load_runbook("restore-network"),
        {},
        dry_run=False,
        yes=yes,
        as_json=as_json,
        accept_new_host_keys=accept_new_host_keys,
    )


@c.guard
def run_cmd(
    runbook: Annotated[str, typer.Argument(help="Runbook file, or a built-in name.")],
    inventory: c.InventoryOpt = None,
    dry_run: c.DryRunOpt = False,
    set_: c.SetOpt = None,
    from_: Annotated[str | None, typer.Option("--from", help="Start at this step.")] = None,
    only: Annotated[str | None, typer.Option("--only", help="Run only this step.")] = None,
    offline: Annotated[bool, typer.Option("--offline", help="With --dry-run: assume fresh hosts.")] = False,
    yes: c.YesOpt = False,
    as_json: c.JsonOpt = False,
    accept_new_host_keys: c.AcceptKeysOpt = False,
    debug: c.DebugOpt = False,
) -> None:
    """Run a runbook (playbooks/*.yaml or a built-in) with the same engine as up and down."""
    c.set_debug(debug)
    rb = load_runbook(runbook)
    inv = c.inventory(inventory)
    params = resolve_params(rb, c.parse_sets(set_))
    start = step_index(rb, from_) if from_ else 0
    if only:
        step_index(rb, only, "--only")
        if from_:
            raise InputError([Problem("--only/--from", "use one of them", "--only runs one step; --from resumes")])
    if offline and not dry_run:
        raise InputError(
            [
                Problem(
                    "--offline",
                    "plans as if hosts were fresh: it only goes with --dry-run",
                    "add --dry-run, or drop --offline to run against the hosts",
                )
            ]
        )
    if dry_run and offline:
        plan = offline_plan(inv, rb, params, start=start, only=only)
        c.echo(show_plan(plan, as_json, Secrets(rb.secret_values(params))))
        return
    execute(
        inv,
        rb,
        params,
        dry_run=dry_run,
        yes=yes,
        as_json=as_json,
        accept_new_host_keys=accept_new_host_keys,
        start=start,
        only=only,
    )


def register(app: typer.Typer) -> None:
    """These commands sit at the top level of `sparkctl`."""
    app.command("plan")(plan_cmd)
    app.command("up")(up_cmd)
    app.command("down")(down_cmd)
    app.command("restore-network")(restore_cmd)
    app.command("run")(run_cmd)
