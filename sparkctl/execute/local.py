"""Local processes: the only place sparkctl starts a subprocess (tests, and laptop-side tools such as ssh)."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable

from sparkctl.errors import Problem
from sparkctl.execute.base import CommandTimeout, Result

log = logging.getLogger("sparkctl.local")


class LocalTransport:
    """The Transport protocol on this machine: every command line runs under `sh -c`."""

    def __init__(self, host: str = "localhost") -> None:
        self.host = host

    def run(
        self,
        command: str,
        *,
        stdin: str | None = None,
        timeout: float,
        on_output: Callable[[str], None] | None = None,
    ) -> Result:
        """Run a shell command line here, feed `stdin` then EOF, and wait at most `timeout` seconds (`on_output` is
        not called: local commands are short)."""
        return _run(["sh", "-c", command], label=command, host=self.host, stdin=stdin, timeout=timeout)

    def close(self) -> None:
        """Nothing to close."""


def run_local(argv: list[str], *, timeout: float, stdin: str | None = None) -> Result:
    """Run a program here (no shell), feed `stdin` then EOF, and wait at most `timeout` seconds.

    A program that cannot be started gives exit code 127 (not found) or 126 (not executable), as in a shell.
    """
    return _run(argv, label=shlex.join(argv), host="localhost", stdin=stdin, timeout=timeout)


def _run(argv: list[str], *, label: str, host: str, stdin: str | None, timeout: float) -> Result:
    started = time.monotonic()
    log.debug("%s: run%s: %s", host, " (with stdin)" if stdin is not None else "", label)
    try:
        proc = subprocess.Popen(
            argv,
            # Never the terminal's stdin: a command that reads it would hang or eat the user's keystrokes.
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            # Its own process group, so a timeout can stop everything the command started.
            start_new_session=True,
        )
    except OSError as exc:
        code = 127 if isinstance(exc, FileNotFoundError) else 126
        return Result(code, "", f"{argv[0]}: {exc.strerror or exc}\n", time.monotonic() - started)
    try:
        out, err = proc.communicate(None if stdin is None else stdin.encode("utf-8"), timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(proc)
        shown = label if len(label) <= 80 else label[:80] + "…"
        message = f"`{shown}` did not finish within {timeout:g}s"
        problem = Problem(host, message, "it was stopped (with everything it started); allow more time")
        raise CommandTimeout([problem]) from None
    except BaseException:
        _stop(proc)
        raise
    duration = time.monotonic() - started
    code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
    log.debug("%s: exit %d after %.2fs", host, code, duration)
    return Result(
        exit_code=code,
        stdout=out.decode("utf-8", errors="replace"),
        stderr=err.decode("utf-8", errors="replace"),
        duration=duration,
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Kill the process and its group, reap it, and close its pipes (children may still hold them open)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
