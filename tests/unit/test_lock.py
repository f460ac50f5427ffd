"""The cluster lock: its record, the real shell that takes and releases it (run here, under a temp dir)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from sparkctl import paths
from sparkctl.errors import HostError
from sparkctl.execute.base import Result
from sparkctl.execute.fake import RecordingTransport
from sparkctl.execute.local import LocalTransport
from sparkctl.session import lock
from sparkctl.session.lock import LockHeld, LockOwner, take_locks


def owner(run_id: str = "20261130-101500-ab12", **kw: object) -> LockOwner:
    values: dict[str, object] = {
        "cluster": "lab",
        "user": "ana",
        "laptop": "laptop-1",
        "pid": 4242,
        "run_id": run_id,
        "since": 1_800_000_000.0,
        "command": "sparkctl up",
    }
    values.update(kw)
    return LockOwner(**values)  # type: ignore[arg-type]


@pytest.fixture
def lock_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The lock path inside a temp dir standing for /run/lock."""
    (tmp_path / "run-lock").mkdir()
    path = tmp_path / "run-lock" / "sparkctl"
    monkeypatch.setattr(paths, "LOCK_DIR", str(path))
    return path


def test_record_round_trips_and_describes_who_and_since() -> None:
    o = owner()
    assert LockOwner.parse(o.to_text()) == o
    text = o.describe(now=o.since + 180)
    assert text.startswith("ana@laptop-1 (pid 4242, run 20261130-101500-ab12, sparkctl up) since 2027-01-15")
    assert text.endswith("UTC (3 min ago)")


def test_record_keeps_every_value_on_one_line() -> None:
    o = owner(laptop="evil\nrun_id=forged", command="sparkctl up\x1b[2J")
    parsed = LockOwner.parse(o.to_text())
    assert parsed is not None and parsed.run_id == o.run_id
    assert "\n" not in parsed.laptop and "\x1b" not in parsed.command


def test_unreadable_record_is_none() -> None:
    assert LockOwner.parse("") is None
    assert LockOwner.parse(owner().to_text().replace("pid=4242", "pid=x")) is None


def test_take_then_held_names_the_holder(lock_dir: Path) -> None:
    t = LocalTransport()
    first, second = owner("run-1"), owner("run-2", laptop="laptop-2")
    assert lock.parse_answer(t.run(lock.build_take(first), timeout=10).stdout) == ("taken", None)
    assert LockOwner.parse((lock_dir / "owner").read_text()) == first
    status, holder = lock.parse_answer(t.run(lock.build_take(second), timeout=10).stdout)
    assert (status, holder) == ("held", first)
    assert LockOwner.parse((lock_dir / "owner").read_text()) == first  # the loser changed nothing
    assert [p.name for p in lock_dir.parent.iterdir()] == ["sparkctl"]  # and left no temp dir


