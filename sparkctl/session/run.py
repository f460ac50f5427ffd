"""The run of a runbook against live hosts: lock, secrets, facts, plan, preflight, confirmation, sudo, apply,
journal, interrupts, release. `up`, `down`, `restore-network`, `run` and `plan` are this one function with
different requests; the CLI builds the request, answers the run's questions (`RunHooks`) and renders the outcome.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sparkctl import state
from sparkctl.inventory.models import Inventory
from sparkctl.plan.models import Plan
from sparkctl.runbook.models import Runbook
from sparkctl.session.door import session_for
from sparkctl.session.interrupts import INTERRUPTS
from sparkctl.session.lock import owner_here
from sparkctl.session.report import Event, Report
from sparkctl.session.secrets import Secrets
from sparkctl.session.session import Session, secrets_needed


@dataclass(frozen=True)
class RunRequest:
    """What to run, where, and how carefully."""

    inventory: Inventory
    runbook: Runbook
    params: dict[str, Any]
    command: str = ""
    """How the run names itself in the cluster lock (e.g. `sparkctl up`)."""
    dry_run: bool = False
    """Plan only: no lock, nothing applied."""
    start: int = 0
    only: str | None = None
    checks: bool = False
    """Run the preflight rules before applying (`up`)."""
    force: bool = False
    """Preflight failures that may be overridden are warnings."""
    partial: bool = False
    """Teardown: go on with the hosts that answer, fail at the end naming the others."""
    accept_new_host_keys: bool = False
    lock: bool = True
    """Take the cluster lock (a run that may change hosts; `bench serve` only reads and loads)."""
    confirm_plan: bool = True
    """Show the plan and ask before applying it (`bench serve` applies without asking)."""
    laptop: bool = False
    """Steps planned on `laptop` run as local processes (`bench serve --from laptop`)."""
    follow_logs: bool = False
    """Workload waits read the workload's log for progress events (a live view shows them)."""


@dataclass
class RunHooks:
    """What the run asks of its caller. The defaults answer as a non-interactive caller would."""

    emit: Callable[[Event], None] = lambda e: None
    show_plan: Callable[[Plan, Secrets], None] = lambda plan, hidden: None
    """The plan about to be applied (secrets hidden), before the confirmation."""
    confirm: Callable[[str], bool] = lambda message: False
    sudo_password: Callable[[], str | None] = lambda: None
    warn: Callable[[str], None] = lambda message: None
    applying: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext
    """Entered while the engine applies the plan (a live view draws then)."""


@dataclass
class RunOutcome:
    """The plan, and the report if it was applied; `hidden` holds the secret values to scrub from either."""

    plan: Plan
    hidden: Secrets
    report: Report | None = None
    declined: bool = False
    """The plan had changes and the caller did not confirm them."""
    locks_kept: list[str] = field(default_factory=list)


def run_runbook(req: RunRequest, hooks: RunHooks) -> RunOutcome:
    """Connect, lock, gather, plan, (confirm), apply, journal, release.

    A run that may change hosts takes the cluster lock on every host before anything else (dry runs do not). The
    lock is released however the run ends; where a host cannot be reached it stays, and `hooks.warn` says so.
    """
    inv, rb = req.inventory, req.runbook
    session = session_for(inv, req.accept_new_host_keys, emit=hooks.emit)
    session.follow_logs = req.follow_logs
    session.laptop = req.laptop
    run_id = state.new_run_id()
    locking = req.lock and not req.dry_run
    owner = owner_here(inv.cluster, run_id, req.command or f"sparkctl run {rb.name}") if locking else None
    outcome: RunOutcome | None = None
    with _interruptible(session):
        try:
            session.open(lock=owner, partial=req.partial and not req.dry_run)
            outcome = _plan_and_apply(session, req, hooks, run_id)
        finally:
            with INTERRUPTS.shielded("releasing the cluster lock"):
                kept = session.release()
                session.close()
            if kept:
                hooks.warn(
                    f"the cluster lock stays on {', '.join(kept)} (unreachable); the next run from this laptop "
                    "takes it over, another laptop needs `sparkctl unlock`"
                )
            if outcome is not None:
                outcome.locks_kept = kept
    assert outcome is not None  # an error in the run has been raised above
    return outcome


def _plan_and_apply(session: Session, req: RunRequest, hooks: RunHooks, run_id: str) -> RunOutcome:
    rb, params = req.runbook, req.params
    secrets = session.secrets_for_plan()
    plan = session.plan(rb, params, secrets, start=req.start, only=req.only)
    if not req.dry_run and secrets_needed(plan) - secrets.keys():
        # Only a run that applies a step needing a secret creates it (then plans again with it).
        secrets = session.secrets_for_plan(create=True)
        plan = session.plan(rb, params, secrets, start=req.start, only=req.only)
    hidden = Secrets({**secrets, **rb.secret_values(params)})
    if req.dry_run:
        return RunOutcome(plan, hidden)
    if req.checks:
        _preflight(session, req.force, hooks.warn)
    if req.confirm_plan:
        hooks.show_plan(plan, hidden)
        if plan.changes and not hooks.confirm(f"apply {plan.changes} change(s) to {req.inventory.cluster}?"):
            return RunOutcome(plan, hidden, declined=True)
    secrets = {**secrets, **session.check_sudo(plan, hooks.sudo_password)}
    with hooks.applying():
        report = session.apply(rb, plan, params, secrets, confirm=hooks.confirm, start=req.start, run_id=run_id)
    return RunOutcome(plan, Secrets({**secrets, **rb.secret_values(params)}), report)


def _preflight(session: Session, force: bool, warn: Callable[[str], None]) -> None:
    """The doctor's preflight rules over the facts just read: warnings said, a failure raised."""
    from sparkctl.doctor.evaluators import CheckContext
    from sparkctl.doctor.preflight import preflight

    warnings, stop = preflight(CheckContext(session.inventory, session.facts), force)
    for f in warnings:
        warn(f"{f.rule} {f.subject}: {f.evidence}")
    if stop:
        raise stop


@contextlib.contextmanager
def _interruptible(session: Session) -> Iterator[None]:
    """While the run is under way, a force quit journals it and says what it leaves behind."""
    INTERRUPTS.left_behind = lambda: _left_behind(session)
    INTERRUPTS.before_exit.append(session.journal_unfinished)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            INTERRUPTS.before_exit.remove(session.journal_unfinished)


def _left_behind(session: Session) -> str:
    """What a force quit leaves: for the warning printed before the process ends."""
    hosts = ", ".join(sorted(session.transports)) or "the hosts"
    return (
        f"the cleanup did not finish: Ray and workloads may still run on {hosts}, and this run's lock stays "
        "there (the next sparkctl run from this laptop takes it over); run `sparkctl down`"
    )
