"""Preflight refuses a runtime that lacks what sparkctl relies on, naming the host, the version found and the fix.

Both runtimes are real venvs made on the hosts from Debian's python3 (each host's /home is its own). spark-b's holds
no Ray at all; spark-a's carries the dist-info pip leaves for Ray 2.40.0 (metadata only: the probe reads the
versions from `<venv>/lib/python3*/site-packages/*.dist-info`, as for any venv).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.integration.helpers import cli_env, host_snapshot, sparkctl
from tests.testbed import Testbed

pytestmark = pytest.mark.testbed

RUNTIME = "/home/spark/rt"
# on vLLM's Ray executor, so the runtime needs Ray (under the default, mp, it would not)
CHAT = {"name": "chat", "engine": "vllm", "model": "/models/none", "tensor_parallel_size": 2, "port": 8000}
CHAT["executor"] = "ray"


def _inventory(tb: Testbed, tmp_path: Path) -> Path:
    data = yaml.safe_load(tb.inventory_path(workloads=[CHAT]).read_text())
    data["runtime"] = {"venv": RUNTIME}
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_preflight_refuses_an_old_ray_and_a_runtime_without_ray(
    fresh_testbed: Testbed, sudo_env: dict[str, str], tmp_path: Path
) -> None:
    tb = fresh_testbed
    for host in tb.hosts:
        tb.exec(host, ["/usr/bin/python3", "-m", "venv", "--without-pip", RUNTIME], user="spark")
    tb.exec(
        "spark-a",
        [
            "sh",
            "-c",
            f"d=$(echo {RUNTIME}/lib/python3*/site-packages)/ray-2.40.0.dist-info && "
            "mkdir -p \"$d\" && printf 'Metadata-Version: 2.1\\nName: ray\\nVersion: 2.40.0\\n' "
            '> "$d/METADATA"',
        ],
        user="spark",
    )
    inventory = _inventory(tb, tmp_path)
    env = cli_env(sudo_env, tmp_path)
    try:
        r = sparkctl("doctor", "-i", str(inventory), env=env)
        out = r.stdout + r.stderr
        assert r.returncode == 1, out
        assert "runtime-support" in out
        assert f"Ray 2.40.0 in the venv {RUNTIME} is older than 2.52" in out, out
        assert f"no Ray in the venv {RUNTIME}" in out and "spark-b" in out, out
        assert "no vLLM in the venv" in out
        assert "pip install 'ray[default]>=2.52'" in out

        before = {h: host_snapshot(tb, h) for h in tb.hosts}
        r = sparkctl("up", "--yes", "-i", str(inventory), env=env)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "runtime-support" in r.stderr and "spark-b" in r.stderr
        for host, snap in before.items():
            assert host_snapshot(tb, host) == snap, f"{host} was changed"
    finally:
        for host in tb.hosts:
            tb.exec(host, ["rm", "-rf", RUNTIME], check=False)
