"""Ray is formed only when something needs it (plan/layout.ray_wanted), and `status` says which of the three a
host's Ray is: running as wanted, not started, or left running from an earlier layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparkctl.facts.models import Process
from sparkctl.inventory import parse_inventory
from sparkctl.inventory.models import Inventory
from sparkctl.plan.context import PlanContext, fresh_facts
from sparkctl.plan.layout import fabric_ip, ray_wanted
from sparkctl.plan.ray_stages import plan_ray_node
from sparkctl.session.status import _ray

EXAMPLE = (Path(__file__).resolve().parents[2] / "inventories" / "example-pair.yaml").read_text()
EMBED = "  - {name: embed, engine: embed, tensor_parallel_size: 2, port: 8100}\n"


def inventory(edit: tuple[str, str] = ("", "")) -> Inventory:
    return parse_inventory(EXAMPLE.replace(*edit, 1) if edit[0] else EXAMPLE)


@pytest.mark.parametrize(
    ("edit", "wanted"),
    [
        (("", ""), False),  # the example: chat on vLLM's multiprocessing executor
        (("    tensor_parallel_size: 2\n", "    tensor_parallel_size: 2\n    executor: ray\n"), True),
        (("workloads:\n", "workloads:\n" + EMBED), True),  # the embed worker runs on Ray actors
        (("  port: 6379\n", "  port: 6379\n  form: always\n"), True),
        (("    tensor_parallel_size: 2\n", "    tensor_parallel_size: 1\n    executor: ray\n"), False),  # one rank
    ],
)
def test_ray_is_wanted_only_when_something_needs_it(edit: tuple[str, str], wanted: bool) -> None:
    assert ray_wanted(inventory(edit)) is wanted


def test_no_workload_means_a_ray_cluster_for_the_users_own_jobs() -> None:
    text = EXAMPLE[: EXAMPLE.index("workloads:")]
    assert ray_wanted(parse_inventory(text))


def test_status_tells_ray_left_running_from_ray_not_started() -> None:
    inv = inventory()
    facts = {h.name: fresh_facts(inv, h) for h in inv.hosts}
    ctx = PlanContext(inv, facts, digests={})
    assert _ray(ctx, inv.head) == "not started (no workload needs it)"
    assert [s.target for s in plan_ray_node(ctx, inv.head)] == ["not started"]
    raylet = Process(pid=100, user="nvidia", args=f"/r/raylet --node_ip_address={fabric_ip(inv.head)} --x")
    facts["spark-a"] = facts["spark-a"].model_copy(update={"processes": [raylet]})
    ctx = PlanContext(inv, facts, digests={})
    assert _ray(ctx, inv.head) == "left running (no workload needs it: up stops it)"
    [stop] = plan_ray_node(ctx, inv.head)
    assert stop.kind == "ray_stopped" and stop.changes and "ray stop --force" in stop.commands[0].argv[-1]


def test_watch_shows_ray_not_needed_apart_from_ray_down() -> None:
    from sparkctl.plan.live_state import ray_node_state

    cases = [(("", ""), "not needed"), (("workloads:\n", "workloads:\n" + EMBED), "not running")]
    for edit, want in cases:
        inv = inventory(edit)
        ctx = PlanContext(inv, {h.name: fresh_facts(inv, h) for h in inv.hosts}, digests={"ray_token": "t"})
        assert ray_node_state(ctx, inv.head) == want


def test_dashboard_says_when_no_workload_needs_ray(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from sparkctl.cli.app import app

    for text, noted in ((EXAMPLE, True), (EXAMPLE.replace("workloads:\n", "workloads:\n" + EMBED, 1), False)):
        path = tmp_path / "inv.yaml"
        path.write_text(text)
        r = CliRunner().invoke(app, ["dashboard", "-i", str(path)])
        assert r.exit_code == 0, r.output
        assert "ssh -p 22 -N -L 8265:127.0.0.1:8265 nvidia@10.0.0.11" in r.stdout
        assert ("no workload of this inventory needs Ray" in r.stderr) is noted, r.stderr


def test_ray_stopped_for_good_takes_the_drivers_on_it_first_and_nothing_else() -> None:
    """A workload removed from the inventory keeps running, unless it ran on the Ray that `up` now stops: its
    recorded launch says so (the embed worker, vLLM's Ray executor). An mp vLLM's launch does not."""
    inv = inventory()  # chat on mp: no Ray wanted
    raylet = Process(pid=100, user="nvidia", args=f"/r/raylet --node_ip_address={fabric_ip(inv.head)} --x")
    old = {
        "workload-emb.pid": "200",
        "workload-emb.spec": "/opt/sparkctl-runtime/bin/python /home/nvidia/.local/state/sparkctl/embed_worker.py",
        "workload-other.pid": "300",
        "workload-other.spec": "/opt/sparkctl-runtime/bin/vllm serve m --distributed-executor-backend mp --nnodes 2",
    }
    facts = {h.name: fresh_facts(inv, h) for h in inv.hosts}
    head = facts["spark-a"]
    procs = [
        raylet,
        Process(pid=200, user="nvidia", args="python embed_worker.py"),
        Process(pid=300, user="nvidia", args="vllm serve m"),
    ]
    facts["spark-a"] = head.model_copy(update={"processes": procs, "files": {**head.files, **old}})
    [step] = plan_ray_node(PlanContext(inv, facts, digests={}), inv.head)
    lines = [c.argv[-1] for c in step.commands]
    assert step.kind == "ray_stopped" and len(lines) == 2, lines
    assert "workload-emb.pid" in lines[0] and "kill -TERM" in lines[0]
    assert "ray stop --force" in lines[1]
    assert not any("workload-other" in line for line in lines)
