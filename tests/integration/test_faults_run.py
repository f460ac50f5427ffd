"""Faults during a run on real hosts: two runs at once, SSH lost mid-run, signals, read-only commands and secrets.

Each test ends with `up` converging again (a second `plan` is empty) and nothing of a run left behind.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sparkctl.session.lock import LockOwner
from tests.integration.helpers import REPO, TWINS, cli_env, host_snapshot, journal, spark_processes, sparkctl
from tests.testbed import Testbed

pytestmark = pytest.mark.testbed

LOCK = "/run/lock/sparkctl"
LEFT = ("raylet", "gcs_server", "embed_worker", "RankWorker")


def _start(args: list[str], env: dict[str, str], preexec: Callable[[], None] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "sparkctl", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=preexec,
    )


def _read_until(proc: subprocess.Popen[str], needle: str, seen: list[str]) -> None:
    """Read the run's output until a line contains `needle` (fails the test if the run ends first)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line)
        if needle in line:
            return
    pytest.fail(f"never saw {needle!r}:\n" + "".join(seen))


def _lock_on(tb: Testbed, host: str) -> str:
    r = tb.exec(host, ["sh", "-c", f"cat {LOCK}/owner 2>/dev/null || true"])
    return r.stdout


def _sparkctl_profiles(tb: Testbed, host: str) -> list[str]:
    out = tb.exec(host, ["nmcli", "-t", "-f", "NAME", "connection", "show"]).stdout
    return sorted(n for n in out.splitlines() if n.startswith("sparkctl-"))


