"""plan, up, down, restore-network, run: the commands that plan and apply a runbook."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from sparkctl.cli import common as c
from sparkctl.cli.complete import complete_runbook
from sparkctl.errors import EXIT_FAILED, EXIT_INTERRUPTED, InputError, Problem

# Loaded when a command runs (see common.py): the models and the planner to plan; the session, the engine and
# the preflight rules only for commands that reach the hosts.
if TYPE_CHECKING:
    from collections.abc import Callable

    from sparkctl.cli.live import LiveProgress
    from sparkctl.inventory.models import Inventory
    from sparkctl.plan.models import Plan
    from sparkctl.runbook.models import Runbook
    from sparkctl.session.report import Event, Report
    from sparkctl.session.run import RunHooks
    from sparkctl.session.secrets import Secrets

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
    from sparkctl.cli.render import render_plan
    from sparkctl.plan.models import Plan

    shown = Plan.model_validate(secrets.scrub(plan.model_dump()))
    return shown.model_dump_json(indent=2) if as_json else render_plan(shown)


def show_report(report: Report, as_json: bool, secrets: Secrets) -> str:
    """The report as printed: the executed steps' commands may hold secret parameter values."""
    from sparkctl.cli.render import render_report
    from sparkctl.session.report import Report

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
    command: str = "",
    partial: bool = False,
    plain: bool = False,
) -> None:
    """Run a runbook (session/run.py) and render it. Shared by plan, up, down, run and restore-network.

    On a terminal (both stdout and stderr, without --plain or --json) the run shows as a live view and ends with a
    recap; otherwise the same events print as plain lines.
    """
    from sparkctl.cli.render import Progress
    from sparkctl.session.run import RunRequest, run_runbook

    live = None if dry_run else c.live_view(plain, as_json)
    req = RunRequest(
        inv,
        rb,
        dict(params),
        command=command,
        dry_run=dry_run,
        start=start,
        only=only,
        checks=checks,
        force=force,
        partial=partial,
        accept_new_host_keys=accept_new_host_keys,
        follow_logs=live is not None,
    )
    outcome = run_runbook(req, _hooks(inv, live or Progress(quiet=False), live, yes, as_json))
    if outcome.report is None:
        if outcome.declined:
            raise typer.Exit(EXIT_FAILED)
        c.echo(show_plan(outcome.plan, as_json, outcome.hidden))
        return
    _show_outcome(outcome.report, outcome.hidden, live, as_json)


def _show_outcome(report: Report, hidden: Secrets, live: LiveProgress | None, as_json: bool) -> None:
    """The applied run's report (the live view's recap, or plain/JSON), its benches, and its exit code."""
    if live is not None:
        from sparkctl.cli.live import print_report
        from sparkctl.cli.render import render_report_details
        from sparkctl.session.report import Report

        shown = Report.model_validate(hidden.scrub(report.model_dump()))
        print_report(shown, "\n".join(render_report_details(shown)), live)
    else:
        c.echo(show_report(report, as_json, hidden))
    if not as_json:
        _show_benches(report)
    if report.interrupted:
        raise typer.Exit(EXIT_INTERRUPTED)
    if not report.ok or report.journal_error:
        raise typer.Exit(EXIT_FAILED)


def _hooks(
    inv: Inventory, emit: Callable[[Event], None], live: LiveProgress | None, yes: bool, as_json: bool
) -> RunHooks:
    """The run's questions answered on this terminal: the plan shown before confirming (not with --json), a
    confirmation paused out of the live view, the sudo password from env, file or one prompt."""
    from sparkctl.session.run import RunHooks

    def confirm(message: str) -> bool:
        if live is None:
            return c.confirm(message, yes)
        with live.paused():
            return c.confirm(message, yes)

    return RunHooks(
        emit=emit,
        show_plan=lambda plan, hidden: None if as_json else c.echo(show_plan(plan, False, hidden)),
        confirm=confirm,
        sudo_password=lambda: c.sudo_password(inv),
        warn=lambda message: c.echo(f"warning: {message}", err=True),
        applying=lambda: c.drawing(live),
    )


