"""The fabric change as a transaction: NetworkManager checkpoint facts, the planned checkpoint/commit/rollback
commands, the engine undoing uncommitted changes, and duplicate sparkctl profiles as drift."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest

from sparkctl import paths
from sparkctl.doctor.evaluate import evaluate
from sparkctl.doctor.evaluators import CheckContext
from sparkctl.execute.base import Result
from sparkctl.execute.fake import RecordingTransport
from sparkctl.facts.models import HostFacts, Interface, NmCheckpoints, NmConnection, NmDevice
from sparkctl.facts.parse import parse_nm_checkpoints, parse_probe
from sparkctl.facts.probe import MARK
from sparkctl.inventory import parse_inventory
from sparkctl.inventory.models import Inventory
from sparkctl.plan import fabric
from sparkctl.plan.context import PlanContext
from sparkctl.plan.models import Command, Plan, Rollback, Stage, Step
from sparkctl.runbook.load import load_runbook, resolve_params
from sparkctl.runbook.planner import build_runbook_plan
from sparkctl.session.engine import Engine

EXAMPLE = Path(__file__).resolve().parents[2] / "inventories" / "example-pair.yaml"
TWINS = ("enp1s0f1np1", "enP2p1s0f1np1")
DEV = {TWINS[0]: "/org/freedesktop/NetworkManager/Devices/3", TWINS[1]: "/org/freedesktop/NetworkManager/Devices/4"}
CP = "/org/freedesktop/NetworkManager/Checkpoint/7"


@pytest.fixture(scope="module")
def inv() -> Inventory:
    text = EXAMPLE.read_text()
    return parse_inventory(text.replace("network:\n", "network:\n  checkpoint_timeout: 45\n", 1), "inv.yaml")


def host_facts(inv: Inventory, name: str, *, converged: bool = False, **kw: object) -> HostFacts:
    """A host whose twins are fresh (no address, MTU 1500) or converged (sparkctl profiles active)."""
    host = inv.host(name)
    interfaces = {"enP7s7": Interface(name="enP7s7", mtu=1500, up=True, ipv4=["10.0.0.11/24"])}
    cons, devs = [], {}
    for j, t in enumerate(host.fabric):
        if converged:
            interfaces[t.interface] = Interface(name=t.interface, mtu=9000, up=True, ipv4=[str(t.address)])
            pname = paths.connection_name(t.interface)
            cons.append(
                NmConnection(
                    uuid=f"0000000{j}-aaaa-4bbb-8ccc-dddddddddddd",
                    name=pname,
                    type="802-3-ethernet",
                    device=t.interface,
                    interface_name=t.interface,
                    ipv4_method="manual",
                    ipv4_addresses=[str(t.address)],
                    ipv6_method="disabled",
                    mtu=inv.network.mtu,
                )
            )
            devs[t.interface] = NmDevice(name=t.interface, type="ethernet", state="connected", connection=pname)
        else:
            interfaces[t.interface] = Interface(name=t.interface, mtu=1500, up=True)
            devs[t.interface] = NmDevice(name=t.interface, type="ethernet", state="disconnected")
    base: dict[str, object] = {
        "host": name,
        "user": "nvidia",
        "home": "/home/nvidia",
        "ssh_server_ip": "10.0.0.11",
        "ssh_interface": "enP7s7",
        "interfaces": interfaces,
        "nm_running": True,
        "nm_connections": cons,
        "nm_devices": devs,
        "nm_checkpoints": NmCheckpoints(devices=DEV),
    }
    base.update(kw)
    return HostFacts.model_validate(base)


def plan_fab(inv: Inventory, host: Any, facts: HostFacts) -> list[Step]:
    return fabric.plan_fabric(PlanContext(inv, {host.name: facts}), host)


# --- facts -------------------------------------------------------------------------------------------------


def test_checkpoint_section_parses_busctl_replies() -> None:
    # busctl prints a reply as its signature, then the values (object paths quoted)
    text = (
        f'device {TWINS[0]} o "{DEV[TWINS[0]]}"\n'
        f"device {TWINS[1]} \n"  # GetDeviceByIpIface failed: no path
        f'listed ao 2 "{CP}" "/org/freedesktop/NetworkManager/Checkpoint/8"\n'
        f"file {CP}\n"
    )
    cp = parse_nm_checkpoints(text)
    assert cp.devices == {TWINS[0]: DEV[TWINS[0]]}
    assert cp.listed == [CP, "/org/freedesktop/NetworkManager/Checkpoint/8"]
    assert cp.pending == CP


def test_a_recorded_checkpoint_networkmanager_no_longer_holds_is_not_pending() -> None:
    cp = parse_nm_checkpoints(f"listed ao 0\nfile {CP}\n")
    assert cp.recorded == CP and cp.listed == [] and cp.pending == ""
    assert parse_nm_checkpoints("listed ao 0\nfile \n").recorded == ""
    assert parse_nm_checkpoints("file /etc/passwd\n").recorded == ""  # only a checkpoint path counts


def test_probe_output_carries_the_checkpoint_section() -> None:
    out = f'{MARK} identity\nnvidia\n/home/nvidia\nspark-a\n{MARK} nm_checkpoint\nlisted ao 1 "{CP}"\nfile {CP}\n'
    assert parse_probe("spark-a", out).nm_checkpoints.pending == CP


# --- planning ----------------------------------------------------------------------------------------------


def test_a_changing_host_opens_a_checkpoint_first_with_the_exact_busctl_call(inv: Inventory) -> None:
    host = inv.host("spark-a")
    steps = plan_fab(inv, host, host_facts(inv, "spark-a"))
    first = steps[0]
    assert first.kind == "fabric_checkpoint" and first.changes and not first.verdict
    (cmd,) = first.commands
    assert cmd.sudo and cmd.argv[:2] == ["sh", "-c"]
    create = shlex.join(
        [
            "busctl",
            "call",
            "org.freedesktop.NetworkManager",
            "/org/freedesktop/NetworkManager",
            "org.freedesktop.NetworkManager",
            "CheckpointCreate",
            "aouu",
            "2",
            DEV[TWINS[0]],
            DEV[TWINS[1]],
            "45",  # network.checkpoint_timeout
            "2",  # NM_CHECKPOINT_CREATE_FLAG_DELETE_NEW_CONNECTIONS
        ]
    )
    assert create in cmd.argv[2] and paths.CHECKPOINT_FILE in cmd.argv[2]
    assert first.rollback is not None and first.rollback.commit == "fabric_commit"
    assert "CheckpointRollback" in first.rollback.commands[0].argv[2]
    assert "45 s" in first.rollback.fallback
    assert [s.kind for s in steps[1:]] == ["fabric_profile", "fabric_active"] * 2


def test_a_converged_host_opens_no_checkpoint(inv: Inventory) -> None:
    host = inv.host("spark-a")
    assert plan_fab(inv, host, host_facts(inv, "spark-a", converged=True)) == []


def test_another_runs_pending_checkpoint_fails_the_step_even_when_converged(inv: Inventory) -> None:
    cp = NmCheckpoints(devices=DEV, listed=[CP], recorded=CP)
    steps = plan_fab(inv, inv.host("spark-a"), host_facts(inv, "spark-a", converged=True, nm_checkpoints=cp))
    assert [s.kind for s in steps] == ["fabric_checkpoint"]
    assert CP in steps[0].verdict and "45 s" in steps[0].verdict


def test_missing_device_path_is_a_named_verdict(inv: Inventory) -> None:
    facts = host_facts(inv, "spark-a", nm_checkpoints=NmCheckpoints(devices={TWINS[0]: DEV[TWINS[0]]}))
    steps = plan_fab(inv, inv.host("spark-a"), facts)
    assert TWINS[1] in steps[0].verdict and "busctl" in steps[0].verdict


def test_rivals_are_turned_off_only_by_the_commit(inv: Inventory) -> None:
    """Changing a profile saves it to disk, which a rollback cannot undo: the fabric stage leaves rival profiles
    alone (the sparkctl profile takes the device over), the commit stage turns their autoconnect off."""
    idle = NmConnection(uuid="11111111-2222-4333-8444-555555555555", name="Wired connection 9", interface_name=TWINS[0])
    busy = NmConnection(uuid="66666666-2222-4333-8444-555555555555", name="Wired connection 1", device=TWINS[1])
    devs = {
        TWINS[0]: NmDevice(name=TWINS[0], type="ethernet", state="disconnected"),
        TWINS[1]: NmDevice(name=TWINS[1], type="ethernet", state="connected", connection="Wired connection 1"),
    }
    facts = host_facts(inv, "spark-a", nm_connections=[idle, busy], nm_devices=devs)
    steps = plan_fab(inv, inv.host("spark-a"), facts)
    assert "fabric_rival_profile" not in {s.kind for s in steps}
    assert steps[0].rollback is not None and len(steps[0].rollback.commands) == 1  # the checkpoint covers it all
    commit = fabric.plan_fabric_commit(inv, inv.host("spark-a"), facts, run_opens=True)
    assert [s.kind for s in commit] == ["fabric_commit", "fabric_rival_profile", "fabric_rival_profile"]
    assert [s.commands[0].argv[4] for s in commit[1:]] == [idle.uuid, busy.uuid]
    # a converged host whose rival autoconnects again: the commit stage alone repairs it, without a checkpoint
    done = host_facts(inv, "spark-a", converged=True)
    done = done.model_copy(update={"nm_connections": [*done.nm_connections, idle]})
    assert plan_fab(inv, inv.host("spark-a"), done) == []
    assert [s.kind for s in fabric.plan_fabric_commit(inv, inv.host("spark-a"), done, run_opens=False)] == [
        "fabric_rival_profile"
    ]


def test_rollback_restores_an_inactive_sparkctl_profile_it_modified(inv: Inventory) -> None:
    """A checkpoint restores only the profile active on each device; an inactive sparkctl profile that the run
    modifies is restored by sparkctl's own nmcli command."""
    pname = paths.connection_name(TWINS[0])
    stale = NmConnection(
        uuid="77777777-2222-4333-8444-555555555555",
        name=pname,
        interface_name=TWINS[0],
        ipv4_method="manual",
        ipv4_addresses=["192.168.100.99/24"],
        ipv6_method="disabled",
    )
    facts = host_facts(inv, "spark-a", nm_connections=[stale])
    steps = plan_fab(inv, inv.host("spark-a"), facts)
    assert steps[0].rollback is not None
    undo = [c.argv for c in steps[0].rollback.commands[1:]]
    assert undo == [
        [
            "nmcli",
            "connection",
            "modify",
            "uuid",
            stale.uuid,
            "ipv4.addresses",
            "192.168.100.99/24",
            "802-3-ethernet.mtu",
            "0",
        ]
    ]


