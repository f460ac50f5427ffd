"""Faults during a run, at the engine and session level: a host lost between stages, interrupts, journaling,
partial teardown, and read-only commands that must not create secrets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sparkctl import state
from sparkctl.cli.render import render_report
from sparkctl.errors import HostError, Problem
from sparkctl.execute.base import Result
from sparkctl.execute.fake import FailingConnect, RecordingTransport
from sparkctl.execute.http import Probe
from sparkctl.inventory import parse_inventory
from sparkctl.plan.models import Command, Plan, Stage, Step, Wait
from sparkctl.runbook.load import load_runbook
from sparkctl.session import door
from sparkctl.session import session as run_mod
from sparkctl.session.engine import Engine
from sparkctl.session.report import Event, Report

EXAMPLE = Path(__file__).resolve().parents[2] / "inventories" / "example-pair.yaml"
HOSTS = ["spark-a", "spark-b"]


def step(host: str, kind: str, argv: list[str], changes: bool = True, **kw: object) -> Step:
    return Step(
        host=host,
        kind=kind,
        description=f"{kind} on {host}",
        commands=[Command(argv=argv)],
        changes=changes,
        **kw,  # type: ignore[arg-type]
    )


def plan_of(*stages: Stage) -> Plan:
    return Plan(cluster="c", runbook="up", hosts=HOSTS, stages=list(stages))


def engine(**kw: object) -> Engine:
    ts = kw.pop("transports", None) or {h: RecordingTransport(h) for h in HOSTS}
    return Engine(transports=ts, nopasswd={h: True for h in HOSTS}, sleep=lambda s: None, **kw)  # type: ignore[arg-type]


# --- a host lost between stages ---------------------------------------------------------------------------


def test_host_lost_when_re_reading_ends_the_run_naming_it_and_keeping_what_was_applied() -> None:
    p = plan_of(
        Stage(name="fabric", action="fabric", steps=[step(h, "fabric", ["nmcli"]) for h in HOSTS]),
        Stage(name="ray-head", action="ray_start", steps=[step("spark-a", "ray_head", ["ray"])]),
        Stage(name="ray-workers", action="ray_start", steps=[step("spark-b", "ray_worker", ["ray"])]),
    )
    calls = []

    def replan(done: frozenset[str], nxt: int) -> Plan | None:
        calls.append(nxt)
        if nxt == 2:
            raise run_mod.Unreachable([Problem("spark-b", "connection lost while running `sh -s`: EOF")])
        return None

    events: list[Event] = []
    report = engine(emit=events.append).run(p, replan=replan)
    assert report.ok is False and not report.interrupted
    assert report.hosts == {"spark-a": "changed", "spark-b": "unreachable"}
    assert "connection lost" in report.host_errors["spark-b"]
    assert sorted((r.host, r.stage) for r in report.results) == [
        ("spark-a", "fabric"),
        ("spark-a", "ray-head"),
        ("spark-b", "fabric"),
    ]
    assert calls == [1, 2]
    text = render_report(report)
    assert "  spark-a: changed; applied: fabric, ray-head" in text
    assert "  spark-b: UNREACHABLE; applied: fabric" in text
    assert "error: spark-b: connection lost" in text
    assert "nothing was changed" not in text
    assert any(e.kind == "note" and "stopped" in e.message for e in events)


def test_the_report_given_is_filled_even_when_the_run_raises() -> None:
    p = plan_of(
        Stage(name="s1", action="x", steps=[step("spark-a", "k", ["one"])]),
        Stage(name="s2", action="x", steps=[step("spark-a", "k2", ["two"])]),
    )

    def replan(done: frozenset[str], nxt: int) -> Plan | None:
        raise RuntimeError("a bug")

    report = Report(cluster="c", runbook="up")
    with pytest.raises(RuntimeError):
        engine().run(p, replan=replan, report=report)
    assert [(r.stage, r.status) for r in report.results] == [("s1", "changed")]
    assert report.hosts["spark-a"] == "changed"


# --- interrupts: honest statuses ---------------------------------------------------------------------------


def test_interrupt_during_a_readiness_wait_says_interrupted_not_a_timeout() -> None:
    clock = {"t": 0.0}
    wait_step = Step(
        host="spark-a",
        kind="verify_workload",
        target="embed",
        description="embed answers",
        changes=False,
        notes=["embed"],
        wait=Wait(kind="http", deadline=300, interval=1, url="http://x", model="embed"),
    )
    eng: Engine

    def probe(url: str, model: str, key: str | None, kind: str) -> Probe:
        clock["t"] += 1.1
        if clock["t"] > 2:
            raise KeyboardInterrupt  # Ctrl-C lands while the main thread waits on the host threads
        return Probe("loading", "/health answered 503")

    events: list[Event] = []
    eng = engine(probe=probe, clock=lambda: clock["t"], emit=events.append)
    report = eng.run(plan_of(Stage(name="ready", action="workload_ready", steps=[wait_step])))
    assert report.interrupted and not report.ok
    assert all("not ready after" not in r.error for r in report.results)
    assert all(e.status != "failed" for e in events if e.kind == "step_end")
    assert "FAILED" not in render_report(report)


def test_abort_during_a_wait_because_another_host_failed_is_stopped_not_a_timeout() -> None:
    failing = RecordingTransport("spark-b", {"boom": Result(1, "", "no such device")})
    wait_step = Step(
        host="spark-a",
        kind="verify_clean",
        description="nothing left",
        commands=[Command(argv=["check"])],
        changes=False,
        wait=Wait(kind="remote", deadline=300, interval=1),
    )
    ts = {"spark-a": RecordingTransport("spark-a", {"check": Result(1, "", "")}), "spark-b": failing}
    report = engine(transports=ts).run(
        plan_of(Stage(name="s", action="x", steps=[wait_step, step("spark-b", "k", ["boom"])]))
    )
    by_host = {r.host: r for r in report.results}
    assert by_host["spark-b"].status == "failed"
    assert by_host["spark-a"].status == "stopped" and "another host" in by_host["spark-a"].error
    assert "not true after" not in by_host["spark-a"].error


# --- the session: journal however it ends, partial teardown ----------------------------------------------------


PROBE_OK = "@@sparkctl identity\nspark\n/home/spark\nspark-x\n@@sparkctl end\n"


def _session(transports: dict[str, RecordingTransport]) -> run_mod.Session:
    inv = parse_inventory(EXAMPLE.read_text())
    return run_mod.Session(inv, lambda host, settings: transports[host.name])


def test_a_run_that_raises_is_journaled_with_what_it_did(isolated_state: Path) -> None:
    ts = {h: RecordingTransport(h, {"sh -s": Result(0, PROBE_OK, "")}) for h in HOSTS}
    session = _session(ts)
    session.open()
    rb = load_runbook("down")
    p = plan_of(
        Stage(name="workloads", action="x", steps=[step("spark-a", "k", ["one"]), step("spark-b", "k", ["one"])]),
    )
    ts["spark-a"].responses = {"sh -s": Result(0, PROBE_OK, ""), "one": RuntimeError("a bug")}
    with pytest.raises(RuntimeError):
        session.apply(rb, p, {}, {}, run_id="run-x")
    runs = state.read_journal()
    assert len(runs) == 1 and runs[0]["id"] == "run-x" and runs[0]["ok"] is False
    assert "RuntimeError: a bug" in runs[0]["error"]
    assert [(s["host"], s["status"]) for s in runs[0]["steps"]] == [("spark-b", "changed")]


def test_force_quit_journals_the_unfinished_run(isolated_state: Path) -> None:
    ts = {h: RecordingTransport(h, {"sh -s": Result(0, PROBE_OK, "")}) for h in HOSTS}
    session = _session(ts)
    session.open()
    report = Report(cluster="c", runbook="down", run_id="run-y")
    session.running = {"id": "run-y", "cluster": "c", "runbook": "down", "started": 1.0}
    session.current = report
    session.journal_unfinished()
    session.journal_unfinished()  # once only
    runs = state.read_journal()
    assert [(r["id"], r["force_quit"]) for r in runs] == [("run-y", True)]


def test_partial_open_goes_on_without_the_unreachable_host(isolated_state: Path) -> None:
    inv = parse_inventory(EXAMPLE.read_text())
    fake = FailingConnect(unreachable=["spark-b"], message="Connection refused")
    session = run_mod.Session(inv, fake)
    fake_a = RecordingTransport("spark-a", {"sh -s": Result(0, PROBE_OK, "")})
    session.connect = lambda host, settings: fake_a if host.name == "spark-a" else fake(host, settings)
    session.open(partial=True)
    assert list(session.facts) == ["spark-a"]
    assert "Connection refused" in session.unreachable["spark-b"][0].message
    plan = session.plan(load_runbook("down"), {}, session.secrets_for_plan())
    assert plan.hosts == ["spark-a"]
    assert {s.host for st in plan.stages for s in st.steps} <= {"spark-a"}


def test_without_partial_one_unreachable_host_is_still_refused(isolated_state: Path) -> None:
    inv = parse_inventory(EXAMPLE.read_text())
    fake = FailingConnect(unreachable=["spark-b"], message="Connection refused")
    session = run_mod.Session(inv, fake)
    with pytest.raises(run_mod.Unreachable) as info:
        session.open()
    assert "nothing was changed" in info.value.problems[-1].hint


def test_probe_failing_after_changes_never_says_nothing_was_changed(isolated_state: Path) -> None:
    ts = {h: RecordingTransport(h, {"sh -s": Result(0, PROBE_OK, "")}) for h in HOSTS}
    session = _session(ts)
    session.open()
    session.applying = True
    ts["spark-b"].responses = {"sh -s": HostError([Problem("spark-b", "connection lost")])}
    with pytest.raises(run_mod.Unreachable) as info:
        session.gather()
    assert "nothing was changed" not in str(info.value)
    assert "what was applied" in str(info.value)


# --- read-only commands with one host down: the others are shown, the lost one is named --------------------------

RAY_ON_A = (
    "@@sparkctl identity\nnvidia\n/home/nvidia\nspark-a\n@@sparkctl end\n"
    "@@sparkctl ip_addr\n"
    '[{"ifname": "enp1s0f1np1", "mtu": 9000, "flags": ["BROADCAST", "MULTICAST", "UP", "LOWER_UP"], "operstate": "UP", '
    '"addr_info": [{"family": "inet", "local": "192.168.100.10", "prefixlen": 24}]}]\n'
    "@@sparkctl end\n"
)


def _one_host_down(mocker: Any, message: str = "no answer from 10.0.0.12:22 within 10s") -> RecordingTransport:
    """The CLI's seam: spark-a answers the probe, spark-b cannot be connected to; workloads answer `ready`."""
    lost = FailingConnect(unreachable=["spark-b"], message=message)
    spark_a = RecordingTransport("spark-a", {"sh -s": Result(0, RAY_ON_A, "")})
    mocker.patch.object(
        door,
        "CONNECTOR",
        side_effect=lambda accept: lambda host, settings: spark_a if host.name == "spark-a" else lost(host, settings),
    )
    opened = door.open_session

    def open_session(*args: Any, **kwargs: Any) -> run_mod.Session:
        session = opened(*args, **kwargs)
        session.probe = lambda *a, **k: Probe("ready", "")  # no HTTP from a unit test
        return session

    mocker.patch.object(door, "open_session", side_effect=open_session)
    return spark_a


