"""Faults on real hosts: sparkctl refuses or stops before harm, names the host or link, and leaks nothing."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from tests.integration.helpers import cli_env, host_snapshot, sparkctl
from tests.testbed import Testbed

pytestmark = pytest.mark.testbed


def _untouched(tb: Testbed, before: dict[str, dict[str, object]]) -> None:
    for host, snap in before.items():
        assert host_snapshot(tb, host) == snap, f"{host} was changed"


def test_unreachable_host_changes_nothing_anywhere(
    fresh_testbed: Testbed, inventory: Path, sudo_env: dict[str, str], tmp_path: Path
) -> None:
    tb = fresh_testbed
    tb.stop_sshd("spark-b")
    before = {h: host_snapshot(tb, h) for h in tb.hosts}
    r = sparkctl("up", "--yes", "-i", str(inventory), env=cli_env(sudo_env, tmp_path))
    assert r.returncode == 1
    assert "spark-b" in r.stderr and "nothing was changed" in r.stderr
    assert "Traceback" not in r.stderr
    _untouched(tb, before)


def test_changed_host_key_is_refused_before_any_command(
    fresh_testbed: Testbed, inventory: Path, sudo_env: dict[str, str], tmp_path: Path
) -> None:
    tb = fresh_testbed
    tb.change_host_key("spark-b")
    before = {h: host_snapshot(tb, h) for h in tb.hosts}
    r = sparkctl("up", "--yes", "--accept-new-host-keys", "-i", str(inventory), env=cli_env(sudo_env, tmp_path))
    assert r.returncode == 1
    assert "spark-b" in r.stderr and "ssh-keygen -R" in r.stderr
    _untouched(tb, before)


def test_unknown_host_key_is_refused_unless_accepted(
    fresh_testbed: Testbed, inventory: Path, sudo_env: dict[str, str], tmp_path: Path
) -> None:
    data = yaml.safe_load(inventory.read_text())
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    data["ssh"]["known_hosts"] = str(empty)
    inv = tmp_path / "inv.yaml"
    inv.write_text(yaml.safe_dump(data))
    env = cli_env(sudo_env, tmp_path)
    r = sparkctl("plan", "-i", str(inv), env=env)
    assert r.returncode == 1 and "--accept-new-host-keys" in r.stderr
    assert empty.read_text() == ""
    r = sparkctl("plan", "--accept-new-host-keys", "-i", str(inv), env=env)
    assert r.returncode == 0, r.stderr
    assert "10.77.0.11" in empty.read_text() and "10.77.0.12" in empty.read_text()


def test_management_interface_listed_as_a_twin_is_refused(
    fresh_testbed: Testbed, inventory: Path, sudo_env: dict[str, str], tmp_path: Path
) -> None:
    tb = fresh_testbed
    data = yaml.safe_load(inventory.read_text())
    data["hosts"][1]["fabric"][0]["interface"] = "enP7s7"  # spark-b's management interface
    inv = tmp_path / "inv.yaml"
    inv.write_text(yaml.safe_dump(data))
    before = {h: host_snapshot(tb, h) for h in tb.hosts}
    r = sparkctl("up", "--yes", "-i", str(inv), env=cli_env(sudo_env, tmp_path))
    assert r.returncode == 2
    assert "enP7s7" in r.stderr and "SSH session" in r.stderr
    _untouched(tb, before)


def test_peer_twin_at_mtu_1500_fails_the_jumbo_check_naming_the_link(
    fresh_testbed: Testbed, inventory: Path, sudo_env: dict[str, str], tmp_path: Path
) -> None:
    tb = fresh_testbed
    env = cli_env(sudo_env, tmp_path)
    assert sparkctl("run", "up", "--only", "fabric", "--yes", "-i", str(inventory), env=env).returncode == 0
    tb.set_mtu("spark-b", "enp1s0f1np1", 1500)
    r = sparkctl("run", "up", "--only", "fabric-check", "--yes", "-i", str(inventory), env=env, timeout=120)
    assert r.returncode == 1
    assert "spark-a" in r.stdout and "enp1s0f1np1" in r.stdout and "192.168.100.11" in r.stdout
    d = sparkctl("doctor", "--json", "-i", str(inventory), env=env)
    assert d.returncode == 1
    jumbo = {f["subject"]: f["level"] for f in json.loads(d.stdout) if f["rule"] == "jumbo-path"}
    assert jumbo["spark-a enp1s0f1np1 -> spark-b enp1s0f1np1 192.168.100.11"] == "fail"
    assert jumbo["spark-a enP2p1s0f1np1 -> spark-b enP2p1s0f1np1 192.168.101.11"] == "pass"


def test_wrong_sudo_password_fails_fast_and_is_never_shown(
    fresh_testbed: Testbed, inventory: Path, sudo_env: dict[str, str], tmp_path: Path
) -> None:
    tb = fresh_testbed
    wrong = "not-the-password-4711"
    env = {**cli_env(sudo_env, tmp_path), "SPARKCTL_SUDO_PASSWORD": wrong}
    before = {h: host_snapshot(tb, h) for h in tb.hosts}
    t0 = time.monotonic()
    r = sparkctl("up", "--yes", "-i", str(inventory), env=env, timeout=120)
    assert time.monotonic() - t0 < 30
    assert r.returncode == 1
    assert "spark-b" in r.stderr and "sudo" in r.stderr
    assert wrong not in r.stdout + r.stderr
    journal = tmp_path / "sparkctl" / "journal.jsonl"
    assert not journal.exists() or wrong not in journal.read_text()
    _untouched(tb, before)


def test_twin_missing_on_a_host_is_refused_before_any_change(
    fresh_testbed: Testbed, inventory: Path, sudo_env: dict[str, str], tmp_path: Path
) -> None:
    tb = fresh_testbed
    tb.fail_nm_activation("spark-b", "enP2p1s0f1np1")  # the device disappears from spark-b
    before = {h: host_snapshot(tb, h) for h in tb.hosts}
    r = sparkctl("up", "--yes", "-i", str(inventory), env=cli_env(sudo_env, tmp_path))
    assert r.returncode == 2
    assert "spark-b" in r.stderr and "enP2p1s0f1np1" in r.stderr and "no such interface" in r.stderr
    _untouched(tb, before)


def test_occupied_ray_port_fails_preflight(
    fresh_testbed: Testbed, inventory: Path, sudo_env: dict[str, str], tmp_path: Path
) -> None:
    tb = fresh_testbed
    with tb.occupy_port("spark-a", 6379):
        before = {h: host_snapshot(tb, h) for h in tb.hosts}
        r = sparkctl("up", "--yes", "-i", str(inventory), env=cli_env(sudo_env, tmp_path))
        assert r.returncode == 1
        assert "ports-free" in r.stderr and "6379" in r.stderr
        _untouched(tb, before)


@pytest.mark.parametrize("full", ["state", "logs"])
def test_a_full_state_or_log_filesystem_on_a_host_fails_up_before_any_change(
    fresh_testbed: Testbed, inventory: Path, sudo_env: dict[str, str], tmp_path: Path, full: str
) -> None:
    tb = fresh_testbed
    state = "/home/spark/.local/state/sparkctl"
    target = state if full == "state" else f"{state}/logs"
    tb.exec("spark-b", ["mkdir", "-p", target], user="spark")
    # a small tmpfs over the directory, in spark-b's own mount namespace, filled to the last byte
    tb.exec("spark-b", ["sh", "-c", "mount -t tmpfs -o size=1m,mode=0700,uid=$(id -u spark),gid=$(id -g spark) "
                        f"sparkctl-full {target} && cat /dev/zero > {target}/fill 2>/dev/null; true"])  # fmt: skip
    try:
        assert tb.exec("spark-b", ["df", "-P", "-B1", target]).stdout.split()[-3] == "0"  # full indeed
        before = {h: host_snapshot(tb, h) for h in tb.hosts}
        r = sparkctl("up", "--yes", "-i", str(inventory), env=cli_env(sudo_env, tmp_path))
        assert r.returncode == 1, r.stdout + r.stderr
        assert f"error: spark-b [state-dir-free]: {target}: 0 bytes (0.0 MiB) free" in r.stderr, r.stderr
        assert "df -h" in r.stderr and "nothing was changed" in r.stderr
        assert "spark-a [state-dir-free]" not in r.stderr  # spark-a has room
        assert "Traceback" not in r.stderr
        _untouched(tb, before)
    finally:
        tb.exec("spark-b", ["umount", target], check=False)


def test_ctrl_c_during_up_leaves_no_worker_running(
    fresh_testbed: Testbed, sudo_env: dict[str, str], tmp_path: Path
) -> None:
    import signal
    import subprocess
    import sys

    from tests.integration.helpers import REPO, spark_processes

    tb = fresh_testbed
    inv = tb.inventory_path(
        workloads=[{"name": "embed", "engine": "embed", "tensor_parallel_size": 2, "port": 8100, "ready_timeout": 600}]
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "sparkctl", "up", "--yes", "-i", str(inv)],
        cwd=REPO,
        env=cli_env(sudo_env, tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:  # interrupt once the workload has been launched and up is waiting for it
        seen.append(line)
        if "verify_workload:embed ..." in line:
            break
    else:
        pytest.fail("up never reached the readiness wait:\n" + "".join(seen))
    assert spark_processes(tb, "spark-a", "embed_worker")  # it is running now
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, "".join(seen) + rest
    for host in tb.hosts:
        for needle in ("embed_worker", "raylet", "RankWorker"):
            assert spark_processes(tb, host, needle) == [], (host, needle)
