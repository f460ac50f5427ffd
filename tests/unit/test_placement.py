"""Workloads on host groups: where each workload runs, and bad placements refused before anything runs.

Each bad placement goes through the real command line (`plan --offline`, nothing contacted) and must end in
exit 2 with `file:line key.path`, what is wrong, and a hint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from sparkctl.cli.app import app
from sparkctl.errors import EXIT_BAD_INPUT
from sparkctl.inventory import parse_inventory
from sparkctl.plan import layout, ray_commands, workload_commands

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = (REPO / "inventories" / "example-pair.yaml").read_text()
CHAT_TP = "    tensor_parallel_size: 2\n"


def edit(*pairs: tuple[str, str], text: str = EXAMPLE) -> str:
    for old, new in pairs:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


def with_workloads(block: str, text: str = EXAMPLE) -> str:
    """The example with its workloads replaced by `block` (YAML list items under `workloads:`)."""
    return text.split("workloads:\n")[0] + "workloads:\n" + block


GPUS_2_ON_A = (
    "  - name: spark-a\n    address: 10.0.0.11\n",
    "  - name: spark-a\n    address: 10.0.0.11\n    gpus: 2\n",
)


@dataclass(frozen=True)
class Case:
    id: str
    text: str
    line_of: str  # a fragment on the blamed line (unique in the text)
    path: str
    message: str
    hint: str


CASES = [
    Case(
        "unknown-host-in-group",
        edit((CHAT_TP, "    hosts:\n      - spark-a\n      - spark-z\n" + CHAT_TP)),
        "- spark-z",
        "workloads[0].hosts[1]",
        "'spark-z' is not a host",
        "use one of: spark-a, spark-b",
    ),
    Case(
        "host-listed-twice",
        edit((CHAT_TP, "    hosts:\n      - spark-b\n      - spark-b # again\n" + CHAT_TP)),
        "# again",
        "workloads[0].hosts[1]",
        "'spark-b' is listed twice",
        "list each host once",
    ),
    Case(
        "tp-times-pp-above-the-group",
        edit(
            (CHAT_TP, "    hosts: [spark-a, spark-b]\n    executor: mp\n" + CHAT_TP + "    pipeline_parallel_size: 2\n")
        ),
        "pipeline_parallel_size: 2",
        "workloads[0].pipeline_parallel_size",
        "= 2 x 2 = 4 rank(s), but the group spark-a, spark-b has 2 GPU(s)",
        "use TP x PP of 2 x 1, 1 x 2",
    ),
    Case(
        "tp-below-the-group",
        edit((CHAT_TP, "    hosts: [spark-a, spark-b]\n    executor: mp\n    tensor_parallel_size: 1\n")),
        "tensor_parallel_size: 1",
        "workloads[0].tensor_parallel_size",
        "1 x 1 = 1 rank(s), but the group spark-a, spark-b has 2 GPU(s)",
        "one rank per GPU of the group",
    ),
    Case(
        "embed-ranks-not-one-per-host",
        with_workloads(
            "  - name: embed\n    engine: embed\n    hosts: [spark-a, spark-b]\n    tensor_parallel_size: 1\n"
        ),
        "tensor_parallel_size: 1",
        "workloads[0].tensor_parallel_size",
        "tensor_parallel_size x replicas = 1 rank(s), but the group spark-a, spark-b has 2 host(s)",
        "use tensor_parallel_size x replicas = 2",
    ),
    Case(
        "port-clash-on-one-head",
        with_workloads(
            "  - name: chat\n    engine: vllm\n    hosts: [spark-a]\n    tensor_parallel_size: 1\n"
            "  - name: embed\n    engine: embed\n    tensor_parallel_size: 1\n    port: 8000 # clash\n"
        ),
        "port: 8000 # clash",
        "workloads[1].port",
        "port 8000 on spark-a is already used by workload chat",
        "give workloads with the same head host their own ports",
    ),
    Case(
        "ray-executor-on-part-of-the-cluster",
        edit(
            GPUS_2_ON_A,
            (
                "    tensor_parallel_size: 2\n",
                "    hosts: [spark-a] # two GPUs\n    tensor_parallel_size: 2\n    executor: ray\n",
            ),
        ),
        "# two GPUs",
        "workloads[0].hosts",
        "vLLM's Ray executor places its 2 ranks anywhere in the Ray cluster",
        "use executor: mp",
    ),
    Case(
        "ray-executor-next-to-a-workload-outside-ray",
        with_workloads(
            "  - name: chat\n    engine: vllm\n    tensor_parallel_size: 2\n    executor: ray # placed by Ray\n"
            "  - name: small\n    engine: vllm\n    tensor_parallel_size: 1\n    port: 8100\n"
        ),
        "# placed by Ray",
        "workloads[0].executor",
        "vLLM's Ray executor may place a rank of chat on a Spark whose GPU small already uses outside Ray",
        "use executor: mp with hosts",
    ),
    Case(
        "pipeline-stages-on-embed",
        with_workloads("  - name: embed\n    engine: embed\n    pipeline_parallel_size: 2\n"),
        "pipeline_parallel_size: 2",
        "workloads[0].pipeline_parallel_size",
        "pipeline stages are for engine 'vllm'",
        "remove it",
    ),
]


def _errors(output: str) -> list[tuple[str, str]]:
    lines = output.splitlines()
    return [
        (line.removeprefix("error: "), nxt.removeprefix("hint: "))
        for line, nxt in zip(lines, [*lines[1:], ""], strict=True)
        if line.startswith("error: ")
    ]


def plan_offline(tmp_path: Path, text: str) -> tuple[int, str, Path]:
    path = tmp_path / "inv.yaml"
    path.write_text(text)
    result = CliRunner().invoke(app, ["plan", "--offline", "-i", str(path)])
    return result.exit_code, result.output, path


def line_of(text: str, fragment: str) -> int:
    hits = [n for n, line in enumerate(text.splitlines(), 1) if fragment in line]
    assert len(hits) == 1, (fragment, hits)
    return hits[0]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_placement_is_exit_2_located_with_a_hint(case: Case, tmp_path: Path) -> None:
    code, output, path = plan_offline(tmp_path, case.text)
    assert code == EXIT_BAD_INPUT, output
    errors = _errors(output)
    assert len(errors) == 1, output
    error, hint = errors[0]
    where = f"{path}:{line_of(case.text, case.line_of)} {case.path}: "
    assert error.startswith(where), f"expected {where!r} in {error!r}"
    assert case.message in error, error
    assert case.hint in hint, hint


def test_overlapping_groups_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    text = with_workloads(
        "  - name: chat\n    engine: vllm\n    hosts: [spark-a, spark-b]\n    executor: mp\n"
        "  - name: embed\n    engine: embed\n    port: 8100\n    tensor_parallel_size: 1\n    hosts:\n"
        "      - spark-b # taken\n"
    )
    code, output, path = plan_offline(tmp_path, text)
    assert code == EXIT_BAD_INPUT, output
    errors = dict(_errors(output))
    where = f"{path}:{line_of(text, '# taken')} workloads[1].hosts[0]: "
    assert any(e.startswith(where) and "spark-b's GPU(s) are already taken by workload chat" in e for e in errors), (
        output
    )
    assert not any("over-committed" in e for e in errors), output  # the overlap says it all
    assert all(h for h in errors.values()), output


def test_one_port_on_two_heads_is_fine_and_each_endpoint_is_on_its_head(tmp_path: Path) -> None:
    text = with_workloads(
        "  - name: chat\n    engine: vllm\n    hosts: [spark-a]\n    tensor_parallel_size: 1\n"
        "  - name: embed\n    engine: embed\n    hosts: [spark-b]\n    tensor_parallel_size: 1\n"
        "    bind: fabric\n"
    )
    code, output, _ = plan_offline(tmp_path, text)
    assert code == 0, output
    inv = parse_inventory(text)
    chat, embed = inv.workloads
    assert layout.endpoint(inv, chat) == "http://10.0.0.11:8000"
    assert layout.endpoint(inv, embed) == "http://192.168.100.11:8000"
    argv = workload_commands.workload_argv(inv, embed, "/home/nvidia")
    assert argv[argv.index("--host") + 1] == "192.168.100.11"
    assert argv[argv.index("--nodes") + 1] == "192.168.100.11"


def test_without_hosts_a_workload_keeps_the_whole_cluster_and_the_ray_head() -> None:
    inv = parse_inventory(edit(("  head: spark-a\n", "  head: spark-b\n")))
    (chat,) = inv.workloads
    assert [h.name for h in inv.group(chat)] == ["spark-b", "spark-a"]
    assert layout.endpoint(inv, chat) == "http://10.0.0.12:8000"
    assert "--nodes" not in workload_commands.workload_argv(inv, chat, "/home/nvidia")


def test_mp_ranks_follow_the_listed_order_and_pp_stages_are_consecutive_hosts() -> None:
    inv = parse_inventory(
        edit(
            (
                CHAT_TP,
                "    hosts: [spark-b, spark-a]\n    executor: mp\n    tensor_parallel_size: 1\n"
                "    pipeline_parallel_size: 2\n",
            )
        )
    )
    (chat,) = inv.workloads
    assert [h.name for h in layout.rank_hosts(inv, chat)] == ["spark-b", "spark-a"]
    head = workload_commands.workload_argv(inv, chat, "/h", inv.host("spark-b"))
    other = workload_commands.workload_argv(inv, chat, "/h", inv.host("spark-a"))
    for argv, rank in ((head, "0"), (other, "1")):
        assert argv[argv.index("--node-rank") + 1] == rank
        assert argv[argv.index("--master-addr") + 1] == "192.168.100.11"
        assert argv[argv.index("--pipeline-parallel-size") + 1] == "2"
        assert argv[argv.index("--nnodes") + 1] == "2"
    assert "--headless" in other and "--headless" not in head
    assert layout.workload_ranks(chat) == 2


def test_placement_check_script_wants_each_listed_group_on_its_own_hosts() -> None:
    script = ray_commands.placement_check_script(1, [["192.168.100.11", "192.168.100.10"]])
    assert 'want = [["192.168.100.10", "192.168.100.11"]]' in script
    assert "misplaced" in script


def test_a_workload_without_hosts_next_to_listed_groups_must_fit_too(tmp_path: Path) -> None:
    text = with_workloads(
        "  - name: chat\n    engine: vllm\n    hosts: [spark-a, spark-b]\n    executor: mp\n"
        "  - name: embed # everywhere\n    engine: embed\n    port: 8100\n    tensor_parallel_size: 1\n"
    )
    code, output, path = plan_offline(tmp_path, text)
    assert code == EXIT_BAD_INPUT, output
    errors = _errors(output)
    assert len(errors) == 1, output
    error, hint = errors[0]
    assert error.startswith(f"{path}:{line_of(text, '# everywhere')} workloads[1]: "), error
    assert "with embed the workloads need 3 rank(s) but the cluster has 2 GPU(s): over-committed" in error
    assert "give each workload its own hosts" in hint


SWITCH4 = (REPO / "inventories" / "example-switch-4.yaml").read_text()


def offline_steps(tmp_path: Path, text: str) -> list[dict[str, Any]]:
    path = tmp_path / "inv.yaml"
    path.write_text(text)
    result = CliRunner().invoke(app, ["plan", "--offline", "--json", "-i", str(path)])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    return [s for st in plan["stages"] for s in st["steps"]]


def _lines(step: dict[str, Any]) -> str:
    return "\n".join(" ".join(c["argv"]) for c in step["commands"])


def test_two_groups_of_a_switched_four_plan_on_their_own_hosts(tmp_path: Path) -> None:
    text = with_workloads(
        "  - name: chat\n    engine: vllm\n    model: Qwen/Qwen3-8B\n    hosts: [spark-1, spark-2]\n"
        "    executor: mp\n    tensor_parallel_size: 2\n"
        "  - name: embed\n    engine: embed\n    hosts: [spark-3, spark-4]\n    tensor_parallel_size: 2\n",
        text=SWITCH4,
    )
    steps = offline_steps(tmp_path, text)
    by = {(s["host"], s["kind"], s["target"]): s for s in steps}
    work = sorted((h, k, t) for h, k, t in by if k in ("workload", "worker_code", "verify_workload"))
    assert work == [
        ("spark-1", "verify_workload", "chat"),
        ("spark-1", "workload", "chat"),
        ("spark-2", "workload", "chat"),
        ("spark-3", "verify_workload", "embed"),
        ("spark-3", "worker_code", "/home/nvidia/.local/state/sparkctl/embed_worker.py"),
        ("spark-3", "workload", "embed"),
    ]
    rank0, rank1 = _lines(by["spark-1", "workload", "chat"]), _lines(by["spark-2", "workload", "chat"])
    assert "--nnodes 2 --node-rank 0 --master-addr 192.168.100.10" in rank0 and "--host 10.0.0.11 --port 8000" in rank0
    assert "--nnodes 2 --node-rank 1 --master-addr 192.168.100.10" in rank1 and "--headless" in rank1
    embed_line = _lines(by["spark-3", "workload", "embed"])
    assert "--host 10.0.0.13 --port 8000" in embed_line
    assert "--nodes 192.168.100.12,192.168.100.13" in embed_line
    assert "--ray-address 192.168.100.10:6379" in embed_line  # one Ray cluster, its head on spark-1
    # the embed worker's ranks are Ray-placed: the placement check wants them on spark-3 and spark-4 exactly
    placement = by["spark-1", "verify_placement", "embed"]
    assert '"192.168.100.12", "192.168.100.13"' in placement["commands"][0]["stdin"]


def test_tp2_x_pp2_over_four_hosts_numbers_the_nodes_in_listed_order(tmp_path: Path) -> None:
    text = with_workloads(
        "  - name: chat\n    engine: vllm\n    model: Qwen/Qwen3-8B\n"
        "    hosts: [spark-4, spark-3, spark-2, spark-1]\n    executor: mp\n"
        "    tensor_parallel_size: 2\n    pipeline_parallel_size: 2\n",
        text=SWITCH4,
    )
    steps = offline_steps(tmp_path, text)
    lines = {s["host"]: _lines(s) for s in steps if s["kind"] == "workload"}
    for rank, host in enumerate(["spark-4", "spark-3", "spark-2", "spark-1"]):
        assert (
            "--tensor-parallel-size 2 --pipeline-parallel-size 2 --distributed-executor-backend mp --nnodes 4 "
            f"--node-rank {rank} --master-addr 192.168.100.13 "
        ) in lines[host], host
    assert "--host 10.0.0.14 --port 8000" in lines["spark-4"]
    assert [s["host"] for s in steps if s["kind"] == "verify_workload"] == ["spark-4"]


def test_tp_x_pp_hint_lists_what_fits_four_gpus(tmp_path: Path) -> None:
    text = with_workloads(
        "  - name: chat\n    engine: vllm\n    hosts: [spark-1, spark-2, spark-3, spark-4]\n    executor: mp\n"
        "    tensor_parallel_size: 4\n    pipeline_parallel_size: 2\n",
        text=SWITCH4,
    )
    code, output, _ = plan_offline(tmp_path, text)
    assert code == EXIT_BAD_INPUT, output
    (error, hint), *_ = _errors(output)
    assert "4 x 2 = 8 rank(s), but the group spark-1, spark-2, spark-3, spark-4 has 4 GPU(s)" in error
    assert "4 x 1, 2 x 2, 1 x 4" in hint


def test_the_groups_example_plans_offline(tmp_path: Path) -> None:
    text = (REPO / "inventories" / "example-switch-4-groups.yaml").read_text()
    steps = offline_steps(tmp_path, text)
    heads = sorted((s["host"], s["target"]) for s in steps if s["kind"] == "verify_workload")
    assert heads == [("spark-1", "chat"), ("spark-3", "embed")]


def test_two_ray_executor_workloads_on_four_sparks_are_checked_for_distinct_hosts_only(tmp_path: Path) -> None:
    """vLLM 0.32's V2 Ray executor pins no bundle: two TP=2 groups take any free GPUs, one rank per Spark. The plan
    accepts the layout, and its placement check asks Ray for distinct hosts per group, not for given hosts."""
    text = with_workloads(
        "  - name: chat\n    engine: vllm\n    tensor_parallel_size: 2\n    executor: ray\n"
        "  - name: code\n    engine: vllm\n    tensor_parallel_size: 2\n    executor: ray\n    port: 8100\n",
        text=SWITCH4,
    )
    steps = offline_steps(tmp_path, text)
    check = [s for s in steps if s["kind"] == "verify_placement"]
    assert len(check) == 1 and check[0]["target"] == "chat,code"
    script = check[0]["commands"][0]["stdin"]
    assert "want = []" in script and "len(multi) < 2" in script