def test_commit_is_planned_where_the_run_opens_a_checkpoint_and_after_it(inv: Inventory) -> None:
    a, b = inv.host("spark-a"), inv.host("spark-b")
    fresh, done = host_facts(inv, "spark-a"), host_facts(inv, "spark-b", converged=True)
    assert fabric.plan_fabric_commit(inv, a, fresh, run_opens=False) == []
    (before,) = fabric.plan_fabric_commit(inv, a, fresh, run_opens=True)
    assert before.depends_on_earlier and "CheckpointDestroy" in before.commands[0].argv[2]
    assert fabric.plan_fabric_commit(inv, b, done, run_opens=True) == []  # b changes nothing: nothing to commit
    pending = host_facts(inv, "spark-a", converged=True, nm_checkpoints=NmCheckpoints(listed=[CP], recorded=CP))
    (after,) = fabric.plan_fabric_commit(inv, a, pending, run_opens=True)
    assert after.commands == before.commands and not after.depends_on_earlier  # plan equals apply


def test_up_plans_checkpoint_then_commit_after_the_jumbo_check(inv: Inventory) -> None:
    rb = load_runbook("up")
    facts = {"spark-a": host_facts(inv, "spark-a"), "spark-b": host_facts(inv, "spark-b", converged=True)}
    plan = build_runbook_plan(rb, PlanContext(inv, facts), resolve_params(rb, {}))
    names = [st.name for st in plan.stages]
    assert names.index("fabric") < names.index("fabric-check") < names.index("fabric-commit")
    commit = next(st for st in plan.stages if st.name == "fabric-commit")
    assert [s.host for s in commit.steps] == ["spark-a"]
    assert [s.kind for s in plan.stages[0].steps if s.host == "spark-b"] == []


