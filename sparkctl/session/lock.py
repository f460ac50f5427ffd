"""The cluster lock: a directory on every host, taken atomically before a run changes anything there.

The lock lives on the hosts, not on the laptop, so two laptops managing one cluster exclude each other too.
Taking it is one rename(2): the owner record is written into a private temporary directory first, which is
then renamed onto the lock path; rename refuses a non-empty target (ENOTEMPTY), so exactly one run wins and
the record is complete the moment the lock exists. It sits in /run/lock (FHS 3.0 "/run/lock: Lock files"; on
Debian and Ubuntu a world-writable sticky tmpfs: Debian systemd patch "Make /run/lock tmpfs an API fs", Debian
bug #751392), so a reboot frees it, any login user can take it, and it never shows as drift in a plan.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from sparkctl import paths
from sparkctl.errors import HostError, Problem
from sparkctl.execute.base import Result, Transport
from sparkctl.session.gather import PROBE_TIMEOUT

TAKEN = "@@sparkctl-lock taken"
HELD = "@@sparkctl-lock held"
FREE = "@@sparkctl-lock free"
_FIELDS = ("cluster", "user", "laptop", "pid", "run_id", "since", "command")
TIMEOUT = 20
"""Seconds a lock command may take on a host."""


class LockHeld(HostError):
    """Another run holds the cluster lock on a host; nothing was changed."""


@dataclass(frozen=True)
class LockOwner:
    """Who holds the lock: user@laptop, process, run id, since when, doing what."""

    cluster: str
    user: str
    laptop: str
    pid: int
    run_id: str
    since: float
    command: str

    def to_text(self) -> str:
        """The owner record: one key=value line per field (values on one line, printable)."""
        return "".join(f"{k}={_one_line(str(v))}\n" for k, v in asdict(self).items())

    @classmethod
    def parse(cls, text: str) -> LockOwner | None:
        """An owner record, or None if it is not one (a lock left half-written by hand, say)."""
        values = dict(line.partition("=")[::2] for line in text.splitlines() if "=" in line)
        if not set(_FIELDS) <= values.keys():
            return None
        try:
            return cls(
                cluster=values["cluster"],
                user=values["user"],
                laptop=values["laptop"],
                pid=int(values["pid"]),
                run_id=values["run_id"],
                since=float(values["since"]),
                command=values["command"],
            )
        except ValueError:
            return None

    def describe(self, now: float | None = None) -> str:
        """E.g. `ana@lap1 (pid 42, run 20261130-101500-ab12, sparkctl up) since 2026-11-30 10:15:00 UTC (3 min ago)`."""
        now = time.time() if now is None else now
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        return (
            f"{self.user}@{self.laptop} (pid {self.pid}, run {self.run_id}, {self.command}) "
            f"since {stamp} ({_ago(now - self.since)})"
        )


def _one_line(text: str) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in text)[:200]


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s} s ago"
    if s < 7200:
        return f"{s // 60} min ago"
    return f"{s // 3600} h ago"


def owner_here(cluster: str, run_id: str, command: str) -> LockOwner:
    """The owner record of this process."""
    try:
        import getpass

        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return LockOwner(cluster, user, os.uname().nodename, os.getpid(), run_id, round(time.time(), 3), command)


def build_take(owner: LockOwner, then: str = "exit 0") -> str:
    """Shell: take the lock (print TAKEN, then run `then`) or print HELD and the holder's record. Changes nothing if
    held. `then="exec sh -s"` runs the script sent on stdin right after the lock is taken, in the same round trip
    (the fact probe: read under the lock)."""
    d = shlex.quote(paths.LOCK_DIR)
    parent = shlex.quote(os.path.dirname(paths.LOCK_DIR))
    template = shlex.quote(os.path.dirname(paths.LOCK_DIR) + "/.sparkctl-lock.XXXXXX")
    return (
        f"t=$(mktemp -d {template}) || {{ echo 'cannot write in '{parent} >&2; exit 3; }}; "
        f'printf \'%s\' {shlex.quote(owner.to_text())} > "$t/owner" && chmod 0755 "$t" && chmod 0644 "$t/owner" '
        f'|| {{ rm -rf -- "$t"; exit 3; }}; '
        # rename(2) onto a non-empty directory fails: the one atomic step that decides who holds the cluster.
        f'if mv -T -- "$t" {d} 2>/dev/null; then echo {shlex.quote(TAKEN)}; {then}; fi; '
        f'rm -rf -- "$t"; echo {shlex.quote(HELD)}; cat -- {d}/owner 2>/dev/null; exit 0'
    )


def build_release(run_id: str) -> str:
    """Shell: remove the lock if (and only if) this run holds it."""
    d = shlex.quote(paths.LOCK_DIR)
    return f"grep -qxF -- {shlex.quote('run_id=' + run_id)} {d}/owner 2>/dev/null && rm -rf -- {d}; true"


def build_break(run_id: str | None) -> str:
    """Shell: remove the lock held by `run_id` (None: whatever holds it, for a record that cannot be read)."""
    d = shlex.quote(paths.LOCK_DIR)
    if run_id is None:
        return f"rm -rf -- {d}"
    return f"if grep -qxF -- {shlex.quote('run_id=' + run_id)} {d}/owner 2>/dev/null; then rm -rf -- {d}; fi"


def build_read() -> str:
    """Shell: print FREE, or HELD and the holder's record."""
    d = shlex.quote(paths.LOCK_DIR)
    held, free = shlex.quote(HELD), shlex.quote(FREE)
    return f"if [ -e {d} ]; then echo {held}; cat -- {d}/owner 2>/dev/null; else echo {free}; fi"


