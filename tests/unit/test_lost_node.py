"""A Ray node lost under a placement group restarts the whole Ray cluster (plan/ray_stages.lost_ray_nodes)."""

from __future__ import annotations

from pathlib import Path

from sparkctl.facts.models import HostFacts, Process
from sparkctl.inventory import parse_inventory
from sparkctl.inventory.models import Inventory
from sparkctl.plan.context import PlanContext, fresh_facts
from sparkctl.plan.layout import fabric_ip
from sparkctl.plan.ray_stages import lost_ray_nodes, plan_ray_node

EXAMPLE = Path(__file__).resolve().parents[2] / "inventories" / "example-pair.yaml"
EMBED = """  - name: embed
    engine: embed
    tensor_parallel_size: 2
    port: 8100
"""
TOKEN = "5f2b6c1d0a9e8f7c"


def inventory() -> Inventory:
    text = EXAMPLE.read_text()
    return parse_inventory(text.replace("workloads:\n", "workloads:\n" + EMBED, 1))


def facts(inv: Inventory, ray_on: set[str], recorded: bool) -> dict[str, HostFacts]:
    out = {}
    for h in inv.hosts:
        f = fresh_facts(inv, h)
        files = {**f.files, "ray-token.sha256": TOKEN}
        procs = list(f.processes)
        if h.name in ray_on:
            procs.append(Process(pid=100, user="nvidia", args=f"/r/raylet --node_ip_address={fabric_ip(h)} --x"))
        if recorded and h.name == inv.head.name:
            files["workload-embed.spec"] = "embed_worker.py ..."
        out[h.name] = f.model_copy(update={"files": files, "processes": procs})
    return out


def ctx(ray_on: set[str], recorded: bool) -> PlanContext:
    inv = inventory()
    return PlanContext(inv, facts(inv, ray_on, recorded), digests={"ray_token": TOKEN})


def test_a_node_lost_under_a_recorded_ray_workload_restarts_the_head_too() -> None:
    c = ctx({"spark-a"}, recorded=True)
    assert lost_ray_nodes(c) == ["spark-b"]
    [step] = plan_ray_node(c, c.inventory.head)
    assert step.kind == "ray_node" and "the cluster lost spark-b under a placement group" in step.description
    assert "ray stop" in step.commands[0].argv[-1]  # the running head is stopped first: a new GCS


def test_without_a_workload_on_ray_only_the_lost_node_starts() -> None:
    c = ctx({"spark-a"}, recorded=False)
    assert lost_ray_nodes(c) == []
    assert plan_ray_node(c, c.inventory.head) == []
    assert [s.target for s in plan_ray_node(c, c.inventory.host("spark-b"))] == ["worker"]


def test_a_whole_cluster_running_loses_nothing() -> None:
    c = ctx({"spark-a", "spark-b"}, recorded=True)
    assert lost_ray_nodes(c) == [] and plan_ray_node(c, c.inventory.head) == []
