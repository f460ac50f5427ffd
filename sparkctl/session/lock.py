"""The cluster lock: a directory on every host, taken atomically before a run changes anything there.

The lock lives on the hosts, not on the laptop, so two laptops managing one cluster exclude each other too.
Taking it is one rename(2): the owner record is written into a private temporary directory first, which is
then renamed onto the lock path; rename refuses a non-empty target (ENOTEMPTY), so exactly one run wins and
the record is complete the moment the lock exists. It sits in /run/lock (FHS 3.0 "/run/lock: Lock files"; on
Debian and Ubuntu a world-writable sticky tmpfs: Debian systemd patch "Make /run/lock tmpfs an API fs", Debian
bug #751392), so a reboot frees it, any login user can take it, and it never shows as drift in a plan.
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from sparkctl import paths
from sparkctl.errors import HostError

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
