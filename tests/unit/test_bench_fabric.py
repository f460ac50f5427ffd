"""`bench fabric`: RoCE with perftest and nccl-tests when the hosts have them, the TCP fallback otherwise (said so).

The parsers read outputs published upstream (tests/unit/fixtures/README.md names each source): NVIDIA's own
ib_write_bw run between two DGX Sparks, and nccl-tests all_reduce_perf output.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from sparkctl.facts.models import GidEntry, HostFacts
from sparkctl.inventory import parse_inventory
from sparkctl.plan.bench import RDMA_QPS, parse_all_reduce_perf, parse_ib_write_bw
from sparkctl.plan.context import PlanContext, fresh_facts
from sparkctl.plan.models import Plan, Step
from sparkctl.runbook.load import load_runbook, resolve_params
from sparkctl.runbook.planner import build_runbook_plan
from tests.unit.conftest import EXAMPLE, FIXTURES

TOOLS = {
    "ib_write_bw": "/usr/bin/ib_write_bw",
    "all_reduce_perf": "/home/nvidia/nccl-tests/build/all_reduce_perf",
    "mpirun": "/usr/bin/mpirun",
}


def test_ib_write_bw_average_from_nvidias_spark_run() -> None:
    assert parse_ib_write_bw((FIXTURES / "ib_write_bw-spark-link1.txt").read_text()) == 92.57


def test_ib_write_bw_without_a_result_table_is_none() -> None:
    failed = " Couldn't connect to 192.168.200.12:12000\nUnable to init the socket connection\n"
    assert parse_ib_write_bw(failed) is None


def test_all_reduce_perf_summary_and_peak() -> None:
    tail = parse_all_reduce_perf((FIXTURES / "all_reduce_perf-tail.txt").read_text())
    assert tail == {"avg_busbw_gbytes": 84.8558, "peak_busbw_gbytes": 96.69}
    head = parse_all_reduce_perf((FIXTURES / "all_reduce_perf-gb10-pair-head.txt").read_text())
    assert head == {"avg_busbw_gbytes": None, "peak_busbw_gbytes": 1.01}  # the GB10 pair's first (small) sizes


def _plan(tools: dict[str, str]) -> Plan:
    inv = parse_inventory(EXAMPLE.read_text(), "pair.yaml")
    facts: dict[str, HostFacts] = {}
    for h in inv.hosts:
        gids = []
        for t in h.fabric:
            raw = "".join(f"{int(o):02x}" for o in str(t.address.ip).split("."))
            gid = f"0000:0000:0000:0000:0000:ffff:{raw[:4]}:{raw[4:]}"
            dev = t.rdma_device or ""
            gids.append(GidEntry(device=dev, port=1, index=3, type="RoCE v2", ndev=t.interface, gid=gid))
        facts[h.name] = fresh_facts(inv, h).model_copy(update={"tools": tools, "gids": gids})
    rb = load_runbook("bench-fabric")
    params = resolve_params(rb, {})
    return build_runbook_plan(rb, PlanContext(inv, facts, params, {}), params)


def _steps(plan: Plan) -> list[Step]:
    return [s for st in plan.stages for s in st.steps]


def test_with_perftest_each_twin_runs_ib_write_bw_with_several_queue_pairs() -> None:
    steps = _steps(_plan({"ib_write_bw": TOOLS["ib_write_bw"]}))
    kinds = {s.kind for s in steps}
    assert "bench_send" not in kinds and "bench_listen" not in kinds
    servers = [s for s in steps if s.kind == "bench_rdma_listen"]
    clients = [s for s in steps if s.kind == "bench_rdma_send"]
    assert [s.host for s in servers] == ["spark-b", "spark-b"] and [s.host for s in clients] == ["spark-a", "spark-a"]
    server = servers[0].commands[0].argv
    assert server == [
        "/usr/bin/ib_write_bw",
        "-d",
        "rocep1s0f1",
        "-q",
        str(RDMA_QPS),
        "-F",
        "--report_gbits",
        "-D",
        "5",
        "-p",
        "18515",
        "-x",
        "3",
    ]
    client = shlex.split(clients[1].commands[0].argv[2].split("do ", 1)[1].split(" &&", 1)[0])
    assert client[:3] == ["/usr/bin/ib_write_bw", "-d", "roceP2p1s0f1"] and client[-1] == "192.168.101.11"
    assert "-p" in client and client[client.index("-p") + 1] == "18516"
    assert not any(s.kind == "bench_nccl" for s in steps)


def test_with_nccl_tests_the_pair_runs_all_reduce_with_each_hosts_env_file() -> None:
    steps = _steps(_plan(TOOLS))
    (nccl,) = [s for s in steps if s.kind == "bench_nccl"]
    argv = nccl.commands[0].argv
    assert nccl.host == "spark-a" and argv[:5] == [
        "/usr/bin/mpirun",
        "-np",
        "2",
        "-H",
        "192.168.100.10:1,192.168.100.11:1",
    ]
    # every rank sources its own host's env file (its own GID index and interfaces), not the head's via mpirun -x
    assert ". /etc/sparkctl/worker.env" in argv[argv.index("-c") + 1]
    assert not any(a == "-x" for a in argv)


def test_without_perftest_the_tcp_fallback_says_so() -> None:
    steps = _steps(_plan({}))
    sends = [s for s in steps if s.kind == "bench_send"]
    assert len(sends) == 2 and all("TCP fallback" in s.description for s in sends)
    assert not any(s.kind.startswith("bench_rdma") or s.kind == "bench_nccl" for s in steps)


def test_fixtures_are_upstream_captures() -> None:
    readme = (Path(FIXTURES) / "README.md").read_text()
    for name in ("ib_write_bw-spark-link1.txt", "all_reduce_perf-gb10-pair-head.txt", "all_reduce_perf-tail.txt"):
        assert name in readme