def _show_benches(report: Report) -> None:
    """A run that benchmarked workloads (bench_serve steps, e.g. playbooks/compare-layouts.yaml) ends with the
    results side by side."""
    from sparkctl.cli.render import render_bench_table
    from sparkctl.session.reports import summarise_bench_serve

    rows = [r for r in summarise_bench_serve(report)["results"] if "error" not in r]
    if rows:
        c.echo("bench serve results (all runs: sparkctl bench history)")
        c.echo(render_bench_table(rows))


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
    from sparkctl.runbook.load import load_runbook, resolve_params

    inv = c.start(debug, inventory)
    rb = load_runbook("up")
    params = resolve_params(rb, {}) | {"workloads": _workloads(inv, workload)}
    if offline:
        from sparkctl.runbook.planner import offline_plan
        from sparkctl.session.laptop import check_laptop_files
        from sparkctl.session.secrets import Secrets

        check_laptop_files(inv)
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
    plain: c.PlainOpt = False,
    debug: c.DebugOpt = False,
) -> None:
    """Configure the fabric and env, form Ray where a workload needs it, start the workloads, wait until they answer."""
    from sparkctl.runbook.load import load_runbook, resolve_params

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
        command="sparkctl up",
        plain=plain,
    )


@c.guard
def down_cmd(
    inventory: c.InventoryOpt = None,
    as_json: c.JsonOpt = False,
    accept_new_host_keys: c.AcceptKeysOpt = False,
    plain: c.PlainOpt = False,
    debug: c.DebugOpt = False,
) -> None:
    """Stop workloads and Ray on every host and check nothing is left. The network stays configured.

    Hosts that cannot be reached are named (exit 1); the others are stopped anyway.
    """
    from sparkctl.runbook.load import load_runbook

    inv = c.start(debug, inventory)
    execute(
        inv,
        load_runbook("down"),
        {},
        dry_run=False,
        yes=True,
        as_json=as_json,
        accept_new_host_keys=accept_new_host_keys,
        command="sparkctl down",
        partial=True,
        plain=plain,
    )


@c.guard
def unlock_cmd(
    inventory: c.InventoryOpt = None,
    yes: c.YesOpt = False,
    accept_new_host_keys: c.AcceptKeysOpt = False,
    debug: c.DebugOpt = False,
) -> None:
    """Break a stale cluster lock: show who holds each host, then remove it. Only for a run that is dead."""
    from sparkctl.session.unlock import unlock

    inv = c.start(debug, inventory)
    unlock(
        inv,
        accept_new_host_keys,
        say=c.echo,
        warn=lambda m: c.echo(f"warning: {m}", err=True),
        confirm=lambda m: c.confirm(m, yes),
    )


@c.guard
def restore_cmd(
    inventory: c.InventoryOpt = None,
    yes: c.YesOpt = False,
    as_json: c.JsonOpt = False,
    accept_new_host_keys: c.AcceptKeysOpt = False,
    plain: c.PlainOpt = False,
    debug: c.DebugOpt = False,
) -> None:
    """Put the twins back as before sparkctl: delete its profiles, re-enable the ones it disabled."""
    from sparkctl.runbook.load import load_runbook

    inv = c.start(debug, inventory)
    execute(
        inv,
        load_runbook("restore-network"),
        {},
        dry_run=False,
        yes=yes,
        as_json=as_json,
        accept_new_host_keys=accept_new_host_keys,
        command="sparkctl restore-network",
        plain=plain,
    )


@c.guard
def run_cmd(
    runbook: Annotated[str, typer.Argument(help="Runbook file, or a built-in name.", autocompletion=complete_runbook)],
    inventory: c.InventoryOpt = None,
    dry_run: c.DryRunOpt = False,
    set_: c.SetOpt = None,
    from_: Annotated[str | None, typer.Option("--from", help="Start at this step.")] = None,
    only: Annotated[str | None, typer.Option("--only", help="Run only this step.")] = None,
    offline: Annotated[bool, typer.Option("--offline", help="With --dry-run: assume fresh hosts.")] = False,
    yes: c.YesOpt = False,
    as_json: c.JsonOpt = False,
    accept_new_host_keys: c.AcceptKeysOpt = False,
    plain: c.PlainOpt = False,
    debug: c.DebugOpt = False,
) -> None:
    """Run a runbook (playbooks/*.yaml or a built-in) with the same engine as up and down."""
    from sparkctl.runbook.load import load_runbook, resolve_params, step_index

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
        from sparkctl.runbook.planner import offline_plan
        from sparkctl.session.laptop import check_laptop_files
        from sparkctl.session.secrets import Secrets

        check_laptop_files(inv)
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
        command=f"sparkctl run {rb.name}",
        plain=plain,
    )


def register(app: typer.Typer) -> None:
    """These commands sit at the top level of `sparkctl`."""
    app.command("plan")(plan_cmd)
    app.command("up")(up_cmd)
    app.command("down")(down_cmd)
    app.command("unlock")(unlock_cmd)
    app.command("restore-network")(restore_cmd)
    app.command("run")(run_cmd)