def test_status_with_one_host_down_shows_the_other_and_names_the_lost_one(isolated_state: Path, mocker: Any) -> None:
    from typer.testing import CliRunner

    from sparkctl.cli.app import app

    _one_host_down(mocker)
    r = CliRunner().invoke(app, ["status", "-i", str(EXAMPLE)])
    assert r.exit_code == 1, r.output
    assert "  spark-a: ray not started (no workload needs it)" in r.stdout  # chat runs on mp
    assert "    enp1s0f1np1: 192.168.100.10/24 MTU 9000 (ok)" in r.stdout  # what spark-a said is shown
    assert "  spark-b: UNREACHABLE" in r.stdout
    assert "workload chat (vllm): http://10.0.0.11:8000/v1 process unknown, ready" in r.stdout
    assert "error: spark-b: cannot connect: no answer from 10.0.0.12:22 within 10s" in r.stderr
    assert "hint: check that the host is up" in r.stderr
    assert "spark-a" not in r.stderr


def test_status_json_with_one_host_down_carries_the_lost_host_and_its_error(isolated_state: Path, mocker: Any) -> None:
    from typer.testing import CliRunner

    from sparkctl.cli.app import app

    _one_host_down(mocker)
    r = CliRunner().invoke(app, ["status", "--json", "-i", str(EXAMPLE)])
    assert r.exit_code == 1, r.output
    st = json.loads(r.stdout)
    assert list(st["hosts"]) == ["spark-a"]
    assert st["hosts"]["spark-a"]["fabric"][0]["ok"] is True
    why = "cannot connect: no answer from 10.0.0.12:22 within 10s"
    assert st["unreachable"] == {"spark-b": {"error": why, "hint": "check that the host is up"}}
    assert st["workloads"]["chat"]["process"] == "unknown"  # its second rank's host was not read
    assert "error: spark-b: " in r.stderr


