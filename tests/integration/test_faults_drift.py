"""Faults between runs on real hosts: Ray killed on one host, a twin's profile taken down. `plan` repairs exactly
what broke, `up` converges, a second `plan` is empty."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.helpers import TWINS, cli_env, plan_steps, spark_processes, sparkctl
from tests.testbed import Testbed

pytestmark = pytest.mark.testbed


def test_ray_killed_on_one_host_and_a_profile_taken_down_are_repaired_by_up(
    fresh_testbed: Testbed, inventory: Path, sudo_env: dict[str, str], tmp_path: Path
) -> None:
    tb = fresh_testbed
    env = cli_env(sudo_env, tmp_path)
    up = sparkctl("up", "--yes", "-i", str(inventory), env=env)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        tb.exec("spark-b", ["pkill", "-KILL", "-u", "spark", "-f", "raylet|gcs_server|ray/dashboard|ray/_private"])
        tb.exec("spark-a", ["nmcli", "connection", "down", f"sparkctl-{TWINS[1]}"])
        assert not spark_processes(tb, "spark-b", "raylet")

        st = json.loads(sparkctl("status", "--json", "-i", str(inventory), env=env).stdout)
        assert st["hosts"]["spark-b"]["ray"] == "not running", st["hosts"]["spark-b"]
        assert [t["ok"] for t in st["hosts"]["spark-a"]["fabric"]] == [True, False], st["hosts"]["spark-a"]

        p = sparkctl("plan", "--json", "-i", str(inventory), env=env)
        assert p.returncode == 0, p.stdout + p.stderr
        changes = {(s["host"], s["kind"]) for s in plan_steps(p.stdout) if s["changes"]}
        assert ("spark-b", "ray_node") in changes, changes
        assert any(h == "spark-a" and k.startswith("fabric") for h, k in changes), changes
        assert not any(h == "spark-b" and k.startswith("fabric") for h, k in changes), changes

        again = sparkctl("up", "--yes", "-i", str(inventory), env=env)
        assert again.returncode == 0, again.stdout + again.stderr
        assert spark_processes(tb, "spark-b", "raylet")
        st = json.loads(sparkctl("status", "--json", "-i", str(inventory), env=env).stdout)
        assert all(h["ray"] == "running" for h in st["hosts"].values()), st["hosts"]
        assert all(t["ok"] for h in st["hosts"].values() for t in h["fabric"]), st["hosts"]
        last = sparkctl("plan", "-i", str(inventory), env=env)
        assert "no changes: the cluster is converged" in last.stdout, last.stdout
    finally:
        down = sparkctl("down", "-i", str(inventory), env=env)
    assert down.returncode == 0, down.stdout + down.stderr
