"""`sparkctl unlock`: show who holds the cluster lock on each host, and break it where the user confirms."""

from __future__ import annotations

import time
from collections.abc import Callable

from sparkctl.errors import HostError, Problem
from sparkctl.inventory.models import Inventory
from sparkctl.session.door import session_for
from sparkctl.session.lock import LockOwner, build_break, build_read, is_stale_here, owner_here, parse_answer
from sparkctl.session.session import Session


def unlock(
    inv: Inventory,
    accept_new_host_keys: bool,
    *,
    say: Callable[[str], None],
    warn: Callable[[str], None],
    confirm: Callable[[str], bool],
) -> None:
    """Show the lock on every reachable host, confirm, and remove it where it is still the one shown.

    Hosts that cannot be reached are named at the end (HostError); the lock there, if any, stays."""
    session = session_for(inv, accept_new_host_keys)
    try:
        session.open(partial=True)
        held = _read_locks(session, say, warn)
        if held and confirm(f"break the lock on {', '.join(held)}?"):
            _break_locks(session, held, say)
        if session.unreachable:
            raise HostError(
                [p for ps in session.unreachable.values() for p in ps],
                hint="the lock there (if any) stays; run `sparkctl unlock` again once the host is reachable",
            )
    finally:
        session.close()


def _read_locks(
    session: Session, say: Callable[[str], None], warn: Callable[[str], None]
) -> dict[str, LockOwner | None]:
    """Each reachable host's lock, said as read; returns the held ones and their holders (None: unreadable)."""
    inv = session.inventory
    me = owner_here(inv.cluster, "-", "sparkctl unlock")
    held: dict[str, LockOwner | None] = {}
    for host in [h.name for h in inv.hosts if h.name in session.transports]:
        status, holder = parse_answer(session.transports[host].run(build_read(), timeout=20).stdout)
        if status == "held":
            held[host] = holder
            who = holder.describe(time.time()) if holder else "an unreadable lock record"
            say(f"{host}: locked by {who}")
            if holder and holder.user == me.user and holder.laptop == me.laptop and not is_stale_here(holder, me):
                warn(f"{host}: pid {holder.pid} still runs on this laptop: is that run alive?")
        elif status == "free":
            say(f"{host}: not locked")
        else:
            raise HostError([Problem(host, "could not read the cluster lock", "check the host's /run/lock")])
    return held


def _break_locks(session: Session, held: dict[str, LockOwner | None], say: Callable[[str], None]) -> None:
    """Remove each lock, only if it is still the run shown (a lock taken since is left alone)."""
    failed = []
    for host, holder in held.items():
        r = session.transports[host].run(build_break(holder.run_id if holder else None), timeout=20)
        if not r.ok:
            failed.append(
                Problem(
                    host,
                    f"could not remove the lock: {r.stderr.strip()[-200:]}",
                    "it belongs to another login user: remove it there with sudo rm -rf /run/lock/sparkctl",
                )
            )
        else:
            say(f"{host}: lock removed")
    if failed:
        raise HostError(failed)