@pytest.mark.parametrize("which", ["create", "commit", "rollback"])
def test_checkpoint_shell_lines_parse(inv: Inventory, which: str) -> None:
    host, facts = inv.host("spark-a"), host_facts(inv, "spark-a")
    first = plan_fab(inv, host, facts)[0]
    assert first.rollback is not None
    line = {
        "create": first.commands[0],
        "commit": fabric.plan_fabric_commit(inv, host, facts, run_opens=True)[0].commands[0],
        "rollback": first.rollback.commands[0],
    }[which].argv[2]
    subprocess.run(["sh", "-n", "-c", line], check=True)


# --- duplicates --------------------------------------------------------------------------------------------


def test_duplicate_profiles_are_deleted_by_uuid_keeping_the_active_one(inv: Inventory) -> None:
    facts = host_facts(inv, "spark-a", converged=True)
    active = facts.nm_connections[0]
    copy = active.model_copy(update={"uuid": "99999999-aaaa-4bbb-8ccc-dddddddddddd", "device": ""})
    facts = facts.model_copy(update={"nm_connections": [copy, *facts.nm_connections]})  # the copy listed first
    steps = plan_fab(inv, inv.host("spark-a"), facts)
    assert [s.kind for s in steps] == ["fabric_checkpoint", "fabric_duplicate_profile"]
    assert steps[1].commands[0].argv == ["nmcli", "connection", "delete", "uuid", copy.uuid]
    assert active.uuid in steps[1].description
    found = [f for f in evaluate(CheckContext(inv, {"spark-a": facts})) if f.rule == "twin-duplicate-profile"]
    bad = [f for f in found if f.level == "fail"]
    assert [f.subject for f in bad] == [f"spark-a {TWINS[0]}"]
    assert copy.uuid in bad[0].evidence and active.uuid in bad[0].evidence and bad[0].source
    assert {f.level for f in found if f.subject == f"spark-a {TWINS[1]}"} == {"pass"}


