"""Read-only steps that commands run through the session's engine: doctor's jumbo pings and `logs`."""

from __future__ import annotations

from sparkctl import paths
from sparkctl.errors import HostError, Problem
from sparkctl.inventory.models import Inventory
from sparkctl.plan.context import PlanContext
from sparkctl.plan.models import Command, Step
from sparkctl.plan.ray_stages import plan_verify_fabric
from sparkctl.session import door
from sparkctl.session.session import Session

Link = tuple[str, str, str]
"""(host, twin interface, peer address) of one jumbo-ping direction."""

PING_TIMEOUT = 20


def measure_jumbo(session: Session) -> dict[Link, tuple[bool, str]]:
    """The unfragmented pings `up` verifies with, once per direction (no retries), all hosts in parallel."""
    ctx = PlanContext(session.inventory, session.facts)
    steps = [
        s.model_copy(
            update={"wait": None, "commands": [c.model_copy(update={"timeout": PING_TIMEOUT}) for c in s.commands]}
        )
        for h in session.inventory.hosts
        if h.name in session.transports  # from every host read (towards every peer, read or not)
        for s in plan_verify_fabric(ctx, h)
    ]
    argv = {(s.host, s.id): s.commands[0].argv for s in steps}
    results: dict[Link, tuple[bool, str]] = {}
    for r in session.read(steps, name="jumbo").results:
        cmd = argv[(r.host, r.step)]
        out = r.commands[-1] if r.commands else None
        summary = next((ln for ln in out.stdout.splitlines() if "packet loss" in ln), "") if out else ""
        err = out.stderr.strip().splitlines()[-1] if out and out.stderr.strip() else ""
        code = f"exit {out.exit_code}" if out else r.error
        results[(r.host, cmd[-2], cmd[-1])] = (r.status == "ok", summary or err or code)
    return results


def read_log(session: Session, host: str, name: str, *, lines: int, follow: bool = False) -> str:
    """The last `lines` of Ray's or a workload's log on `host` (with `follow`, until interrupted)."""
    path = paths.log_path(session.facts[host].home, name)
    step = Step(
        host=host,
        kind="read_log",
        target=name,
        description=f"the last {lines} lines of {path}",
        changes=False,
        commands=[
            Command(argv=["tail", "-n", str(lines), *(["-F"] if follow else []), path], timeout=10**6 if follow else 30)
        ],
    )
    result = session.read([step], name="logs", output_lines=lines).results[0]
    if result.status == "failed":
        raise HostError([Problem(host, result.error, f"the log of {name} appears once `up` has started it")])
    return result.commands[-1].stdout


def host_log(inv: Inventory, accept_new_host_keys: bool, host: str, name: str, *, lines: int, follow: bool) -> str:
    """`logs`: the log of Ray or a workload on `host`, through a session of its own."""
    session = door.open_session(inv, accept_new_host_keys)
    try:
        return read_log(session, host, name, lines=lines, follow=follow)
    finally:
        session.close()
