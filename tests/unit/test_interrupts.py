"""Signal policy: the first Ctrl-C interrupts, the cleanup after it cannot be, the third force-quits."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import NoReturn

import pytest

from sparkctl.session.interrupts import Interrupts

REPO = Path(__file__).resolve().parents[2]


class Exited(Exception):
    pass


def policy() -> tuple[Interrupts, list[str], list[int]]:
    said: list[str] = []
    codes: list[int] = []

    def hard_exit(code: int) -> NoReturn:
        codes.append(code)
        raise Exited

    return Interrupts(say=said.append, hard_exit=hard_exit), said, codes


def test_first_signal_interrupts_the_run() -> None:
    p, said, _ = policy()
    with pytest.raises(KeyboardInterrupt):
        p.handle(signal.SIGINT)
    assert p.interrupted and p.first == "SIGINT"
    assert "cannot be interrupted" in said[0]


def test_second_is_refused_with_a_message_and_the_third_force_quits_saying_what_is_left() -> None:
    p, said, codes = policy()
    ran: list[str] = []
    p.before_exit.append(lambda: ran.append("journal"))
    p.left_behind = lambda: "Ray may still run on spark-a"
    with pytest.raises(KeyboardInterrupt):
        p.handle(signal.SIGINT)
    with p.shielded("running `down`"):
        p.handle(signal.SIGINT)  # refused: no exception
        assert "still running `down`" in said[-1] and "cannot be interrupted" in said[-1]
        assert codes == []
        with pytest.raises(Exited):
            p.handle(signal.SIGINT)
    assert codes == [130]
    assert said[-1].startswith("warning: force quit") and "Ray may still run on spark-a" in said[-1]
    assert ran == ["journal"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_count_like_ctrl_c(sig: signal.Signals) -> None:
    p, _said, codes = policy()
    with pytest.raises(KeyboardInterrupt):
        p.handle(sig)
    assert p.first == sig.name
    p.handle(signal.SIGINT)
    with pytest.raises(Exited):
        p.handle(sig)
    assert codes == [130]


def test_a_first_signal_inside_a_shielded_stretch_does_not_raise() -> None:
    p, said, _ = policy()
    with p.shielded("releasing the cluster lock"):
        p.handle(signal.SIGTERM)
    assert p.interrupted and "releasing the cluster lock first" in said[0]


def test_a_failing_before_exit_hook_does_not_prevent_the_exit() -> None:
    p, _, codes = policy()
    p.before_exit.append(lambda: 1 / 0)  # type: ignore[func-returns-value]
    for _ in range(2):
        with contextlib.suppress(KeyboardInterrupt):
            p.handle(signal.SIGINT)
    with pytest.raises(Exited):
        p.handle(signal.SIGINT)
    assert codes == [130]


# --- a real process: handlers installed over an inherited SIG_IGN -------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys, time
    from sparkctl.session.interrupts import INTERRUPTS
    INTERRUPTS.install()
    INTERRUPTS.left_behind = lambda: "LEFT-BEHIND"
    try:
        print("ready", flush=True)
        time.sleep(60)
        print("not interrupted", flush=True)
    except KeyboardInterrupt:
        with INTERRUPTS.shielded("CLEANING"):
            print("cleanup started", flush=True)
            deadline = time.monotonic() + float(sys.argv[1])
            while time.monotonic() < deadline:
                time.sleep(0.05)
        print("cleanup done", flush=True)
        sys.exit(130)
    """
)


def _child(cleanup_seconds: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(cleanup_seconds)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # as a background job inherits it
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _wait_for(proc: subprocess.Popen[str], line: str) -> None:
    assert proc.stdout is not None
    got = proc.stdout.readline().strip()
    if got != line:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"expected {line!r}, got {got!r}; exit {proc.returncode}; stderr: {err}")


def test_inherited_sig_ign_is_replaced_and_a_second_signal_does_not_stop_the_cleanup() -> None:
    proc = _child(cleanup_seconds=1.5)
    proc.send_signal(signal.SIGINT)
    _wait_for(proc, "cleanup started")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert out.strip() == "cleanup done"
    assert "CLEANING" in err and "cannot be interrupted" in err


def test_a_third_signal_force_quits_with_a_warning() -> None:
    proc = _child(cleanup_seconds=30)
    proc.send_signal(signal.SIGTERM)
    _wait_for(proc, "cleanup started")
    proc.send_signal(signal.SIGHUP)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 130
    assert "cleanup done" not in out
    assert "warning: force quit (SIGINT): LEFT-BEHIND" in err