# --- the engine --------------------------------------------------------------------------------------------


def tx_step(host: str, undo: str) -> Step:
    return Step(
        host=host,
        kind="fabric_checkpoint",
        description="open",
        commands=[Command(argv=["open-checkpoint"])],
        rollback=Rollback(commands=[Command(argv=[undo])], commit="fabric_commit", fallback=f"{host} undoes itself"),
    )


def simple(host: str, kind: str, argv: str) -> Step:
    return Step(host=host, kind=kind, description=kind, commands=[Command(argv=[argv])])


def run(plan: Plan, ts: dict[str, RecordingTransport]) -> tuple[Engine, object]:
    eng = Engine(transports=ts, nopasswd={h: True for h in ts}, sleep=lambda s: None)
    return eng, eng.run(plan)


def test_a_failure_before_the_commit_rolls_back_every_host_that_opened_one() -> None:
    ts = {
        "spark-a": RecordingTransport("spark-a"),
        "spark-b": RecordingTransport("spark-b", {"activate": Result(1, "", "Error: no suitable device")}),
    }
    plan = Plan(
        cluster="c",
        runbook="up",
        hosts=["spark-a", "spark-b"],
        stages=[
            Stage(
                name="fabric",
                action="fabric",
                steps=[tx_step("spark-a", "undo-a"), tx_step("spark-b", "undo-b"), simple("spark-b", "x", "activate")],
            ),
            Stage(name="commit", action="fabric_commit", steps=[simple("spark-a", "fabric_commit", "commit")]),
        ],
    )
    _, report = run(plan, ts)
    assert not report.ok  # type: ignore[attr-defined]
    assert ts["spark-a"].commands == ["open-checkpoint", "undo-a"]
    assert ts["spark-b"].commands == ["open-checkpoint", "activate", "undo-b"]
    assert report.rolled_back == ["spark-a", "spark-b"]  # type: ignore[attr-defined]
    rb = [r for r in report.results if r.stage == "rollback"]  # type: ignore[attr-defined]
    assert {(r.host, r.status) for r in rb} == {("spark-a", "changed"), ("spark-b", "changed")}


