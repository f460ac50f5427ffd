"""The engine against recording transports: order, parallelism, failure, sudo, secrets, waits, re-plans."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from sparkctl.errors import HostError
from sparkctl.execute.base import Result
from sparkctl.execute.fake import FailingConnect, RecordingTransport
from sparkctl.execute.http import Probe
from sparkctl.inventory import parse_inventory
from sparkctl.plan.models import Command, Plan, Stage, Step, Wait
from sparkctl.session import session as run_mod
from sparkctl.session.engine import Engine, remote_line
from sparkctl.session.report import Event
from sparkctl.session.secrets import Secrets

EXAMPLE = Path(__file__).resolve().parents[2] / "inventories" / "example-pair.yaml"
HOSTS = ["spark-a", "spark-b"]


def step(host: str, kind: str, *argvs: list[str], target: str = "", changes: bool = True, **kw) -> Step:
    return Step(
        host=host,
        kind=kind,
        target=target,
        description=f"{kind} on {host}",
        commands=[Command(argv=a) for a in argvs],
        changes=changes,
        **kw,
    )


def plan_of(*stages: Stage) -> Plan:
    return Plan(cluster="c", runbook="rb", hosts=HOSTS, stages=list(stages))


class FakeClock:
    """clock() and sleep() that only move when slept."""

    def __init__(self) -> None:
        self.t = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds


def engine(transports: dict[str, RecordingTransport], **kw) -> Engine:
    kw.setdefault("nopasswd", {h: True for h in transports})
    clock = kw.pop("fake_clock", None) or FakeClock()
    return Engine(transports=transports, clock=clock.clock, sleep=clock.sleep, now=clock.clock, **kw)


def recording(responses=None) -> dict[str, RecordingTransport]:
    return {h: RecordingTransport(h, responses) for h in HOSTS}


FAIL = Result(1, "", "boom: no such device")


# --- order and parallelism -----------------------------------------------------------------------------


def test_stages_run_in_order_on_every_host() -> None:
    log: list[tuple[str, str]] = []
    lock = threading.Lock()

    class Logged(RecordingTransport):
        def run(self, command, *, stdin=None, timeout):
            with lock:
                log.append((self.host, command))
            return super().run(command, stdin=stdin, timeout=timeout)

    ts = {h: Logged(h) for h in HOSTS}
    p = plan_of(
        Stage(name="one", action="x", steps=[step(h, "first", ["echo", "1", h]) for h in HOSTS]),
        Stage(name="two", action="x", steps=[step(h, "second", ["echo", "2", h]) for h in HOSTS]),
        Stage(name="three", action="x", steps=[step("spark-a", "third", ["echo", "3"])]),
    )
    report = engine(ts).run(p)
    assert report.ok
    stages_seen = [cmd.split()[1] for _, cmd in log]
    assert stages_seen == sorted(stages_seen), log
    assert ts["spark-a"].commands == ["echo 1 spark-a", "echo 2 spark-a", "echo 3"]
    assert ts["spark-b"].commands == ["echo 1 spark-b", "echo 2 spark-b"]
    assert [s.kind for s in report.executed if s.host == "spark-a"] == ["first", "second", "third"]
    assert report.hosts == {"spark-a": "changed", "spark-b": "changed"}


def test_read_only_checks_of_one_host_run_side_by_side_and_report_in_plan_order() -> None:
    # Both checks of spark-a block until both have started: only side-by-side checks get past the barrier.
    barrier = threading.Barrier(2, timeout=5)

    def meet(command: str) -> Result:
        if command.startswith("check"):
            barrier.wait()
        return Result(0, "", "")

    ts = {"spark-a": RecordingTransport("spark-a", meet)}
    checks = [step("spark-a", "verify", ["check", str(i)], target=str(i), changes=False) for i in (1, 2)]
    p = plan_of(
        Stage(name="s", action="x", steps=[step("spark-a", "write", ["echo", "w"]), *checks]),
        Stage(name="t", action="x", steps=[step("spark-a", "after", ["echo", "a"])]),
    )
    report = engine(ts).run(p)
    assert report.ok and not barrier.broken
    assert [r.step for r in report.results] == ["write", "verify:1", "verify:2", "after"]
    assert ts["spark-a"].commands[0] == "echo w" and ts["spark-a"].commands[-1] == "echo a"


def test_a_changing_step_never_runs_beside_another_step_of_its_host() -> None:
    running = []
    overlap = []
    lock = threading.Lock()

    def track(command: str) -> Result:
        with lock:
            if running:
                overlap.append((running[0], command))
            running.append(command)
        time.sleep(0.05)
        with lock:
            running.remove(command)
        return Result(0, "", "")

    ts = {"spark-a": RecordingTransport("spark-a", track)}
    p = plan_of(
        Stage(
            name="s",
            action="x",
            steps=[
                step("spark-a", "verify", ["check", "1"], target="1", changes=False),
                step("spark-a", "write", ["echo", "w"]),
                step("spark-a", "verify", ["check", "2"], target="2", changes=False),
            ],
        )
    )
    assert engine(ts).run(p).ok
    assert overlap == []
    assert ts["spark-a"].commands == ["check 1", "echo w", "check 2"]


def test_hosts_of_a_stage_run_at_the_same_time() -> None:
    # Each host's command blocks until both hosts are inside the stage: only parallel hosts get past it.
    barrier = threading.Barrier(len(HOSTS), timeout=5)

    def meet(command: str) -> Result:
        barrier.wait()
        return Result(0, "met", "")

    ts = recording(meet)
    p = plan_of(Stage(name="s", action="x", steps=[step(h, "k", ["true"]) for h in HOSTS]))
    report = engine(ts).run(p)
    assert report.ok
    assert not barrier.broken
    assert all(r.status == "changed" for r in report.results)


def test_steps_of_one_host_run_in_plan_order() -> None:
    ts = recording()
    steps = [step("spark-a", f"k{i}", ["echo", str(i)]) for i in range(5)]
    engine(ts).run(plan_of(Stage(name="s", action="x", steps=steps)))
    assert ts["spark-a"].commands == [f"echo {i}" for i in range(5)]
    assert ts["spark-b"].calls == []


# --- failure ---------------------------------------------------------------------------------------------


def test_a_failing_step_stops_the_whole_cluster() -> None:
    ts = {"spark-a": RecordingTransport("spark-a"), "spark-b": RecordingTransport("spark-b", {"nmcli": FAIL})}
    p = plan_of(
        Stage(
            name="fabric",
            action="fabric",
            steps=[
                step("spark-a", "fabric_profile", ["nmcli", "con", "add"]),
                step("spark-b", "fabric_profile", ["nmcli", "con", "add"]),
                step("spark-b", "fabric_active", ["ip", "link"]),
            ],
        ),
        Stage(name="env", action="worker_env", steps=[step(h, "worker_env", ["install"]) for h in HOSTS]),
    )
    report = engine(ts).run(p)
    assert report.ok is False
    assert report.hosts["spark-b"] == "failed"
    assert report.hosts["spark-a"] == "changed"
    # nothing of the later stage ran on ANY host
    assert all(c.command != "install" for t in ts.values() for c in t.calls)
    assert {r.stage for r in report.results} == {"fabric"}
    by_step = {(r.host, r.kind): r for r in report.results}
    failed = by_step[("spark-b", "fabric_profile")]
    assert failed.status == "failed"
    assert "exited 1" in failed.error and "boom: no such device" in failed.error
    assert by_step[("spark-b", "fabric_active")].status == "skipped"
    assert ts["spark-b"].commands == ["nmcli con add"]
    assert failed.commands[0].exit_code == 1


def test_on_failure_continue_goes_on() -> None:
    ts = recording({"pkill": FAIL})
    p = plan_of(
        Stage(
            name="workloads",
            action="workload_stop",
            on_failure="continue",
            steps=[step("spark-a", "workload_stopped", ["pkill", "x"])],
        ),
        Stage(name="ray", action="ray_stop", steps=[step(h, "ray_stopped", ["ray", "stop"]) for h in HOSTS]),
    )
    events: list[Event] = []
    report = engine(ts, emit=events.append).run(p)
    assert ts["spark-a"].commands == ["pkill x", "ray stop"]
    assert ts["spark-b"].commands == ["ray stop"]
    assert [r.status for r in report.results if r.stage == "ray"] == ["changed", "changed"]
    assert report.hosts["spark-a"] == "failed"
    assert any(e.kind == "note" and "continue" in e.message for e in events)


def test_cleanup_steps_run_on_failure_and_nothing_after() -> None:
    ts = recording({"start-workload": FAIL})
    asked: list[list[str]] = []

    def cleanup(names: list[str]) -> list[Stage]:
        asked.append(names)
        return [
            Stage(
                name="stop-workloads",
                action="workload_stop",
                steps=[step("spark-a", "workload_stopped", ["stop-workload"])],
            )
        ]

    p = plan_of(
        Stage(
            name="workloads",
            action="workload_start",
            on_failure="stop-workloads",
            steps=[step("spark-a", "workload", ["start-workload"])],
        ),
        Stage(name="ready", action="workload_ready", steps=[step("spark-a", "verify", ["curl"], changes=False)]),
    )
    report = engine(ts).run(p, cleanup=cleanup)
    assert asked == [["stop-workloads"]]
    assert ts["spark-a"].commands == ["start-workload", "stop-workload"]
    assert report.ok is False
    assert [(r.stage, r.status) for r in report.results] == [
        ("workloads", "failed"),
        ("stop-workloads", "changed"),
    ]


def test_an_exception_in_a_transport_is_a_failed_step_not_a_crash() -> None:
    ts = recording({"nmcli": HostError("spark-b: connection lost")})
    p = plan_of(Stage(name="s", action="x", steps=[step("spark-b", "k", ["nmcli"])]))
    report = engine(ts).run(p)
    assert report.ok is False
    assert report.results[0].status == "failed"
    assert "connection lost" in report.results[0].error


def test_interrupt_is_reported() -> None:
    ts = recording({"slow": KeyboardInterrupt()})
    p = plan_of(
        Stage(name="s", action="x", steps=[step("spark-a", "k", ["slow"])]),
        Stage(name="t", action="x", steps=[step("spark-a", "k2", ["after"])]),
    )
    report = engine(ts).run(p)
    assert report.interrupted and not report.ok
    assert "after" not in ts["spark-a"].commands


def test_pause_declined_fails_the_step() -> None:
    p = plan_of(
        Stage(
            name="p",
            action="pause",
            steps=[Step(host="spark-a", kind="pause", description="go?", changes=False)],
        ),
        Stage(name="t", action="x", steps=[step("spark-a", "k", ["after"])]),
    )
    asked: list[str] = []
    ts = recording()
    report = engine(ts, confirm=lambda m: asked.append(m) or False).run(p)
    assert asked == ["go?"]
    assert report.results[0].status == "failed" and "declined" in report.results[0].error
    assert ts["spark-a"].calls == []


# --- the exact line, sudo and secrets --------------------------------------------------------------------


def test_remote_line_without_sudo_quotes_argv() -> None:
    line, data = remote_line(Command(argv=["echo", "a b", "$(id)"]), True, Secrets(), {})
    assert line == "echo 'a b' '$(id)'"
    assert data is None


def test_remote_line_sudo_nopasswd() -> None:
    cmd = Command(argv=["nmcli", "connection", "up", "id", "sparkctl-enp1s0f1np1"], sudo=True)
    line, data = remote_line(cmd, True, Secrets({"sudo_password": "pw-123456"}), {})
    assert line == "sudo -n -- nmcli connection up id sparkctl-enp1s0f1np1"
    assert data is None


def test_remote_line_sudo_password_goes_on_stdin_only() -> None:
    cmd = Command(argv=["install", "-D", "/dev/stdin", "/etc/sparkctl/worker.env"], sudo=True, stdin="A=1\n")
    line, data = remote_line(cmd, False, Secrets({"sudo_password": "pw-123456"}), {})
    assert line == "sudo -k -S -p '' -- install -D /dev/stdin /etc/sparkctl/worker.env"
    assert "pw-123456" not in line
    assert data == "pw-123456\nA=1\n"


def test_remote_line_secret_and_blob_on_stdin() -> None:
    secrets = Secrets({"ray_token": "tok-abcdef"})
    line, data = remote_line(Command(argv=["install", "/dev/stdin", "t"], stdin_secret="ray_token"), True, secrets, {})
    assert data == "tok-abcdef\n" and "tok-abcdef" not in line
    _, blob = remote_line(
        Command(argv=["install"], stdin_blob="worker_code"), True, secrets, {"worker_code": "print()"}
    )
    assert blob == "print()"


def test_remote_line_missing_secret_names_it() -> None:
    with pytest.raises(HostError, match="api_key:chat"):
        remote_line(Command(argv=["x"], stdin_secret="api_key:chat"), True, Secrets(), {})
    with pytest.raises(HostError, match="sudo_password"):
        remote_line(Command(argv=["x"], sudo=True), False, Secrets(), {})


def test_engine_sends_sudo_password_and_secrets_on_stdin_and_redacts_them() -> None:
    pw, token = "pw-s3cr3t-42", "tok-0123456789abcdef"

    def answer(command: str) -> Result:
        # a misbehaving tool echoing what it was fed
        if command.startswith("sudo"):
            return Result(0, f"read {pw}", "")
        return Result(3, f"token {token}", f"bad token {token}")

    ts = recording(answer)
    p = plan_of(
        Stage(
            name="s",
            action="x",
            steps=[
                Step(
                    host="spark-b",
                    kind="env",
                    description="d",
                    commands=[Command(argv=["install", "/dev/stdin", "/etc/x"], sudo=True, stdin="A=1\n")],
                ),
                Step(
                    host="spark-b",
                    kind="tok",
                    description="d",
                    commands=[Command(argv=["install", "/dev/stdin", "t"], stdin_secret="ray_token")],
                ),
            ],
        )
    )
    eng = engine(
        ts,
        nopasswd={"spark-a": True, "spark-b": False},
        secrets=Secrets({"sudo_password": pw, "ray_token": token}),
    )
    report = eng.run(p)
    calls = ts["spark-b"].calls
    assert calls[0].command == "sudo -k -S -p '' -- install /dev/stdin /etc/x"
    assert calls[0].stdin == f"{pw}\nA=1\n"
    assert calls[1].command == "install /dev/stdin t"
    assert calls[1].stdin == f"{token}\n"
    dump = report.model_dump_json()
    assert pw not in dump and token not in dump
    assert "<redacted>" in report.results[0].commands[0].stdout
    assert "<redacted>" in report.results[1].error
    assert report.results[1].commands[0].command == "install /dev/stdin t  < secret:ray_token"


def test_command_timeout_passed_to_transport() -> None:
    ts = recording()
    p = plan_of(
        Stage(
            name="s",
            action="x",
            steps=[
                Step(
                    host="spark-a",
                    kind="k",
                    description="d",
                    commands=[Command(argv=["a"]), Command(argv=["b"], timeout=7)],
                )
            ],
        )
    )
    engine(ts, command_timeout=99).run(p)
    assert [c.timeout for c in ts["spark-a"].calls] == [99, 7]


# --- waits -----------------------------------------------------------------------------------------------


def test_remote_wait_retries_until_true() -> None:
    answers = iter([FAIL, FAIL, Result(0, "ok", "")])
    ts = recording(lambda c: next(answers))
    clock = FakeClock()
    s = step("spark-a", "verify_jumbo", ["ping"], changes=False, wait=Wait(kind="remote", deadline=20, interval=1))
    report = engine(ts, fake_clock=clock).run(plan_of(Stage(name="s", action="x", steps=[s])))
    assert report.ok
    assert report.results[0].status == "ok"
    assert len(ts["spark-a"].calls) == 3
    assert clock.sleeps == [1, 1]


def test_remote_wait_gives_up_after_the_deadline_and_shows_the_log() -> None:
    ts = recording({"python": FAIL, "tail": Result(0, "raylet died\n", "")})
    clock = FakeClock()
    s = step(
        "spark-a",
        "verify_ray",
        ["python", "check"],
        changes=False,
        wait=Wait(kind="remote", deadline=10, interval=2, log="/home/u/.local/state/sparkctl/logs/ray.log"),
    )
    report = engine(ts, fake_clock=clock).run(plan_of(Stage(name="s", action="x", steps=[s])))
    res = report.results[0]
    assert res.status == "failed"
    assert "not true after 10s" in res.error
    assert set(clock.sleeps) == {2}
    assert 10 <= sum(clock.sleeps) <= 12, "polled until the deadline, not beyond"
    polls = [c for c in ts["spark-a"].commands if c.startswith("python")]
    assert len(polls) == len(clock.sleeps) + 1
    assert ts["spark-a"].commands[-1] == "tail -n 30 /home/u/.local/state/sparkctl/logs/ray.log"
    assert res.log_tail == "raylet died\n"


def test_http_wait_reports_phases() -> None:
    clock = FakeClock()
    phases = iter(["down", "down", "loading", "loading", "loading", "listed", "ready"])
    seen: list[tuple] = []

    def probe(url: str, model: str, key: str | None, engine_name: str) -> Probe:
        seen.append((url, model, key, engine_name))
        return Probe(next(phases), "detail")

    events: list[Event] = []
    s = Step(
        host="spark-a",
        kind="verify_workload",
        target="chat",
        description="chat answers",
        changes=False,
        notes=["vllm"],
        wait=Wait(
            kind="http",
            deadline=600,
            interval=5,
            url="http://10.0.0.11:8000",
            model="chat",
            secret="api_key:chat",
        ),
    )
    eng = engine(
        {"spark-a": RecordingTransport("spark-a")},
        fake_clock=clock,
        probe=probe,
        emit=events.append,
        secrets=Secrets({"api_key:chat": "sk-key-1234"}),
    )
    report = eng.run(
        Plan(cluster="c", runbook="up", hosts=["spark-a"], stages=[Stage(name="ready", action="r", steps=[s])])
    )
    assert report.ok
    assert seen[0] == ("http://10.0.0.11:8000", "chat", "sk-key-1234", "vllm")
    started = [e.status for e in events if e.kind == "phase" and "took" not in e.message]
    assert started == ["down", "loading", "listed", "ready"]
    took = {e.status: e.elapsed for e in events if e.kind == "phase" and "took" in e.message}
    assert took == {"down": 10, "loading": 15, "listed": 5}
    assert "sk-key-1234" not in report.model_dump_json()


def test_http_wait_deadline_names_the_phase() -> None:
    clock = FakeClock()
    s = Step(
        host="spark-a",
        kind="verify_workload",
        target="chat",
        description="d",
        changes=False,
        notes=["embed"],
        wait=Wait(kind="http", deadline=30, interval=10, url="http://x", model="chat"),
    )
    eng = engine(
        {"spark-a": RecordingTransport("spark-a")},
        fake_clock=clock,
        probe=lambda *a: Probe("loading", "/health answered 503"),
    )
    report = eng.run(
        Plan(cluster="c", runbook="up", hosts=["spark-a"], stages=[Stage(name="r", action="r", steps=[s])])
    )
    res = report.results[0]
    assert res.status == "failed"
    assert "not ready after 30s" in res.error and "loading" in res.error
    assert sum(clock.sleeps) == 30


def test_http_wait_ends_at_once_when_the_workload_has_exited() -> None:
    clock = FakeClock()
    alive = Command(argv=["sh", "-c", 'kill -0 "$(cat /s/workload-chat.pid)"'])
    s = Step(
        host="spark-a",
        kind="verify_workload",
        target="chat",
        description="d",
        changes=False,
        notes=["vllm"],
        wait=Wait(
            kind="http", deadline=1800, interval=1, url="http://x", model="chat", alive=alive, log="/s/logs/chat.log"
        ),
    )
    head = RecordingTransport("spark-a", {"sh -c": Result(1, "", ""), "tail": Result(0, "Traceback: boom\n", "")})
    eng = engine({"spark-a": head}, fake_clock=clock, probe=lambda *a: Probe("down", "connection refused"))
    report = eng.run(
        Plan(cluster="c", runbook="up", hosts=["spark-a"], stages=[Stage(name="r", action="r", steps=[s])])
    )
    res = report.results[0]
    assert res.status == "failed" and "exited before it was ready" in res.error
    assert sum(clock.sleeps) == 0  # not the 1800 s deadline
    assert "boom" in res.log_tail


# --- re-planning -----------------------------------------------------------------------------------------


def _env_stage(gid: int) -> Stage:
    return Stage(
        name="env",
        action="worker_env",
        steps=[
            Step(
                host="spark-b",
                kind="worker_env",
                target="/etc/sparkctl/worker.env",
                description=f"gid {gid}",
                commands=[
                    Command(
                        argv=["install", "/dev/stdin", "/etc/sparkctl/worker.env"],
                        stdin=f"NCCL_IB_GID_INDEX={gid}\n",
                    )
                ],
            )
        ],
    )


def test_replan_revision_is_recorded_and_the_fresh_steps_run() -> None:
    ts = recording()
    fabric = Stage(name="fabric", action="fabric", steps=[step("spark-b", "fabric_active", ["nmcli", "up"])])
    p = plan_of(fabric, _env_stage(3))
    calls: list[tuple] = []

    def replan(done: frozenset[str], next_index: int) -> Plan:
        calls.append((done, next_index))
        return plan_of(_env_stage(5))

    events: list[Event] = []
    report = engine(ts, emit=events.append).run(p, replan=replan)
    assert calls == [(frozenset({"fabric_active"}), 1)]
    assert len(report.revisions) == 1
    assert "spark-b" in report.revisions[0] and "worker_env" in report.revisions[0] and "changed" in report.revisions[0]
    # the record names what changed, not only where
    assert report.revisions[0].endswith("(command 1 stdin: -['NCCL_IB_GID_INDEX=3'] +['NCCL_IB_GID_INDEX=5'])")
    assert [e.message for e in events if e.kind == "revised"] == report.revisions
    assert ts["spark-b"].calls[-1].stdin == "NCCL_IB_GID_INDEX=5\n"
    assert report.executed[-1].description == "gid 5"


def test_replan_with_the_same_steps_records_no_revision() -> None:
    ts = recording()
    p = plan_of(
        Stage(name="fabric", action="fabric", steps=[step("spark-b", "fabric_active", ["nmcli"])]),
        _env_stage(3),
    )
    report = engine(ts).run(p, replan=lambda done, i: plan_of(_env_stage(3)))
    assert report.revisions == []
    assert ts["spark-b"].calls[-1].stdin == "NCCL_IB_GID_INDEX=3\n"


def test_no_replan_after_a_stage_that_changed_nothing() -> None:
    asked: list[int] = []
    p = plan_of(
        Stage(name="check", action="x", steps=[step("spark-a", "verify", ["ping"], changes=False)]),
        _env_stage(3),
    )
    engine(recording()).run(p, replan=lambda done, i: asked.append(i) or None)
    assert asked == []


# --- Session.open: one unreachable host --------------------------------------------------------------------


def test_session_open_with_one_host_unreachable_changes_nothing(isolated_state) -> None:
    inv = parse_inventory(EXAMPLE.read_text())
    fake = FailingConnect(unreachable=["spark-b"], message="No route to host")
    session = run_mod.Session(inv, fake)
    with pytest.raises(run_mod.Unreachable) as info:
        session.open()
    assert [p.where for p in info.value.problems] == ["spark-b"]
    assert "No route to host" in info.value.problems[0].message
    assert sorted(fake.attempts) == ["spark-a", "spark-b"]
    reached = fake.transports["spark-a"]
    assert reached.calls == [], "no command (not even the probe) ran on the reachable host"
    assert reached.closed
    assert session.transports == {}


def test_session_open_with_a_failing_probe_names_the_host(isolated_state) -> None:
    inv = parse_inventory(EXAMPLE.read_text())
    transports = {
        "spark-a": RecordingTransport("spark-a", {"sh -s": Result(0, "@@sparkctl identity\nu\n@@sparkctl end\n", "")}),
        "spark-b": RecordingTransport("spark-b", {"sh -s": Result(127, "", "sh: not found")}),
    }
    session = run_mod.Session(inv, lambda host, settings: transports[host.name])
    with pytest.raises(run_mod.Unreachable) as info:
        session.open()
    assert [p.where for p in info.value.problems] == ["spark-b"]
    assert "probe did not complete" in info.value.problems[0].message
    # the only command anywhere was the read-only probe, and the connections are closed again
    assert all(c.command == "sh -s" for t in transports.values() for c in t.calls)
    assert all(t.closed for t in transports.values()) and session.transports == {}


def test_unreachable_error_reads_once_with_its_hint(isolated_state) -> None:
    inv = parse_inventory(EXAMPLE.read_text())
    fake = FailingConnect(unreachable=["spark-b"], message="No route to host")
    session = run_mod.Session(inv, fake)
    with pytest.raises(run_mod.Unreachable) as info:
        session.open()
    text = str(info.value)
    assert text.count("spark-b") == 1, text
    assert "nothing was changed" in text


def test_replan_differing_only_in_notes_is_no_revision() -> None:
    ts = recording()
    fabric = Stage(name="fabric", action="fabric", steps=[step("spark-b", "fabric_active", ["nmcli"])])
    fresh = _env_stage(3).model_copy(
        update={"steps": [_env_stage(3).steps[0].model_copy(update={"notes": ["GID index 3 read from the table"]})]}
    )
    report = engine(ts).run(plan_of(fabric, _env_stage(3)), replan=lambda done, i: plan_of(fresh))
    assert report.revisions == []
    assert ts["spark-b"].calls[-1].stdin == "NCCL_IB_GID_INDEX=3\n"
