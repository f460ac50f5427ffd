"""Faults in the fabric stage and in a running workload, on real hosts: the fabric change is a transaction
(NetworkManager checkpoints), duplicate profiles are drift, and a broken tensor-parallel group is repaired."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.helpers import REPO, cli_env, host_snapshot, plan_steps, spark_processes, sparkctl
from tests.testbed import Testbed
from tests.testbed.layout import MGMT_IFNAME

pytestmark = pytest.mark.testbed

CHECKPOINT_FILE = "/run/sparkctl/nm-checkpoint"


def _write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _inventory(
    tb: Testbed, tmp_path: Path, name: str = "inv.yaml", command_timeout: float | None = None, **network: Any
) -> Path:
    data = tb.inventory_data()
    data["network"] = {**data.get("network", {}), **network}
    if command_timeout is not None:  # a cut-off host fails its step after this, not after 120 s
        data["ssh"] = {**data["ssh"], "command_timeout": command_timeout}
    return _write(tmp_path / name, data)


def _nm_state(snapshot: dict[str, Any]) -> dict[str, Any]:
    """A host snapshot without the login user's processes (a cut-off SSH session's sshd lingers there)."""
    return {k: v for k, v in snapshot.items() if k != "procs"}


def _settled(tb: Testbed, host: str, want: dict[str, Any], timeout: float) -> dict[str, Any]:
    """The host's snapshot once it equals `want` (NetworkManager re-activates profiles asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        snap = host_snapshot(tb, host)
        if snap == want or time.monotonic() > deadline:
            return snap
        time.sleep(0.5)


def _checkpoints(tb: Testbed, host: str) -> str:
    return tb.exec(
        host,
        [
            "busctl",
            "get-property",
            "org.freedesktop.NetworkManager",
            "/org/freedesktop/NetworkManager",
            "org.freedesktop.NetworkManager",
            "Checkpoints",
        ],
    ).stdout.strip()


