"""The session: the one connect seam, read-only steps through the engine (sudo check, jumbo pings, logs),
discovery of hosts without an inventory, and the runbook's declared Ctrl-C policy (`on_interrupt:`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparkctl import state
from sparkctl.errors import HostError, InputError
from sparkctl.execute.base import Result
from sparkctl.execute.fake import FailingConnect, RecordingTransport
from sparkctl.inventory import parse_inventory
from sparkctl.plan.context import fresh_facts
from sparkctl.plan.models import Command, Plan, Stage, Step
from sparkctl.runbook.load import load_runbook, parse_runbook
from sparkctl.runbook.models import RunbookError
from sparkctl.session import door
from sparkctl.session import session as sessions
from sparkctl.session.discovery import Discovery
from sparkctl.session.reads import measure_jumbo, read_log

EXAMPLE = Path(__file__).resolve().parents[2] / "inventories" / "example-pair.yaml"
PROBE_OUTPUT = "@@sparkctl identity\nnvidia\n@@sparkctl end\n"


def session_with(responses, *, nopasswd: bool = True) -> tuple[sessions.Session, dict[str, RecordingTransport]]:
    """A session over recording transports, as if opened: facts of fresh hosts."""
    inv = parse_inventory(EXAMPLE.read_text())
    connect = FailingConnect(unreachable=[], responses=responses)
    session = sessions.Session(inv, connect)
    for h in inv.hosts:
        session.transports[h.name] = connect(h, inv.ssh)
        session.facts[h.name] = fresh_facts(inv, h).model_copy(update={"sudo_nopasswd": nopasswd})
    return session, connect.transports


# --- the seam ------------------------------------------------------------------------------------------


def test_open_session_connects_through_the_one_door(mocker, isolated_state) -> None:
    fake = FailingConnect(unreachable=[], responses={"sh -s": Result(0, PROBE_OUTPUT, "")})
    seam = mocker.patch.object(door, "CONNECTOR", return_value=fake)
    inv = parse_inventory(EXAMPLE.read_text())
    session = door.open_session(inv, accept_new_host_keys=True)
    seam.assert_called_once_with(True)
    assert sorted(fake.attempts) == ["spark-a", "spark-b"]
    assert sorted(session.facts) == ["spark-a", "spark-b"]
    session.close()
    assert all(t.closed for t in fake.transports.values())


def test_read_refuses_a_step_that_changes_something() -> None:
    session, _ = session_with(None)
    with pytest.raises(ValueError, match="changing steps"):
        session.read([Step(host="spark-a", kind="x", description="x", commands=[Command(argv=["touch", "/x"])])])


# --- the sudo check -----------------------------------------------------------------------------------


def _sudo_plan() -> Plan:
    steps = [
        Step(host=h, kind="k", description="d", commands=[Command(argv=["nmcli"], sudo=True)])
        for h in ("spark-a", "spark-b")
    ]
    stage = Stage(name="s", action="a", steps=steps)
    return Plan(cluster="c", runbook="rb", hosts=["spark-a", "spark-b"], stages=[stage])


def test_sudo_check_runs_through_the_engine_on_every_host_and_names_each_rejection() -> None:
    session, ts = session_with(None, nopasswd=False)
    ts["spark-b"].responses = {"sudo": Result(1, "", "Sorry, try again.")}  # spark-b rejects the password
    with pytest.raises(HostError) as info:
        session.check_sudo(_sudo_plan(), lambda: "hunter2-pw")
    assert [p.where for p in info.value.problems] == ["spark-b"]
    assert "rejected the password" in info.value.problems[0].message
    for t in ts.values():
        assert [(c.command, c.stdin, c.timeout) for c in t.calls] == [("sudo -k -S -p '' -- true", "hunter2-pw\n", 30)]
    assert "hunter2-pw" not in str(info.value)


def test_sudo_check_returns_the_password_when_every_host_accepts_it() -> None:
    session, ts = session_with(None, nopasswd=False)
    assert session.check_sudo(_sudo_plan(), lambda: "pw-ok-1") == {"sudo_password": "pw-ok-1"}
    assert all(len(t.calls) == 1 for t in ts.values())


def test_no_sudo_check_where_sudo_needs_no_password() -> None:
    session, ts = session_with(None, nopasswd=True)
    assert session.check_sudo(_sudo_plan(), lambda: pytest.fail("asked for a password")) == {}
    assert all(t.calls == [] for t in ts.values())


# --- doctor's jumbo pings -------------------------------------------------------------------------------


def test_jumbo_pings_run_once_per_direction_through_the_engine_and_keep_going_after_a_failure() -> None:
    ok = Result(0, "3 packets transmitted, 3 received, 0% packet loss, time 401ms\n", "")
    bad = Result(1, "", "ping: local error: message too long, mtu=1500\n")
    session, ts = session_with(None)
    ts["spark-a"].responses = {"ping": ok}
    ts["spark-b"].responses = {"ping": bad}
    pings = measure_jumbo(session)
    inv = session.inventory
    twins = len(inv.hosts[0].fabric)
    assert len(pings) == 2 * twins
    for (host, iface, peer), (passed, evidence) in pings.items():
        if host == "spark-a":
            assert passed and "0% packet loss" in evidence
        else:
            assert not passed and evidence == "ping: local error: message too long, mtu=1500"
        assert iface in {t.interface for t in inv.host(host).fabric}
        assert peer in {str(t.address.ip) for h in inv.hosts if h.name != host for t in h.fabric}
    for t in ts.values():  # every link measured, each once (no retries), with the measurement's timeout
        assert len(t.calls) == twins
        assert all(c.command.startswith("ping -M do -s 8972 ") and c.timeout == 20 for c in t.calls)


# --- logs ----------------------------------------------------------------------------------------------


def test_logs_read_through_the_engine_keep_every_requested_line() -> None:
    text = "".join(f"line {i}\n" for i in range(150))
    session, ts = session_with(None)
    ts["spark-b"].responses = {"tail": Result(0, text, "")}
    out = read_log(session, "spark-b", "ray", lines=150)
    assert out.splitlines() == text.splitlines()
    home = session.facts["spark-b"].home
    assert ts["spark-b"].commands == [f"tail -n 150 {home}/.local/state/sparkctl/logs/ray.log"]
    assert ts["spark-a"].calls == []


def test_a_missing_log_is_an_error_naming_the_host() -> None:
    session, ts = session_with(None)
    ts["spark-a"].responses = {"tail": Result(1, "", "tail: cannot open 'x' for reading: No such file or directory")}
    with pytest.raises(HostError) as info:
        read_log(session, "spark-a", "chat", lines=10)
    assert info.value.problems[0].where == "spark-a"
    assert "No such file" in info.value.problems[0].message


# --- discover ------------------------------------------------------------------------------------------


def test_discovery_probes_every_address_read_only_and_closes() -> None:
    fake = FailingConnect(unreachable=[], responses={"sh -s": Result(0, "@@out\n", "")})
    outputs = Discovery(["10.0.0.11", "spark-b.lan"], state_settings(), fake).probe("echo probe")
    assert outputs == {"10.0.0.11": "@@out", "spark-b.lan": "@@out"}
    for t in fake.transports.values():
        assert [(c.command, c.stdin) for c in t.calls] == [("sh -s", "echo probe")]
        assert t.closed


def test_discovery_names_every_unreachable_host() -> None:
    fake = FailingConnect(unreachable=["10.0.0.12"], message="No route to host")
    with pytest.raises(HostError) as info:
        Discovery(["10.0.0.11", "10.0.0.12"], state_settings(), fake).probe("true")
    assert [p.where for p in info.value.problems] == ["10.0.0.12"]
    assert fake.transports["10.0.0.11"].closed


def test_discovery_refuses_an_address_before_connecting() -> None:
    fake = FailingConnect(unreachable=[])
    with pytest.raises(InputError) as info:
        Discovery(["10.0.0.11", "a;reboot"], state_settings(), fake).probe("true")
    assert info.value.problems[0].where == "a;reboot"
    assert fake.attempts == []


def state_settings():
    from sparkctl.inventory.models import SshSettings

    return SshSettings()


# --- on_interrupt ---------------------------------------------------------------------------------------

SOAK = """\
name: soak
steps:
  - name: start
    action: shell
    shell: true
    args: {argv: [start-thing], changes: false}
  - name: wait
    action: shell
    shell: true
    args: {argv: [wait-thing], changes: false}
