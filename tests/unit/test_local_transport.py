"""Transports without SSH: LocalTransport and run_local (real processes here), and the test doubles."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from sparkctl.execute.base import CommandTimeout, Result, Unreachable
from sparkctl.execute.fake import Call, FailingConnect, RecordingTransport
from sparkctl.execute.local import LocalTransport, run_local

SECRET = "hunter2-sudo-password"


def wait_until(condition: Callable[[], bool], limit: float = 10.0) -> bool:
    """Poll `condition` until it holds (True) or `limit` seconds pass (False)."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_exit_code_and_both_streams_are_returned():
    result = LocalTransport().run("printf out; printf err >&2; exit 3", timeout=10)

    assert (result.exit_code, result.stdout, result.stderr) == (3, "out", "err")
    assert not result.ok
    assert result.duration >= 0


def test_stdin_is_fed_then_closed(caplog):
    caplog.set_level(logging.DEBUG)

    result = LocalTransport().run("cat; echo done", stdin=SECRET + "\n", timeout=10)

    assert result.ok
    assert result.stdout == SECRET + "\ndone\n"
    assert "cat; echo done" in caplog.text
    assert SECRET not in caplog.text


def test_without_stdin_the_command_reads_nothing():
    # Not the terminal's stdin: `cat` would otherwise wait for the user.
    result = LocalTransport().run("cat; echo done", timeout=10)

    assert result.stdout == "done\n"


def test_undecodable_output_is_replaced_not_fatal():
    result = LocalTransport().run(r"printf 'a\377b'", timeout=10)

    assert result.stdout == "a\ufffdb"


def test_timeout_stops_the_command_and_everything_it_started(tmp_path: Path):
    pid_file = tmp_path / "pid"
    command = f"sleep 300 & echo $! > {pid_file}; wait; " + "echo " + "x" * 100

    with pytest.raises(CommandTimeout) as caught:
        LocalTransport("laptop").run(command, stdin=SECRET, timeout=0.5)

    (problem,) = caught.value.problems
    assert problem.where == "laptop"
    assert f"`{command[:80]}…`" in problem.message
    assert SECRET not in str(caught.value)
    # The background sleep held the output pipes; it was killed too (SIGKILL lands asynchronously).
    stat = Path(f"/proc/{pid_file.read_text().strip()}/stat")
    assert wait_until(lambda: not stat.exists() or stat.read_text().split(") ")[1].startswith("Z"))


def test_a_killed_command_reports_128_plus_the_signal():
    assert LocalTransport().run("kill -TERM $$", timeout=10).exit_code == 128 + 15


def test_run_local_passes_argv_without_a_shell():
    result = run_local(["printf", "%s|%s", "a b; echo x", "$HOME"], timeout=10)

    assert (result.exit_code, result.stdout) == (0, "a b; echo x|$HOME")


def test_run_local_feeds_stdin():
    assert run_local(["tr", "a-z", "A-Z"], stdin="spark\n", timeout=10).stdout == "SPARK\n"


def test_run_local_reports_a_missing_program_like_a_shell():
    result = run_local(["sparkctl-no-such-program"], timeout=10)

    assert result.exit_code == 127
    assert "sparkctl-no-such-program" in result.stderr


def test_run_local_timeout_names_the_command():
    with pytest.raises(CommandTimeout) as caught:
        run_local(["sleep", "300"], timeout=0.2)

    assert "`sleep 300`" in caught.value.problems[0].message
    assert caught.value.problems[0].where == "localhost"


# --- the public test doubles follow the same protocol ------------------------------------------------


def test_recording_transport_records_calls_and_answers_by_longest_prefix():
    fake = RecordingTransport(
        "spark-a",
        {
            "nmcli": Result(0, "generic", ""),
            "nmcli -t": Result(0, "terse", ""),
            "reboot": CommandTimeout("late"),
        },
    )

    assert fake.run("nmcli -t device", stdin=SECRET, timeout=5).stdout == "terse"
    assert fake.run("nmcli con", timeout=5).stdout == "generic"
    assert fake.run("true", timeout=5) == Result(0, "", "")
    with pytest.raises(CommandTimeout):
        fake.run("reboot", timeout=5)
    assert fake.calls[0] == Call("nmcli -t device", SECRET, 5)
    assert fake.commands == ["nmcli -t device", "nmcli con", "true", "reboot"]


def test_failing_connect_fails_the_listed_hosts_only():
    connect = FailingConnect(["spark-b"], message="no route to host")

    with pytest.raises(Unreachable) as caught:
        connect(object(), "spark-b")  # a runbook connector: (inventory, host name)
    transport = connect(SimpleNamespace(name="spark-a"), None)  # ssh.connect: (host, settings)

    assert caught.value.problems[0].where == "spark-b"
    assert "no route to host" in caught.value.problems[0].message
    assert transport.run("true", timeout=1).ok
    assert connect.attempts == ["spark-b", "spark-a"]
    assert connect.transports == {"spark-a": transport}