def test_a_host_failing_in_the_fabric_stage_rolls_back_every_host(
    fresh_testbed: Testbed, sudo_env: dict[str, str], tmp_path: Path
) -> None:
    """spark-a's fabric change is complete and active when spark-b cannot write its profile: both return to the
    state before the run, and `up` afterwards converges."""
    tb = fresh_testbed
    inv = _inventory(tb, tmp_path)
    rb = _write(
        tmp_path / "two-phase.yaml",
        {
            "name": "two-phase",
            "steps": [
                {"name": "fabric-a", "action": "fabric", "hosts": "spark-a"},
                {"name": "fabric-b", "action": "fabric", "hosts": "spark-b"},
                {"name": "fabric-check", "action": "verify_fabric"},
                {"name": "fabric-commit", "action": "fabric_commit"},
            ],
        },
    )
    env = cli_env(sudo_env, tmp_path)
    dry = sparkctl("run", str(rb), "--dry-run", "-i", str(inv), env=env)
    assert dry.returncode == 0, dry.stderr
    assert "CheckpointCreate aouu 2" in dry.stdout and "CheckpointRollback" in dry.stdout  # the plan shows them
    before = {h: host_snapshot(tb, h) for h in tb.hosts}
    tb.read_only_nm_profiles("spark-b")
    r = sparkctl("run", str(rb), "--yes", "-i", str(inv), env=env, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "error: spark-b fabric-b/" in out and "nmcli connection" in out  # its first profile write failed
    assert "spark-a: rolled back" in out, out
    assert "Traceback" not in out
    for host in tb.hosts:
        assert _settled(tb, host, before[host], timeout=20) == before[host], f"{host} was not rolled back"
        assert _checkpoints(tb, host) == "ao 0"
        assert tb.exec(host, ["sh", "-c", f"test ! -e {CHECKPOINT_FILE}"], check=False).returncode == 0
    tb.writable_nm_profiles("spark-b")
    up = sparkctl("up", "--yes", "-i", str(inv), env=env, timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr
    again = sparkctl("plan", "--json", "-i", str(inv), env=env)
    assert [s for s in plan_steps(again.stdout) if s["changes"]] == []
    assert all(_checkpoints(tb, h) == "ao 0" for h in tb.hosts)  # committed, none left behind


def test_a_host_cut_off_after_the_change_rolls_back_by_itself(
    fresh_testbed: Testbed, sudo_env: dict[str, str], tmp_path: Path
) -> None:
    """spark-b's management link goes down after its fabric change and before the commit: sparkctl rolls back
    spark-a, names spark-b, and spark-b's NetworkManager rolls back on its own when the checkpoint expires."""
    tb = fresh_testbed
    timeout = 90  # covers the cut-off host's failing checks (2 x 10 s SSH timeouts) before spark-a's rollback
    inv = _inventory(tb, tmp_path, checkpoint_timeout=timeout)
    cut_inv = _inventory(tb, tmp_path, "cut.yaml", command_timeout=10, checkpoint_timeout=timeout)
    rb = _write(
        tmp_path / "held.yaml",
        {
            "name": "held",
            "steps": [
                {"name": "fabric", "action": "fabric"},
                {
                    "name": "hold",
                    "action": "shell",
                    "shell": True,
                    "hosts": "spark-a",
                    "args": {"argv": ["sleep", "3"], "changes": False},
                },
                {"name": "fabric-check", "action": "verify_fabric"},
                {"name": "fabric-commit", "action": "fabric_commit"},
            ],
        },
    )
    env = cli_env(sudo_env, tmp_path)
    before = {h: host_snapshot(tb, h) for h in tb.hosts}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sparkctl", "run", str(rb), "--yes", "-i", str(cut_inv)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("== hold"):
            break
    else:
        pytest.fail("the run never reached the hold step:\n" + "".join(seen))
    cut = time.monotonic()
    applied = host_snapshot(tb, "spark-b")
    assert applied != before["spark-b"], "spark-b's fabric change should be in place when the link is cut"
    assert _checkpoints(tb, "spark-b").startswith("ao 1 ")
    tb.carrier_down("spark-b", MGMT_IFNAME)
    rest, _ = proc.communicate(timeout=180)
    out = "".join(seen) + rest
    assert proc.returncode == 1, out
    assert "spark-a: rolled back" in out, out
    assert "spark-b: NOT rolled back by sparkctl" in out and "rolls the change back by itself" in out, out
    assert _settled(tb, "spark-a", before["spark-a"], timeout=20) == before["spark-a"]
    # spark-b is still cut off: its NetworkManager undoes the change by itself once the checkpoint expires
    left = max(0.0, timeout - (time.monotonic() - cut)) + 30
    deadline = time.monotonic() + left
    while _nm_state(host_snapshot(tb, "spark-b")) != _nm_state(before["spark-b"]) and time.monotonic() < deadline:
        time.sleep(0.5)
    after = host_snapshot(tb, "spark-b")
    assert _nm_state(after) == _nm_state(before["spark-b"])
    assert all(p.startswith("sshd: spark") for p in after["procs"]), after["procs"]  # only the dead session
    assert _checkpoints(tb, "spark-b") == "ao 0"
    tb.carrier_up("spark-b", MGMT_IFNAME)
    up = sparkctl("up", "--yes", "-i", str(inv), env=env, timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr


def test_duplicate_profiles_are_reported_by_doctor_and_repaired_by_plan(
    fresh_testbed: Testbed, inventory: Path, sudo_env: dict[str, str], tmp_path: Path
) -> None:
    tb = fresh_testbed
    env = cli_env(sudo_env, tmp_path)
    first = sparkctl("run", "up", "--only", "fabric", "--yes", "-i", str(inventory), env=env, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    assert all(_checkpoints(tb, h) == "ao 0" for h in tb.hosts)  # --only fabric commits too
    # what a second run at the same time leaves behind: another profile of the same name
    tb.exec(
        "spark-a",
        [
            "nmcli",
            "connection",
            "add",
            "type",
            "ethernet",
            "con-name",
            "sparkctl-enp1s0f1np1",
            "ifname",
            "enp1s0f1np1",
            "ipv4.method",
            "manual",
            "ipv4.addresses",
            "192.168.100.10/24",
            "autoconnect",
            "no",
        ],
    )
    uuids = tb.exec("spark-a", ["nmcli", "-g", "NAME,UUID,DEVICE", "connection", "show"]).stdout.splitlines()
    copies = [line.split(":") for line in uuids if line.startswith("sparkctl-enp1s0f1np1:")]
    assert len(copies) == 2
    extra = next(uuid for _, uuid, dev in copies if not dev)
    d = sparkctl("doctor", "--json", "-i", str(inventory), env=env)
    found = {(f["rule"], f["subject"]): f for f in json.loads(d.stdout)}
    dup = found[("twin-duplicate-profile", "spark-a enp1s0f1np1")]
    assert dup["level"] == "fail" and extra in dup["evidence"] and dup["source"]
    assert found[("twin-duplicate-profile", "spark-b enp1s0f1np1")]["level"] == "pass"
    p = sparkctl("plan", "--json", "-i", str(inventory), env=env)
    fabric = [s for s in plan_steps(p.stdout) if s["changes"] and s["kind"].startswith("fabric")]
    assert [(s["host"], s["kind"]) for s in fabric] == [
        ("spark-a", "fabric_checkpoint"),
        ("spark-a", "fabric_duplicate_profile"),
        ("spark-a", "fabric_commit"),
    ]
    assert fabric[1]["commands"][0]["argv"] == ["nmcli", "connection", "delete", "uuid", extra]
    fix = sparkctl("run", "up", "--only", "fabric", "--yes", "-i", str(inventory), env=env, timeout=300)
    assert fix.returncode == 0, fix.stdout + fix.stderr
    names = tb.exec("spark-a", ["nmcli", "-g", "NAME,UUID", "connection", "show"]).stdout.splitlines()
    kept = next(uuid for _, uuid, _ in copies if uuid != extra)
    assert [n for n in names if n.startswith("sparkctl-enp1s0f1np1:")] == [f"sparkctl-enp1s0f1np1:{kept}"]
    again = sparkctl("plan", "--json", "-i", str(inventory), env=env)
    assert [s["kind"] for s in plan_steps(again.stdout) if s["kind"].startswith("fabric") and s["changes"]] == []


def test_a_dead_tensor_parallel_rank_is_broken_named_and_repaired(
    fresh_testbed: Testbed, sudo_env: dict[str, str], tmp_path: Path
) -> None:
    tb = fresh_testbed
    inv = tb.inventory_path(
        workloads=[{"name": "embed", "engine": "embed", "tensor_parallel_size": 2, "port": 8100, "ready_timeout": 300}]
    )
    env = cli_env(sudo_env, tmp_path)
    up = sparkctl("up", "--yes", "-i", str(inv), env=env, timeout=600)
    assert up.returncode == 0, up.stdout + up.stderr
    ranks = spark_processes(tb, "spark-b", "RankWorker")
    assert ranks, "one rank should run on spark-b"
    tb.exec("spark-b", ["pkill", "-KILL", "-f", "RankWorker"])
    deadline = time.monotonic() + 60
    while True:  # the worker pings its ranks every 2 s
        st = json.loads(sparkctl("status", "--json", "-i", str(inv), env=env).stdout)
        w = st["workloads"]["embed"]
        # `status` reads the host's records (process) before it asks the endpoint (health): a rank lost between the
        # two shows as `process ok` with health `broken` once; the next status sees both
        if (w["process"], w["health"]) == ("broken", "broken") or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert (w["process"], w["health"]) == ("broken", "broken"), w
    # placement decides which rank lives on spark-b: the message names the rank and that node
    assert "tensor-parallel rank lost" in w["detail"] and "on spark-b" in w["detail"], w
    text = sparkctl("status", "-i", str(inv), env=env).stdout
    assert "broken:" in text and "on spark-b" in text
    d = json.loads(sparkctl("doctor", "--json", "-i", str(inv), env=env).stdout)
    (health,) = [f for f in d if f["rule"] == "workload-health"]
    assert health["level"] == "fail" and "on spark-b" in health["evidence"]
    p = sparkctl("plan", "--json", "-i", str(inv), env=env)
    restart = [s for s in plan_steps(p.stdout) if s["kind"] == "workload" and s["target"] == "embed"]
    assert len(restart) == 1 and any("broken" in line for line in restart[0]["diff"])
    again = sparkctl("up", "--yes", "-i", str(inv), env=env, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    st = json.loads(sparkctl("status", "--json", "-i", str(inv), env=env).stdout)
    assert (st["workloads"]["embed"]["process"], st["workloads"]["embed"]["health"]) == ("ok", "ready")
    assert spark_processes(tb, "spark-b", "RankWorker")
    down = sparkctl("down", "-i", str(inv), env=env, timeout=300)
    assert down.returncode == 0, down.stdout + down.stderr