cleanup:
  - name: stop
    action: shell
    shell: true
    args: {argv: [stop-thing]}
on_interrupt: [stop]
"""


def _interrupted(responses_extra: dict, text: str):
    responses = {"sh -s": Result(0, PROBE_OUTPUT, ""), "wait-thing": KeyboardInterrupt(), **responses_extra}
    session, ts = session_with(responses)
    rb = parse_runbook(text, "soak.yaml")
    secrets = session.secrets_for_plan()
    report = session.apply(rb, session.plan(rb, {}, secrets), {}, secrets)
    return report, ts


def test_ctrl_c_runs_the_cleanup_steps_a_user_runbook_declares(isolated_state) -> None:
    report, ts = _interrupted({}, SOAK)
    assert report.interrupted and not report.ok
    assert any("wait-thing" in t.commands for t in ts.values())
    for t in ts.values():  # the interrupted step may not have started on the other host; the cleanup runs on both
        ran = [c for c in t.commands if c != "sh -s"]
        assert ran[0] == "start-thing" and ran[-1] == "stop-thing" and ran.count("stop-thing") == 1


def test_without_on_interrupt_nothing_runs_after_ctrl_c(isolated_state) -> None:
    report, ts = _interrupted({}, SOAK.replace("on_interrupt: [stop]\n", ""))
    assert report.interrupted
    for t in ts.values():
        assert "stop-thing" not in t.commands


def test_ctrl_c_runs_a_declared_built_in_runbook_and_journals_it(isolated_state) -> None:
    report, _ = _interrupted({}, SOAK.replace("on_interrupt: [stop]", "on_interrupt: [down]"))
    assert report.interrupted
    runs = state.read_journal()
    assert [(r["runbook"], r["interrupted"]) for r in runs] == [("soak", True), ("down", False)]


def test_up_declares_down_on_interrupt() -> None:
    assert load_runbook("up").on_interrupt == ["down"]


def test_on_interrupt_names_a_cleanup_step_or_a_built_in() -> None:
    with pytest.raises(RunbookError) as info:
        parse_runbook(SOAK.replace("on_interrupt: [stop]", "on_interrupt: [stopp]"), "soak.yaml")
    problem = info.value.problems[0]
    assert problem.where == f"soak.yaml:{SOAK.count(chr(10))} on_interrupt[0]"
    assert "'stopp' is neither a cleanup step nor a built-in runbook" in problem.message


def test_discover_reaches_hosts_only_through_the_session_seam(mocker, isolated_state) -> None:
    from typer.testing import CliRunner

    from sparkctl.cli.app import app

    fake = FailingConnect(message="No route to host")  # every host unreachable
    seam = mocker.patch.object(door, "CONNECTOR", return_value=fake)
    result = CliRunner().invoke(app, ["discover", "10.0.0.11", "10.0.0.12", "--accept-new-host-keys"])
    assert result.exit_code == 1, result.output
    seam.assert_called_once_with(True)
    assert sorted(fake.attempts) == ["10.0.0.11", "10.0.0.12"]
    assert "10.0.0.12: cannot connect: No route to host" in result.output