def test_status_with_every_host_reachable_has_an_empty_unreachable(isolated_state: Path, mocker: Any) -> None:
    from typer.testing import CliRunner

    from sparkctl.cli.app import app

    spark_a = RecordingTransport("spark-a", {"sh -s": Result(0, RAY_ON_A, "")})
    spark_b = RecordingTransport("spark-b", {"sh -s": Result(0, PROBE_OK, "")})
    both = {"spark-a": spark_a, "spark-b": spark_b}
    mocker.patch.object(door, "CONNECTOR", side_effect=lambda a: lambda h, s: both[h.name])
    opened = door.open_session

    def open_session(*args: Any, **kwargs: Any) -> run_mod.Session:
        session = opened(*args, **kwargs)
        session.probe = lambda *a, **k: Probe("down", "refused")
        return session

    mocker.patch.object(door, "open_session", side_effect=open_session)
    r = CliRunner().invoke(app, ["status", "--json", "-i", str(EXAMPLE)])
    assert r.exit_code == 0, r.output
    st = json.loads(r.stdout)
    assert list(st["hosts"]) == ["spark-a", "spark-b"] and st["unreachable"] == {}
    assert st["workloads"]["chat"]["process"] != "unknown"


def test_status_json_keeps_its_keys_in_their_order(isolated_state: Path, mocker: Any) -> None:
    """`status --json` is parsed by users and scripts: its keys, nesting and value types stay as they are."""
    from typer.testing import CliRunner

    from sparkctl.cli.app import app

    _one_host_down(mocker)
    r = CliRunner().invoke(app, ["status", "--json", "-i", str(EXAMPLE)])
    st = json.loads(r.stdout)
    assert list(st) == ["cluster", "topology", "hosts", "workloads", "unreachable"]
    assert (st["cluster"], st["topology"]) == ("spark-pair", "direct")
    a = st["hosts"]["spark-a"]
    assert list(a) == ["fabric", "neighbours", "ray", "env_file"]
    assert (a["neighbours"], a["ray"], a["env_file"]) == (["spark-b"], "not started (no workload needs it)", False)
    assert a["fabric"][0] == {
        "interface": "enp1s0f1np1", "want": "192.168.100.10/24", "mtu": 9000, "ipv4": ["192.168.100.10/24"], "ok": True
    }  # fmt: skip
    assert a["fabric"][1] == {
        "interface": "enP2p1s0f1np1", "want": "192.168.101.10/24", "mtu": None, "ipv4": [], "ok": False
    }  # fmt: skip
    chat = st["workloads"]["chat"]
    assert list(chat) == ["engine", "endpoint", "hosts", "head", "process", "health", "detail", "recorded"]
    assert (chat["hosts"], chat["head"], chat["health"], chat["detail"]) == (None, "spark-a", "ready", "")
    assert list(st["unreachable"]["spark-b"]) == ["error", "hint"]
    assert r.stdout.startswith('{\n  "cluster": "spark-pair",\n  "topology": "direct",\n  "hosts": {\n')