def test_an_unreachable_host_is_named_with_what_undoes_it() -> None:
    from sparkctl.execute.base import CommandTimeout

    ts = {
        "spark-a": RecordingTransport("spark-a", {"check": Result(1, "", "100% packet loss")}),
        "spark-b": RecordingTransport("spark-b", {"undo-b": CommandTimeout("spark-b: no answer within 30 s")}),
    }
    plan = Plan(
        cluster="c",
        runbook="up",
        hosts=["spark-a", "spark-b"],
        stages=[
            Stage(name="fabric", action="fabric", steps=[tx_step("spark-a", "undo-a"), tx_step("spark-b", "undo-b")]),
            Stage(name="check", action="verify_fabric", steps=[simple("spark-a", "verify_jumbo", "check")]),
        ],
    )
    _, report = run(plan, ts)
    (b,) = [r for r in report.results if r.stage == "rollback" and r.host == "spark-b"]  # type: ignore[attr-defined]
    assert b.status == "failed" and "spark-b undoes itself" in b.error


def test_after_the_commit_a_later_failure_rolls_nothing_back() -> None:
    ts = {"spark-a": RecordingTransport("spark-a", {"ray": Result(1, "", "ray failed")})}
    plan = Plan(
        cluster="c",
        runbook="up",
        hosts=["spark-a"],
        stages=[
            Stage(name="fabric", action="fabric", steps=[tx_step("spark-a", "undo-a")]),
            Stage(name="commit", action="fabric_commit", steps=[simple("spark-a", "fabric_commit", "commit")]),
            Stage(name="ray", action="ray_start", steps=[simple("spark-a", "ray_node", "ray")]),
        ],
    )
    _, report = run(plan, ts)
    assert not report.ok and report.rolled_back == []  # type: ignore[attr-defined]
    assert ts["spark-a"].commands == ["open-checkpoint", "commit", "ray"]


def test_an_interrupt_before_the_commit_rolls_back() -> None:
    class Interrupting(RecordingTransport):
        def run(self, command: str, *, stdin: str | None = None, timeout: float) -> Result:
            if command == "activate":
                raise KeyboardInterrupt
            return super().run(command, stdin=stdin, timeout=timeout)

    ts = {"spark-a": Interrupting("spark-a")}
    plan = Plan(
        cluster="c",
        runbook="up",
        hosts=["spark-a"],
        stages=[
            Stage(name="fabric", action="fabric", steps=[tx_step("spark-a", "undo-a")]),
            Stage(name="more", action="fabric", steps=[simple("spark-a", "fabric_active", "activate")]),
        ],
    )
    _, report = run(plan, ts)
    assert report.interrupted and ts["spark-a"].commands[-1] == "undo-a"  # type: ignore[attr-defined]


