"""The Ray formation check (`ray_check_script`), run by Python against a stand-in `ray` module that answers
`ray.nodes()` as Ray 2.60.0 does: `ray.nodes()` is `GlobalState.node_table()` (ray/_private/state.py), a list of
dicts built by `GlobalStateAccessor.get_node_table` (python/ray/includes/global_state_accessor.pxi) whose keys include
NodeID, Alive, NodeManagerAddress and Resources; a dead node's record stays in the list with Alive false. The same
keys were read from the testbed's real GCS (a rebooted spark-b: its old record dead, its new one alive)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from sparkctl.plan.ray_commands import ray_check_script

A, B = "192.168.100.10", "192.168.100.11"


def run_check(tmp_path: Path, nodes: list[dict[str, object]]) -> tuple[int, dict[str, object]]:
    (tmp_path / "ray.py").write_text(f"def init(**kwargs):\n    pass\n\ndef nodes():\n    return {nodes!r}\n")
    r = subprocess.run(
        [sys.executable, "-"],
        input=ray_check_script([A, B]),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path)},
        timeout=30,
    )
    return r.returncode, json.loads(r.stdout)


def node(ip: str, alive: bool = True, nid: str = "n") -> dict[str, object]:
    return {"NodeID": nid, "Alive": alive, "NodeManagerAddress": ip, "Resources": {"GPU": 1.0}}


def test_both_nodes_alive_once_is_formed(tmp_path: Path) -> None:
    assert run_check(tmp_path, [node(A), node(B), node(B, alive=False, nid="old")])[0] == 0


def test_a_missing_node_is_named(tmp_path: Path) -> None:
    code, out = run_check(tmp_path, [node(A)])
    assert (code, out["missing"]) == (1, [B])


def test_a_restarted_raylet_waits_until_the_dead_record_is_gone(tmp_path: Path) -> None:
    # spark-b's raylet died and a new one started on its address: the GCS still holds the old node alive
    code, out = run_check(tmp_path, [node(A), node(B, nid="old"), node(B, nid="new")])
    assert (code, out["missing"], out["twice"]) == (1, [], [B])