def test_status_with_no_host_reachable_names_them_all(isolated_state: Path, mocker: Any) -> None:
    from typer.testing import CliRunner

    from sparkctl.cli.app import app

    lost = FailingConnect(message="Connection refused")
    mocker.patch.object(door, "CONNECTOR", return_value=lost)
    r = CliRunner().invoke(app, ["status", "-i", str(EXAMPLE)])
    assert r.exit_code == 1, r.output
    assert r.stdout == ""
    assert "error: spark-a: cannot connect: Connection refused" in r.stderr
    assert "error: spark-b: cannot connect: Connection refused" in r.stderr


def test_doctor_with_one_host_down_judges_the_other_and_fails_naming_the_lost_one(
    isolated_state: Path, mocker: Any
) -> None:
    from typer.testing import CliRunner

    from sparkctl.cli.app import app

    spark_a = _one_host_down(mocker)
    r = CliRunner().invoke(app, ["doctor", "--json", "-i", str(EXAMPLE)])
    assert r.exit_code == 1, r.output
    findings = json.loads(r.stdout)
    (lost,) = [f for f in findings if f["rule"] == "host-reachable" and f["level"] == "fail"]
    assert lost["subject"] == "spark-b"
    assert lost["evidence"] == "not read: cannot connect: no answer from 10.0.0.12:22 within 10s"
    assert lost["fix"] == "check that the host is up"
    judged = {f["subject"] for f in findings if f["rule"] == "gpu-present"}
    assert judged == {"spark-a"}  # spark-a's facts were judged, spark-b's (none) were not
    # the jumbo pings ran from spark-a only, towards spark-b's twins
    pings = [c for c in spark_a.commands if "ping" in c]
    assert pings and all("192.168.10" in c for c in pings)
    text = CliRunner().invoke(app, ["doctor", "-i", str(EXAMPLE)])
    assert text.exit_code == 1
    assert "spark-b" in text.stdout and "no answer from 10.0.0.12:22" in text.stdout