# busctl's replies as the real busctl 252 printed them on the testbed (CheckpointCreate: `o "PATH"`;
# CheckpointRollback: `a{su} N "DEVICE" RESULT ...`; a destroyed or expired checkpoint: "Call failed: ...").
FAKE_BUSCTL = """#!/bin/sh
case "$*" in
*CheckpointCreate*) echo 'o "/org/freedesktop/NetworkManager/Checkpoint/3"';;
*CheckpointRollback*) d=/org/freedesktop/NetworkManager/Devices; echo "a{su} 2 \\"$d/3\\" 0 \\"$d/4\\" ${RB:-0}";;
*CheckpointDestroy*) [ -z "$GONE" ] || { echo "Call failed: checkpoint $7 does not exist" >&2; exit 1; };;
esac
"""


def test_checkpoint_lines_record_commit_and_roll_back(inv: Inventory, tmp_path: Path) -> None:
    import os

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "busctl").write_text(FAKE_BUSCTL)
    (tmp_path / "bin" / "busctl").chmod(0o755)
    host, facts = inv.host("spark-a"), host_facts(inv, "spark-a")
    first = plan_fab(inv, host, facts)[0]
    assert first.rollback is not None
    record = tmp_path / "run" / "nm-checkpoint"
    lines = {
        "create": first.commands[0].argv[2],
        "rollback": first.rollback.commands[0].argv[2],
        "commit": fabric.plan_fabric_commit(inv, host, facts, run_opens=True)[0].commands[0].argv[2],
    }

    def sh(which: str, **env: str) -> subprocess.CompletedProcess[str]:
        line = lines[which].replace(str(Path(paths.CHECKPOINT_FILE).parent), str(record.parent))
        path = f"{tmp_path / 'bin'}:{os.environ['PATH']}"
        return subprocess.run(
            ["sh", "-c", line], env={**os.environ, "PATH": path, **env}, capture_output=True, text=True, check=False
        )

    assert sh("create").returncode == 0 and record.read_text() == f"{CP[:-1]}3\n"
    assert sh("commit").returncode == 0 and not record.exists()
    assert sh("create").returncode == 0
    expired = sh("commit", GONE="1")
    assert expired.returncode == 1 and "raise network.checkpoint_timeout" in expired.stderr and not record.exists()
    assert sh("rollback").returncode == 0  # nothing recorded: nothing to roll back
    assert sh("create").returncode == 0
    failed = sh("rollback", RB="3")  # NM_ROLLBACK_RESULT_ERR_FAILED for one device
    assert failed.returncode == 1 and "could not restore every device" in failed.stderr
    assert sh("create").returncode == 0 and sh("rollback").returncode == 0 and not record.exists()


def test_a_host_lost_while_re_reading_between_stages_still_rolls_back_the_others() -> None:
    from sparkctl.errors import HostError, Problem

    ts = {h: RecordingTransport(h) for h in ("spark-a", "spark-b")}
    plan = Plan(
        cluster="c",
        runbook="up",
        hosts=["spark-a", "spark-b"],
        stages=[
            Stage(name="fabric", action="fabric", steps=[tx_step("spark-a", "undo-a"), tx_step("spark-b", "undo-b")]),
            Stage(name="commit", action="fabric_commit", steps=[simple("spark-a", "fabric_commit", "commit")]),
        ],
    )

    def replan(done: frozenset[str], start: int) -> Plan:
        raise HostError([Problem("spark-b", "connection lost")])

    eng = Engine(transports=ts, nopasswd={h: True for h in ts}, sleep=lambda s: None)
    report = eng.run(plan, replan=replan)
    assert not report.ok and report.host_errors == {"spark-b": "connection lost"}
    assert ts["spark-a"].commands == ["open-checkpoint", "undo-a"]  # never committed, rolled back
    assert report.rolled_back == ["spark-a", "spark-b"]
