"""The one place the testbed runs commands on the machine itself."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence

CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class TestbedError(RuntimeError):
    """The testbed could not do what was asked; the message says what and how to fix it."""

    __test__ = False  # not a pytest test class despite the name


class CommandError(TestbedError, subprocess.CalledProcessError):
    """A command failed; str() includes its output, unlike CalledProcessError's."""

    def __init__(self, result: subprocess.CompletedProcess[str], where: str = "") -> None:
        subprocess.CalledProcessError.__init__(self, result.returncode, result.args, result.stdout, result.stderr)
        self.where = where

    def __str__(self) -> str:
        argv = self.cmd if isinstance(self.cmd, str) else " ".join(map(str, self.cmd))
        where = f" on {self.where}" if self.where else ""
        parts = [f"command failed{where} (exit {self.returncode}): {argv}"]
        if self.stdout and self.stdout.strip():
            parts.append(f"stdout: {self.stdout.strip()[-2000:]}")
        if self.stderr and self.stderr.strip():
            parts.append(f"stderr: {self.stderr.strip()[-2000:]}")
        return "\n".join(parts)


def clean_env(**extra: str) -> dict[str, str]:
    """A minimal environment, so nothing of the caller's (pyenv, virtualenvs) leaks into hosts."""
    env = {"PATH": CLEAN_PATH, "LANG": "C.UTF-8", "HOME": "/root", "TERM": "dumb"}
    env.update(extra)
    return env


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    input: str | None = None,
    timeout: float = 60,
    env: dict[str, str] | None = None,
    where: str = "",
) -> subprocess.CompletedProcess[str]:
    """Run argv, capture text output; raise CommandError on failure when check is set."""
    result = subprocess.run(
        list(argv),
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env if env is not None else clean_env(),
        stdin=None if input is not None else subprocess.DEVNULL,
    )
    if check and result.returncode != 0:
        raise CommandError(result, where)
    return result


def require_root() -> None:
    if os.geteuid() != 0:
        raise TestbedError(
            "the testbed needs root (network namespaces, mounts, veth links)\n"
            "hint: run as root, e.g. sudo python -m tests.testbed up"
        )


def proc_start_time(pid: int) -> int | None:
    """Start time (clock ticks since boot) of a live, non-zombie process, or None."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def pid_alive(pid: int, start_time: int | None) -> bool:
    """True when pid runs and is the same process that was recorded (guards PID reuse)."""
    now = proc_start_time(pid)
    return now is not None and (start_time is None or now == start_time)


def children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(x) for x in fh.read().split()]
    except OSError:
        return []
