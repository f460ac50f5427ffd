"""A vLLM workload whose Ray worker dies, on the testbed: broken, named, planned for a restart, repaired by `up`.

The hosts have no GPU, so the Ray executor across two Sparks runs the SIMULATED vllm (tests/testbed/sim/vllm): one
long-lived Ray actor per rank, and when one dies, what vLLM 0.32.0 does (RayExecutorV2.start_worker_monitor fails
the engine, the API server's watchdog ends the process: vllm/v1/executor/ray_executor_v2.py,
vllm/entrypoints/launchers/launcher.py). Ray, the actors and their processes are real.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import cli_env, plan_steps, spark_processes, sparkctl
from tests.testbed import Testbed

pytestmark = pytest.mark.testbed

CHAT: dict[str, Any] = {
    "name": "chat",
    "engine": "vllm",
    "model": "Qwen/Qwen3-0.6B",
    "tensor_parallel_size": 2,
    "executor": "ray",  # vLLM's Ray executor (the default is mp), simulated
    "sync_weights": False,  # the simulated vLLM reads no weights, and the testbed reaches no hub
    "port": 8000,
    "ready_timeout": 300,
}
RANK = "ray::RayWorkerProc"
"""The process title Ray gives an actor of class RayWorkerProc (RayExecutorV2's worker) on its node."""


@pytest.fixture
def simulated(fresh_testbed: Testbed) -> Iterator[Testbed]:
    fresh_testbed.use_vllm("simulated")
    yield fresh_testbed
    fresh_testbed.use_vllm("real")


def _status(inv: Path, env: dict[str, str]) -> dict[str, Any]:
    r = sparkctl("status", "--json", "-i", str(inv), env=env, timeout=120)
    assert r.stdout.strip(), r.stderr
    chat: dict[str, Any] = json.loads(r.stdout)["workloads"]["chat"]
    return chat


def test_a_vllm_workload_whose_ray_worker_dies_is_broken_named_and_repaired(
    simulated: Testbed, sudo_env: dict[str, str], tmp_path: Path
) -> None:
    tb = simulated
    inv = tb.inventory_path(workloads=[CHAT])
    env = cli_env(sudo_env, tmp_path)
    up = sparkctl("up", "--yes", "-i", str(inv), env=env, timeout=900)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        assert spark_processes(tb, "spark-b", RANK), "rank 1 should run as a Ray actor on spark-b"
        assert (_status(inv, env)["process"], _status(inv, env)["health"]) == ("ok", "ready")

        tb.exec("spark-b", ["pkill", "-KILL", "-f", RANK])
        deadline = time.monotonic() + 90  # vLLM's monitor polls every 5 s, its watchdog every 5 s
        while True:
            w = _status(inv, env)
            if w["process"] == "broken" or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert w["process"] == "broken", w
        assert w["health"] == "down", w  # vLLM's API server ended itself
        assert "RayWorkerProc rank=[1] died unexpectedly" in w["recorded"], w
        assert not spark_processes(tb, "spark-a", "vllm serve")
        text = sparkctl("status", "-i", str(inv), env=env, timeout=120).stdout
        assert "broken: exited by itself:" in text and "died unexpectedly" in text, text
        assert "hint: sparkctl up restarts it" in text

        d = sparkctl("doctor", "--json", "-i", str(inv), env=env, timeout=120)
        (health,) = [f for f in json.loads(d.stdout) if f["rule"] == "workload-health"]
        assert health["level"] == "fail" and "died unexpectedly" in health["evidence"], health

        p = sparkctl("plan", "--json", "-i", str(inv), env=env, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
        restart = [s for s in plan_steps(p.stdout) if s["kind"] == "workload" and s["target"] == "chat"]
        assert len(restart) == 1 and restart[0]["diff"][0].startswith("- chat: broken (failed exited by itself:")
        forget = restart[0]["commands"][0]["argv"][-1]
        assert forget.startswith("rm -f ") and "kill" not in forget  # a gone pid is never signalled

        again = sparkctl("up", "--yes", "-i", str(inv), env=env, timeout=900)
        assert again.returncode == 0, again.stdout + again.stderr
        w = _status(inv, env)
        assert (w["process"], w["health"]) == ("ok", "ready"), w
        assert spark_processes(tb, "spark-b", RANK)
        after = sparkctl("plan", "--json", "-i", str(inv), env=env, timeout=120)
        assert [(s["kind"], s["target"]) for s in plan_steps(after.stdout) if s["changes"]] == []
    finally:
        down = sparkctl("down", "-i", str(inv), env=env, timeout=300)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not spark_processes(tb, "spark-b", RANK)