def parse_answer(stdout: str) -> tuple[str, LockOwner | None]:
    """('taken' | 'held' | 'free' | '', holder record) from the output of build_take or build_read."""
    lines = stdout.splitlines()
    for i, line in enumerate(lines):
        if line == TAKEN:
            return "taken", None
        if line == FREE:
            return "free", None
        if line == HELD:
            return "held", LockOwner.parse("\n".join(lines[i + 1 :]))
    return "", None


def pid_alive(pid: int) -> bool:
    """Whether a process of this laptop with that pid exists (a process we may not signal exists too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale_here(holder: LockOwner, me: LockOwner, alive: Callable[[int], bool] = pid_alive) -> bool:
    """A lock left by an earlier run of this user on this laptop whose process is gone (killed, force-quit)."""
    return holder.user == me.user and holder.laptop == me.laptop and holder.pid != me.pid and not alive(holder.pid)


# --- taking and releasing it over the hosts' connections ------------------------------------------------


def take_locks(
    transports: Mapping[str, Transport],
    order: Sequence[str],
    me: LockOwner,
    note: Callable[[str], None] = lambda m: None,
    alive: Callable[[int], bool] = pid_alive,
    probe: Callable[[str], str] | None = None,
    probed: dict[str, Result] | None = None,
) -> list[str]:
    """Take the lock on every host in `order`: the first host alone, then all the others at once.

    The first host's lock decides between racing runs of one cluster (taking it is one atomic rename): only the run
    that holds it goes on to the others, so of two racing runs exactly one gets them all and the other takes none.
    Taking the others side by side costs one round trip however many hosts there are. Returns the hosts now locked.
    If a host is held by another run (say, one of another inventory that shares it), the locks taken so far are
    released and LockHeld names every holder. A lock left by a dead run of this user on this laptop is taken over
    (said so).

    With `probe` (host -> the fact probe script), each host's facts are read as soon as its lock is held, into
    `probed`: the first host's beside the others' locks, and on every other host in the same round trip as taking
    its lock. A host missing from `probed` (its probe failed, or a dead run's lock was taken over) is probed later.
    """
    taken: list[str] = []
    probed = {} if probed is None else probed
    try:
        if not order:
            return taken
        _take_host(transports[order[0]], order[0], me, note, alive)
        taken.append(order[0])
        rest = list(order[1:])
        if not rest and probe is None:
            return taken

        def first_facts(script: str) -> None:
            with contextlib.suppress(HostError):  # read again (and reported) by the gather that follows
                probed[order[0]] = transports[order[0]].run("sh -s", stdin=script, timeout=PROBE_TIMEOUT)

        def one(host: str) -> Exception | None:
            try:
                got = _take_host(transports[host], host, me, note, alive, probe(host) if probe else None)
            except Exception as exc:  # handed back, raised below once every lock taken is released
                return exc
            taken.append(host)  # at once, so that an interrupt meanwhile still releases it
            if got is not None:
                probed[host] = got
            return None

        with ThreadPoolExecutor(max_workers=len(rest) + 1) as pool:
            reading = pool.submit(first_facts, probe(order[0])) if probe is not None else None
            errors = [e for e in pool.map(one, rest) if e is not None]
            if reading is not None:
                reading.result()
        for e in errors:
            if not isinstance(e, HostError):
                raise e
        if errors:
            problems = [p for e in errors if isinstance(e, HostError) for p in e.problems]
            raise LockHeld(problems) if all(isinstance(e, LockHeld) for e in errors) else HostError(problems)
    except BaseException:
        release_locks(transports, taken, me.run_id)
        raise
    return sorted(taken, key=list(order).index)


def _take_host(
    t: Transport,
    host: str,
    me: LockOwner,
    note: Callable[[str], None],
    alive: Callable[[int], bool],
    script: str | None = None,
) -> Result | None:
    """Take the lock on one host, taking over a dead run's of this laptop; raise LockHeld if another run holds it.

    With `script`, it runs on the host right after the lock is taken, in the same command: its result is returned
    (None when it did not run: the lock was taken over, or no script)."""
    holder, result = _take_one(t, host, me, script)
    if holder is not None and is_stale_here(holder, me, alive):
        t.run(build_break(holder.run_id), timeout=TIMEOUT)
        note(f"{host}: took over the lock left by run {holder.run_id} (pid {holder.pid} no longer runs here)")
        holder, result = _take_one(t, host, me)
    if holder is not None:
        raise LockHeld(
            [
                Problem(
                    host,
                    f"the cluster is locked by {holder.describe()}; nothing was changed",
                    "wait for that run to end; if it is dead (its laptop crashed or lost the network), "
                    "break the lock with `sparkctl unlock`",
                )
            ]
        )
    return result


def _take_one(
    t: Transport, host: str, me: LockOwner, script: str | None = None
) -> tuple[LockOwner | None, Result | None]:
    """(None, the script's result if one ran) when taken by `me`; else (the holder, None); a placeholder record if
    the holder's cannot be read."""
    if script is None:
        r = t.run(build_take(me), timeout=TIMEOUT)
    else:
        r = t.run(build_take(me, then="exec sh -s"), stdin=script, timeout=max(TIMEOUT, PROBE_TIMEOUT))
    status, holder = parse_answer(r.stdout)
    if status == "taken":
        return None, r if script is not None else None
    if status != "held":
        raise HostError(
            [
                Problem(
                    host,
                    f"could not take the cluster lock {paths.LOCK_DIR} (exit {r.exit_code}): {r.stderr.strip()[-200:]}",
                    "the login user must be able to write in /run/lock (Ubuntu: a tmpfs, mode 1777)",
                )
            ]
        )
    if holder is None:
        return LockOwner("?", "?", "an unknown laptop", 0, "?", 0.0, "unreadable lock record"), None
    if holder.run_id == me.run_id:
        return None, None  # this run already holds it
    return holder, None


def release_locks(transports: Mapping[str, Transport], hosts: Sequence[str], run_id: str) -> list[str]:
    """Release this run's lock on each host; returns the hosts where that failed (unreachable).

    All hosts at once: unlike taking (one host after the other, so that of two racing runs one gets them all),
    releasing has no order to keep.
    """

    def one(host: str) -> bool:
        t = transports.get(host)
        try:
            if t is None:
                raise HostError(f"{host}: not connected")
            t.run(build_release(run_id), timeout=TIMEOUT)
        except HostError:
            return False
        return True

    if not hosts:
        return []
    with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
        released = list(pool.map(one, hosts))
    return [h for h, ok in zip(hosts, released, strict=True) if not ok]
