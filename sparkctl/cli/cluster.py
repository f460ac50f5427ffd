"""plan, up, down, restore-network, run: everything that plans and applies a runbook."""

from __future__ import annotations

from typing import Annotated

import typer

from sparkctl.cli import common as c
from sparkctl.cli.render import Progress, render_plan, render_report
from sparkctl.errors import EXIT_FAILED, EXIT_INTERRUPTED, HostError, InputError, Problem
from sparkctl.inventory.models import Inventory
from sparkctl.plan.context import PlanContext, fresh_facts
from sparkctl.plan.models import Plan
from sparkctl.runbook.engine import Report, Secrets
from sparkctl.runbook.load import load_runbook, resolve_params, step_index
from sparkctl.runbook.models import Runbook
from sparkctl.runbook.planner import build_runbook_plan
from sparkctl.runbook.session import Session, sha256, ssh_connect, worker_code

SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Runbook parameter: --set name=value (repeatable).")]
WorkloadOpt = Annotated[list[str] | None, typer.Option("--workload", "-w", help="Only this workload (repeatable).")]


def _parse_sets(sets: list[str] | None) -> dict[str, str]:
    out = {}
    for item in sets or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise InputError([Problem(f"--set {item}", "expected name=value", "e.g. --set model=Qwen/Qwen3-8B")])
        out[key.strip()] = value
    return out


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
                    f"did you mean '{close[0]}'?" if (close := difflib.get_close_matches(n, known, n=1))
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


def offline_plan(
    inv: Inventory, rb: Runbook, params: dict[str, object], *, start: int = 0, only: str | None = None
) -> Plan:
    """A plan against fresh hosts, contacting nobody and reading no secrets (digests are placeholders)."""
    facts = {h.name: fresh_facts(inv, h) for h in inv.hosts}
    ctx = PlanContext(
        inv, facts, params, {"ray_token": "(generated on first up)", "worker_code": sha256(worker_code())}, offline=True
    )
    return build_runbook_plan(rb, ctx, params, start=start, only=only, offline=True)


def preflight(session: Session, force: bool) -> None:
    """Fail-level preflight rules stop `up` before anything changes (--force overrides the safe ones)."""
    from sparkctl.doctor.evaluate import blocking, evaluate
    from sparkctl.doctor.evaluators import CheckContext

    findings = evaluate(CheckContext(session.inventory, session.facts), preflight_only=True)
    for f in findings:
        if f.level != "pass" and f not in blocking(findings, force):
            c.echo(f"warning: {f.rule} {f.subject}: {f.evidence}", err=True)
    stop = blocking(findings, force)
    if stop:
        raise HostError(
            [
                Problem(
                    f"{f.subject} [{f.rule}]",
                    f.evidence,
                    f.fix + ("" if f.force_ok else " (--force cannot override this)"),
                )
                for f in stop
            ],
            hint="nothing was changed",
        )


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
    c.check_secret_files(inv)
    progress = Progress(quiet=False)
    session = Session(inv, ssh_connect(accept_new_host_keys), emit=progress)
    try:
        session.open()
        secrets = session.secrets_for_plan()
        plan = session.plan(rb, params, secrets, start=start, only=only)
        if checks and not dry_run:
            preflight(session, force)
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
        if report.interrupted and rb.name == "up":
            _stop_after_interrupt(session, secrets)
        c.echo(show_report(report, as_json, Secrets({**secrets, **rb.secret_values(params)})))
        if report.interrupted:
            raise typer.Exit(EXIT_INTERRUPTED)
        if not report.ok:
            raise typer.Exit(EXIT_FAILED)
    finally:
        session.close()


def _stop_after_interrupt(session: Session, secrets: dict[str, str]) -> None:
    """Ctrl-C during up: stop what the run may have started, so no worker is left behind."""
    c.echo("interrupted: running `down` so no worker is left behind", err=True)
    down = load_runbook("down")
    session.gather()
    plan = session.plan(down, {}, secrets)
    session.apply(down, plan, {}, secrets)


def register(app: typer.Typer) -> None:
    @app.command("plan")
    @c.guard
    def plan_cmd(
        inventory: c.InventoryOpt = None,
        offline: Annotated[
            bool, typer.Option("--offline", help="Plan as if the hosts were fresh, without contacting them.")
        ] = False,
        workload: WorkloadOpt = None,
        as_json: c.JsonOpt = False,
        accept_new_host_keys: c.AcceptKeysOpt = False,
        debug: c.DebugOpt = False,
    ) -> None:
        """Show what `up` would change on every host: steps, exact commands, diffs. Changes nothing."""
        c.set_debug(debug)
        inv = c.inventory(inventory)
        rb = load_runbook("up")
        params = resolve_params(rb, {}) | {"workloads": _workloads(inv, workload)}
        if offline:
            plan = offline_plan(inv, rb, params)
            c.echo(show_plan(plan, as_json, Secrets(rb.secret_values(params))))
            return
        execute(inv, rb, params, dry_run=True, yes=False, as_json=as_json, accept_new_host_keys=accept_new_host_keys)

    @app.command("up")
    @c.guard
    def up_cmd(
        inventory: c.InventoryOpt = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show the plan.")] = False,
        yes: c.YesOpt = False,
        workload: WorkloadOpt = None,
        as_json: c.JsonOpt = False,
        force: Annotated[
            bool,
            typer.Option(
                "--force",
                help="Override preflight failures that are safe to override (e.g. an unexpected GPU or driver).",
            ),
        ] = False,
        accept_new_host_keys: c.AcceptKeysOpt = False,
        debug: c.DebugOpt = False,
    ) -> None:
        """Configure the fabric and env, form Ray, start the workloads and wait until they answer."""
        c.set_debug(debug)
        inv = c.inventory(inventory)
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

    @app.command("down")
    @c.guard
    def down_cmd(
        inventory: c.InventoryOpt = None,
        as_json: c.JsonOpt = False,
        accept_new_host_keys: c.AcceptKeysOpt = False,
        debug: c.DebugOpt = False,
    ) -> None:
        """Stop workloads and Ray on every host and check nothing is left. The network stays configured."""
        c.set_debug(debug)
        inv = c.inventory(inventory)
        execute(
            inv,
            load_runbook("down"),
            {},
            dry_run=False,
            yes=True,
            as_json=as_json,
            accept_new_host_keys=accept_new_host_keys,
        )

    @app.command("restore-network")
    @c.guard
    def restore_cmd(
        inventory: c.InventoryOpt = None,
        yes: c.YesOpt = False,
        as_json: c.JsonOpt = False,
        accept_new_host_keys: c.AcceptKeysOpt = False,
        debug: c.DebugOpt = False,
    ) -> None:
        """Put the twins back as before sparkctl: delete its profiles, re-enable the ones it disabled."""
        c.set_debug(debug)
        inv = c.inventory(inventory)
        execute(
            inv,
            load_runbook("restore-network"),
            {},
            dry_run=False,
            yes=yes,
            as_json=as_json,
            accept_new_host_keys=accept_new_host_keys,
        )

    @app.command("run")
    @c.guard
    def run_cmd(
        runbook: Annotated[str, typer.Argument(help="Runbook file, or a built-in name.")],
        inventory: c.InventoryOpt = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show the plan.")] = False,
        set_: SetOpt = None,
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
        params = resolve_params(rb, _parse_sets(set_))
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