def _converged(tb: Testbed, inventory: Path, env: dict[str, str]) -> None:
    """`up` again converges and a second `plan` is empty; no lock is left on any host."""
    r = sparkctl("up", "--yes", "-i", str(inventory), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    p = sparkctl("plan", "-i", str(inventory), env=env)
    assert p.returncode == 0, p.stderr
    assert "no changes: the cluster is converged" in p.stdout, p.stdout
    for host in tb.hosts:
        assert _lock_on(tb, host) == "", host
        assert _sparkctl_profiles(tb, host) == sorted(f"sparkctl-{t}" for t in TWINS), host


# --- two runs at once -------------------------------------------------------------------------------


def test_second_run_refuses_at_once_naming_the_holder(
    fresh_testbed: Testbed, inventory: Path, sudo_env: dict[str, str], tmp_path: Path
) -> None:
    tb = fresh_testbed
    first_env = cli_env(sudo_env, tmp_path / "laptop-1")
    second_env = cli_env(sudo_env, tmp_path / "laptop-2")  # another laptop: its own state, same hosts
    first = _start(["up", "--yes", "-i", str(inventory)], first_env)
    seen: list[str] = []
    try:
        _read_until(first, "== fabric", seen)  # the first run holds the lock and is changing the hosts
        record = LockOwner.parse(_lock_on(tb, "spark-a"))
        assert record is not None and record.pid == first.pid
        t0 = time.monotonic()
        second = sparkctl("up", "--yes", "-i", str(inventory), env=second_env, timeout=120)
        refused_after = time.monotonic() - t0
        print(f"second run refused after {refused_after:.2f}s:\n{second.stderr}")  # shown with -s
        assert second.returncode == 1, second.stdout + second.stderr
        err = second.stderr
        assert "locked by" in err and f"pid {first.pid}" in err and record.run_id in err, err
        assert f"{record.user}@{record.laptop}" in err and "since" in err and "sparkctl unlock" in err, err
        assert "Traceback" not in err
        assert journal(tmp_path / "laptop-2") == []  # it never started changing anything
        rest, _ = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, "".join(seen) + rest
    assert refused_after < 60
    for host in tb.hosts:  # one profile per twin: the second run did not touch the fabric
        assert _sparkctl_profiles(tb, host) == sorted(f"sparkctl-{t}" for t in TWINS), host
        assert _lock_on(tb, host) == "", host  # released at the end of the first run
    p = sparkctl("plan", "-i", str(inventory), env=first_env)
    assert "no changes: the cluster is converged" in p.stdout, p.stdout


def test_lock_of_a_dead_run_elsewhere_is_named_and_broken_by_unlock(
    fresh_testbed: Testbed, inventory: Path, sudo_env: dict[str, str], tmp_path: Path
) -> None:
    tb = fresh_testbed
    env = cli_env(sudo_env, tmp_path)
    ghost = LockOwner("testbed", "ana", "other-laptop", 4242, "20260101-000000-dead", time.time() - 3600, "sparkctl up")
    for host in tb.hosts:  # left by a laptop that crashed mid-run
        tb.exec(
            host,
            ["sh", "-c", f"mkdir {LOCK} && cat > {LOCK}/owner", "sh"],
            user="spark",
            input=ghost.to_text(),
        )
    before = {h: host_snapshot(tb, h) for h in tb.hosts}
    r = sparkctl("up", "--yes", "-i", str(inventory), env=env)
    assert r.returncode == 1
    assert "ana@other-laptop" in r.stderr and "20260101-000000-dead" in r.stderr and "sparkctl unlock" in r.stderr
    assert "nothing was changed" in r.stderr
    for host, snap in before.items():
        assert host_snapshot(tb, host) == snap, f"{host} was changed"
    u = sparkctl("unlock", "--yes", "-i", str(inventory), env=env)
    assert u.returncode == 0, u.stdout + u.stderr
    assert "ana@other-laptop" in u.stdout
    for host in tb.hosts:
        assert _lock_on(tb, host) == ""
    _converged(tb, inventory, env)


# --- SSH lost mid-run --------------------------------------------------------------------------------


def test_ssh_lost_during_the_ray_stage_says_what_was_applied_where(
    fresh_testbed: Testbed, inventory: Path, sudo_env: dict[str, str], tmp_path: Path
) -> None:
    tb = fresh_testbed
    env = cli_env(sudo_env, tmp_path)
    proc = _start(["up", "--yes", "-i", str(inventory)], env)
    seen: list[str] = []
    try:
        _read_until(proc, "== ray-head", seen)
        tb.drop_ssh("spark-b")  # while the head starts Ray on spark-a
        rest, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(seen) + rest
    print(out)  # shown with -s
    assert proc.returncode == 1, out
    assert "nothing was changed" not in out
    assert "Traceback" not in out
    lines = out.splitlines()
    a = next(x for x in lines if x.startswith("  spark-a: "))
    b = next(x for x in lines if x.startswith("  spark-b: "))
    for stage in ("fabric", "env", "ray-firewall", "ray-token", "ray-head"):
        assert stage in a, a
    assert "UNREACHABLE" in b and "fabric" in b and "ray-token" in b and "ray-head" not in b, b
    assert any(x.startswith("error: spark-b:") for x in lines), out
    runs = journal(tmp_path)
    assert len(runs) == 1 and runs[0]["runbook"] == "up" and runs[0]["ok"] is False
    assert runs[0]["hosts"]["spark-b"] == "unreachable" and "spark-b" in runs[0]["host_errors"]
    assert {s["stage"] for s in runs[0]["steps"] if s["host"] == "spark-a" and s["status"] == "changed"} >= {
        "fabric",
        "ray-head",
    }
    assert spark_processes(tb, "spark-a", "raylet")  # the head did start

    d = sparkctl("down", "-i", str(inventory), env=env)
    print(d.stdout, d.stderr)
    assert d.returncode == 1, d.stdout + d.stderr
    assert "spark-b" in d.stdout and "UNREACHABLE" in d.stdout, d.stdout
    for needle in LEFT:
        assert spark_processes(tb, "spark-a", needle) == [], needle  # stopped where it could be
    assert [r["runbook"] for r in journal(tmp_path)] == ["up", "down"]

    tb.start_sshd("spark-b")
    _converged(tb, inventory, env)  # also takes over the lock the lost run left on spark-b


# --- signals -------------------------------------------------------------------------------------------


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # what a background job of a script inherits


def test_ctrl_c_twice_cleanup_is_not_interrupted_even_with_sigint_ignored_at_start(
    fresh_testbed: Testbed, sudo_env: dict[str, str], tmp_path: Path
) -> None:
    tb = fresh_testbed
    inv = tb.inventory_path(
        workloads=[{"name": "embed", "engine": "embed", "tensor_parallel_size": 2, "port": 8100, "ready_timeout": 600}]
    )
    env = cli_env(sudo_env, tmp_path)
    proc = _start(["up", "--yes", "-i", str(inv)], env, preexec=_ignore_sigint)
    seen: list[str] = []
    try:
        _read_until(proc, "verify_workload:embed ...", seen)
        assert spark_processes(tb, "spark-a", "embed_worker")
        proc.send_signal(signal.SIGINT)
        _read_until(proc, "interrupted: running down", seen)
        proc.send_signal(signal.SIGINT)  # the second one, during the cleanup
        _read_until(proc, "cannot be interrupted", seen)
        rest, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(seen) + rest
    print(out)
    assert proc.returncode == 130, out
    assert "not ready after" not in out and "FAILED" not in out, out
    assert "interrupted" in out
    for host in tb.hosts:
        for needle in LEFT:
            assert spark_processes(tb, host, needle) == [], (host, needle)
        assert _lock_on(tb, host) == "", host
    runs = journal(tmp_path)
    assert [(r["runbook"], r["interrupted"]) for r in runs][:1] == [("up", True)]
    assert [r["runbook"] for r in runs] == ["up", "down"] and runs[1]["ok"] is True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_behave_like_ctrl_c(
    fresh_testbed: Testbed, inventory: Path, sudo_env: dict[str, str], tmp_path: Path, sig: signal.Signals
) -> None:
    tb = fresh_testbed
    env = cli_env(sudo_env, tmp_path)
    proc = _start(["up", "--yes", "-i", str(inventory)], env)
    seen: list[str] = []
    try:
        _read_until(proc, "== ray-workers", seen)  # Ray runs on the head now
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(seen) + rest
    assert proc.returncode == 130, out
    assert sig.name in out and "interrupted: running down" in out, out
    for host in tb.hosts:
        for needle in LEFT:
            assert spark_processes(tb, host, needle) == [], (host, needle)
        assert _lock_on(tb, host) == "", host
    _converged(tb, inventory, env)


# --- read-only commands create no secrets ------------------------------------------------------------


def test_status_and_down_with_an_empty_laptop_state_create_no_secret(
    fresh_testbed: Testbed, inventory: Path, sudo_env: dict[str, str], tmp_path: Path
) -> None:
    tb = fresh_testbed
    inv = tb.inventory_path(workloads=[{"name": "embed", "engine": "embed", "port": 8100}])
    empty = tmp_path / "empty-laptop"
    env = cli_env(sudo_env, empty)
    s = sparkctl("status", "-i", str(inv), env=env)
    assert s.returncode == 0, s.stderr
    p = sparkctl("plan", "-i", str(inv), env=env)
    assert p.returncode == 0, p.stderr
    d = sparkctl("down", "-i", str(inv), env=env)
    assert d.returncode == 0, d.stdout + d.stderr
    folder = empty / "sparkctl" / "testbed"
    assert not folder.exists() or sorted(x.name for x in folder.iterdir()) == [], list(folder.iterdir())


def test_a_duplicate_profile_for_a_twin_is_drift_that_up_repairs(
    fresh_testbed: Testbed, inventory: Path, sudo_env: dict[str, str], tmp_path: Path
) -> None:
    tb = fresh_testbed
    env = cli_env(sudo_env, tmp_path)
    assert sparkctl("run", "up", "--only", "fabric", "--yes", "-i", str(inventory), env=env).returncode == 0
    twin = TWINS[0]
    tb.exec(  # what a second, unlocked run used to leave: another profile of the same name for the twin
        "spark-b",
        [
            "nmcli",
            "connection",
            "add",
            "type",
            "ethernet",
            "con-name",
            f"sparkctl-{twin}",
            "ifname",
            twin,
            "ipv4.method",
            "manual",
            "ipv4.addresses",
            "192.168.100.11/24",
            "802-3-ethernet.mtu",
            "9000",
        ],
    )
    assert _sparkctl_profiles(tb, "spark-b").count(f"sparkctl-{twin}") == 2
    p = sparkctl("plan", "-i", str(inventory), env=env)
    assert "delete the duplicate profile" in p.stdout and "spark-b" in p.stdout, p.stdout
    _converged(tb, inventory, env)