# --- secrets: only a run that needs them creates them ---------------------------------------------------------


def test_reading_secrets_creates_nothing(isolated_state: Path) -> None:
    text = EXAMPLE.read_text()
    session = run_mod.Session(parse_inventory(text), lambda host, settings: RecordingTransport(host.name))
    assert session.secrets_for_plan() == {}
    assert not (isolated_state / "sparkctl").exists()
    made = session.secrets_for_plan(create=True)
    # the example's pair copies its model's weights host to host: the cluster's peer key pair is made too
    assert "ray_token" in made and all(k.startswith(("ray_token", "api_key:", "peer_key")) for k in made)
    assert session.secrets_for_plan() == made  # read back, nothing new


def test_missing_token_plans_a_token_push_that_matches_no_host(isolated_state: Path) -> None:
    session = run_mod.Session(
        parse_inventory(EXAMPLE.read_text()), lambda host, settings: RecordingTransport(host.name)
    )
    digest = session.digests({})["ray_token"]
    assert digest == run_mod.NO_TOKEN_YET and len(digest) != 64


def test_secrets_needed_names_stdin_secrets_and_probe_keys() -> None:
    p = plan_of(
        Stage(
            name="s",
            action="x",
            steps=[
                Step(
                    host="spark-a",
                    kind="ray_token",
                    description="d",
                    commands=[Command(argv=["install"], stdin_secret="ray_token")],
                ),
                Step(
                    host="spark-a",
                    kind="verify_workload",
                    description="d",
                    changes=False,
                    wait=Wait(kind="http", deadline=1, interval=1, url="u", model="m", secret="api_key:m"),
                ),
            ],
        )
    )
    assert run_mod.secrets_needed(p) == {"ray_token", "api_key:m"}
    assert run_mod.secrets_needed(plan_of()) == set()


def test_journal_record_is_json_lines(isolated_state: Path) -> None:
    state.append_journal({"id": "a"})
    assert json.loads((isolated_state / "sparkctl" / "journal.jsonl").read_text()) == {"id": "a"}


def test_connection_lost_during_a_step_marks_the_host_unreachable() -> None:
    from sparkctl.execute.base import Unreachable

    lost = Unreachable([Problem("spark-b", "connection lost while running `ray start`: EOF")])
    ts = {"spark-a": RecordingTransport("spark-a"), "spark-b": RecordingTransport("spark-b", {"ray": lost})}
    p = plan_of(
        Stage(name="ray-head", action="ray_start", steps=[step("spark-a", "ray_node", ["ray"])]),
        Stage(name="ray-workers", action="ray_start", steps=[step("spark-b", "ray_node", ["ray"])]),
    )
    report = engine(transports=ts).run(p)
    assert report.hosts == {"spark-a": "changed", "spark-b": "unreachable"}
    assert "UNREACHABLE" in render_report(report) and "could not be reached" in render_report(report)


def test_an_interrupt_waits_for_the_commands_under_way_before_the_run_goes_on() -> None:
    import signal
    import threading
    import time

    finished: list[str] = []

    def slow(command: str) -> Result:
        if command.startswith("ray"):
            time.sleep(0.6)
            finished.append(command)
        return Result(0, "", "")

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    ts = {h: RecordingTransport(h, slow) for h in HOSTS}
    p = plan_of(
        Stage(name="ray-workers", action="ray_start", steps=[step("spark-b", "ray_node", ["ray", "start"])]),
        Stage(name="after", action="x", steps=[step("spark-a", "k", ["after"])]),
    )
    previous = signal.signal(signal.SIGUSR1, interrupt)
    try:
        threading.Timer(0.2, lambda: signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGUSR1)).start()
        report = engine(transports=ts).run(p)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert report.interrupted
    assert finished == ["ray start"], "the run went on before the command under way on spark-b had finished"
    assert "after" not in ts["spark-a"].commands