def test_exactly_one_of_many_racing_runs_takes_it(lock_dir: Path) -> None:
    t = LocalTransport()
    answers: dict[int, str] = {}

    def take(i: int) -> None:
        answers[i] = lock.parse_answer(t.run(lock.build_take(owner(f"run-{i}")), timeout=30).stdout)[0]

    threads = [threading.Thread(target=take, args=(i,)) for i in range(12)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    winners = [i for i, a in answers.items() if a == "taken"]
    assert len(winners) == 1 and sorted(answers.values()).count("held") == 11
    holder = LockOwner.parse((lock_dir / "owner").read_text())
    assert holder is not None and holder.run_id == f"run-{winners[0]}"


def test_release_removes_only_our_own_lock(lock_dir: Path) -> None:
    t = LocalTransport()
    t.run(lock.build_take(owner("run-1")), timeout=10)
    t.run(lock.build_release("run-2"), timeout=10)
    assert lock_dir.exists()
    t.run(lock.build_release("run-1"), timeout=10)
    assert not lock_dir.exists()
    assert lock.parse_answer(t.run(lock.build_read(), timeout=10).stdout) == ("free", None)


def test_break_removes_the_named_holder_only(lock_dir: Path) -> None:
    t = LocalTransport()
    t.run(lock.build_take(owner("run-1")), timeout=10)
    t.run(lock.build_break("run-9"), timeout=10)
    assert lock_dir.exists()
    t.run(lock.build_break("run-1"), timeout=10)
    assert not lock_dir.exists()


def test_values_are_quoted_not_run(lock_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    hostile = owner("run-1", command=f"$(touch {marker}) `touch {marker}` '; touch {marker}; '")
    t = LocalTransport()
    assert lock.parse_answer(t.run(lock.build_take(hostile), timeout=10).stdout)[0] == "taken"
    assert not marker.exists()
    recorded = LockOwner.parse((lock_dir / "owner").read_text())
    assert recorded is not None and recorded.command == hostile.command[:200]  # recorded as text, capped
    t.run(lock.build_release("x'; touch " + str(marker) + "; '"), timeout=10)
    assert not marker.exists() and lock_dir.exists()


def test_take_fails_with_a_fix_when_the_lock_dir_is_not_writable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(paths, "LOCK_DIR", str(tmp_path / "missing" / "sparkctl"))
    with pytest.raises(HostError) as info:
        take_locks({"spark-a": LocalTransport("spark-a")}, ["spark-a"], owner())
    assert info.value.problems[0].where == "spark-a"
    assert "/run/lock" in info.value.problems[0].hint


def test_take_locks_releases_what_it_took_when_a_later_host_is_held(lock_dir: Path) -> None:
    held = Result(0, lock.HELD + "\n" + owner("their-run", laptop="laptop-2").to_text(), "")
    ts = {
        "spark-a": RecordingTransport("spark-a", {"t=$(mktemp": Result(0, lock.TAKEN + "\n", "")}),
        "spark-b": RecordingTransport("spark-b", {"t=$(mktemp": held}),
    }
    with pytest.raises(LockHeld) as info:
        take_locks(ts, ["spark-a", "spark-b"], owner("my-run"), alive=lambda pid: True)
    p = info.value.problems[0]
    assert p.where == "spark-b"
    assert "ana@laptop-2 (pid 4242, run their-run, sparkctl up)" in p.message and "nothing was changed" in p.message
    assert "sparkctl unlock" in p.hint
    assert any("grep -qxF -- run_id=my-run" in c for c in ts["spark-a"].commands)  # released on spark-a
    assert len(ts["spark-b"].commands) == 1 and "mktemp" in ts["spark-b"].commands[0]  # only the try to take it


def test_a_dead_run_of_this_laptop_is_taken_over_said_so(lock_dir: Path) -> None:
    t = LocalTransport("spark-a")
    me = owner("new-run", pid=1000)
    t.run(lock.build_take(owner("old-run", pid=999)), timeout=10)
    notes: list[str] = []
    assert take_locks({"spark-a": t}, ["spark-a"], me, note=notes.append, alive=lambda pid: False) == ["spark-a"]
    assert LockOwner.parse((lock_dir / "owner").read_text()) == me
    assert notes and "old-run" in notes[0] and "pid 999" in notes[0]


def test_a_live_run_of_this_laptop_or_any_run_elsewhere_is_not_taken_over() -> None:
    me = owner("new-run", pid=1000)
    assert not lock.is_stale_here(owner("old", pid=999), me, alive=lambda pid: True)
    assert not lock.is_stale_here(owner("old", pid=999, laptop="laptop-2"), me, alive=lambda pid: False)
    assert not lock.is_stale_here(owner("old", pid=999, user="bo"), me, alive=lambda pid: False)
    assert lock.is_stale_here(owner("old", pid=999), me, alive=lambda pid: False)


def test_same_run_taking_again_is_not_blocked(lock_dir: Path) -> None:
    t = LocalTransport("spark-a")
    me = owner("run-1")
    assert take_locks({"spark-a": t}, ["spark-a"], me) == ["spark-a"]
    assert take_locks({"spark-a": t}, ["spark-a"], me) == ["spark-a"]


def _taken() -> Result:
    return Result(0, lock.TAKEN + "\n", "")


def _held_by(run_id: str) -> Result:
    return Result(0, lock.HELD + "\n" + owner(run_id, laptop="laptop-2").to_text(), "")


def test_a_run_that_loses_the_first_host_tries_no_other() -> None:
    ts = {h: RecordingTransport(h, {"t=$(mktemp": _taken()}) for h in ("spark-a", "spark-b", "spark-c")}
    ts["spark-a"].responses = {"t=$(mktemp": _held_by("their-run")}
    with pytest.raises(LockHeld) as info:
        take_locks(ts, ["spark-a", "spark-b", "spark-c"], owner("my-run"), alive=lambda pid: True)
    assert [p.where for p in info.value.problems] == ["spark-a"]
    assert ts["spark-b"].commands == [] and ts["spark-c"].commands == []  # the race is decided on the first host


def test_after_the_first_host_the_others_are_taken_side_by_side() -> None:
    both = threading.Barrier(2, timeout=5)  # breaks (and the take fails) unless spark-b and spark-c ask at once

    def answer(command: str) -> Result:
        both.wait()
        return _taken()

    ts = {"spark-a": RecordingTransport("spark-a", {"t=$(mktemp": _taken()})}
    ts |= {h: RecordingTransport(h, answer) for h in ("spark-b", "spark-c")}
    assert take_locks(ts, ["spark-a", "spark-b", "spark-c"], owner("my-run")) == ["spark-a", "spark-b", "spark-c"]


def test_every_holder_among_the_others_is_named_and_every_lock_taken_is_released() -> None:
    ts = {
        "spark-a": RecordingTransport("spark-a", {"t=$(mktemp": _taken()}),
        "spark-b": RecordingTransport("spark-b", {"t=$(mktemp": _held_by("run-b")}),
        "spark-c": RecordingTransport("spark-c", {"t=$(mktemp": _taken()}),
        "spark-d": RecordingTransport("spark-d", {"t=$(mktemp": _held_by("run-d")}),
    }
    with pytest.raises(LockHeld) as info:
        take_locks(ts, list(ts), owner("my-run"), alive=lambda pid: True)
    assert sorted(p.where for p in info.value.problems) == ["spark-b", "spark-d"]
    for h in ("spark-a", "spark-c"):  # taken, then given back
        assert any("grep -qxF -- run_id=my-run" in c for c in ts[h].commands), h
    for h in ("spark-b", "spark-d"):  # held by others: only the try to take it
        assert len(ts[h].commands) == 1


def test_a_host_that_cannot_be_locked_fails_the_run_and_releases_the_rest() -> None:
    ts = {
        "spark-a": RecordingTransport("spark-a", {"t=$(mktemp": _taken()}),
        "spark-b": RecordingTransport("spark-b", {"t=$(mktemp": Result(3, "", "cannot write in /run/lock")}),
    }
    with pytest.raises(HostError) as info:
        take_locks(ts, list(ts), owner("my-run"))
    assert not isinstance(info.value, LockHeld) and info.value.problems[0].where == "spark-b"
    assert any("grep -qxF -- run_id=my-run" in c for c in ts["spark-a"].commands)


def test_taking_then_running_a_script_runs_it_only_once_the_lock_is_held(lock_dir: Path, tmp_path: Path) -> None:
    t = LocalTransport("spark-a")
    ran = tmp_path / "ran"
    script = f"echo '@@sparkctl identity'; touch {ran}; echo '@@sparkctl end'\n"
    taken = t.run(lock.build_take(owner("run-1"), then="exec sh -s"), stdin=script, timeout=10)
    assert lock.parse_answer(taken.stdout) == ("taken", None)
    assert taken.stdout.splitlines()[1:] == ["@@sparkctl identity", "@@sparkctl end"] and ran.exists()
    ran.unlink()
    held = t.run(lock.build_take(owner("run-2"), then="exec sh -s"), stdin=script, timeout=10)
    status, holder = lock.parse_answer(held.stdout)
    assert status == "held" and holder is not None and holder.run_id == "run-1"
    assert not ran.exists() and "@@sparkctl end" not in held.stdout  # held: the script never ran


def test_with_a_probe_each_host_is_read_under_its_lock_in_one_round_trip_after_the_first() -> None:
    probe_out = "@@sparkctl identity\nspark\n@@sparkctl end\n"
    ts = {
        h: RecordingTransport(
            h, {"t=$(mktemp": Result(0, lock.TAKEN + "\n" + probe_out, ""), "sh -s": Result(0, probe_out, "")}
        )
        for h in ("spark-a", "spark-b", "spark-c")
    }
    probed: dict[str, Result] = {}
    taken = take_locks(ts, list(ts), owner("my-run"), probe=lambda h: f"# probe of {h}\n", probed=probed)
    assert taken == ["spark-a", "spark-b", "spark-c"] and sorted(probed) == ["spark-a", "spark-b", "spark-c"]
    first = ts["spark-a"].calls
    assert [c.command.split()[0] for c in first] == ["t=$(mktemp", "sh"] and first[0].stdin is None
    assert first[1].stdin == "# probe of spark-a\n"  # the first host: read once its lock is held
    for h in ("spark-b", "spark-c"):  # the others: one command, the probe running after the lock in it
        (call,) = ts[h].calls
        assert call.command.startswith("t=$(mktemp") and "exec sh -s" in call.command
        assert call.stdin == f"# probe of {h}\n"


def test_a_run_that_does_not_get_the_first_host_reads_no_host(lock_dir: Path) -> None:
    a, b = LocalTransport("spark-a"), LocalTransport("spark-b")
    me = owner("new-run", pid=1000)
    probed: dict[str, Result] = {}
    a.run(lock.build_take(owner("old-run", pid=999)), timeout=10)  # a live run holds spark-a
    with pytest.raises(LockHeld):
        take_locks({"spark-a": a, "spark-b": b}, ["spark-a", "spark-b"], me, alive=lambda pid: True,
                   probe=lambda h: "echo '@@sparkctl end'\n", probed=probed)  # fmt: skip
    assert probed == {}  # nothing read on a host this run never locked
