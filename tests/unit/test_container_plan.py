"""Container runtime (`runtime: {image: ...}`), at the plan level (the end-to-end run with a real engine is
tests/integration/test_container_mode.py).

One Ray container per host; workloads run inside the head's Ray container through `docker exec`, as NVIDIA's
multi-Spark flow runs `vllm serve` (dgx-spark-playbooks nvidia/vllm/README.md, "Run on two Sparks", Step 8).
The built-in `up` and `down` are planned on fresh facts (as `plan --offline` assumes) and on the facts of a converged
pair whose Ray runs in containers; the docker command lines are taken apart and checked flag by flag.
The shell lines are parsed by `sh -n`, and the workload and Ray lines are run by dash and bash against a stub
`docker` (and a stub `ray` for the command inside the Ray container).

The plans themselves, step by step, are data like the other planner cases: tests/unit/cases/container-*.yaml
(fresh pair, converged pair, a new image, `down` with Ray running as root), run by test_planner_cases.py.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from sparkctl import paths
from sparkctl.doctor.evaluate import evaluate
from sparkctl.doctor.evaluators import CheckContext
from sparkctl.facts.models import HostFacts, Process, Runtime
from sparkctl.facts.parse import parse_runtime
from sparkctl.facts.probe import build_probe
from sparkctl.inventory import parse_inventory
from sparkctl.inventory.models import Inventory
from sparkctl.plan import ray_commands, workload_commands
from sparkctl.plan.context import PlanContext, fresh_facts
from sparkctl.plan.models import Command, Plan, Step
from sparkctl.runbook.load import load_runbook, resolve_params
from sparkctl.runbook.planner import build_runbook_plan

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parents[1] / "inventories" / "example-pair.yaml"
IMAGE = "nvcr.io/nvidia/vllm:25.11-py3"
HOME = "/home/nvidia"
STATE = f"{HOME}/.local/state/sparkctl"
DIGESTS = {"ray_token": "5f2b6c1d0a9e8f7c", "worker_code": "0e1d2c3b4a59"}
IMAGE_ID = "sha256:4c1e2b7a9d0f3e5c8b6a1d2f4e7c9b0a3d5f7e1c2b4a6d8f0e3c5b7a9d1f2e4c"
EMBED = "\n  - name: emb\n    engine: embed\n    port: 8001\n"
# What `up` records for the example's chat workload in container mode: the image, the environment (where Ray's
# head is), then the program as it runs inside the image.
CHAT_SPEC = (
    f"image={IMAGE} RAY_ADDRESS=192.168.100.10:6379 "
    "vllm serve Qwen/Qwen3-30B-A3B-Instruct-2507 --served-model-name chat --tensor-parallel-size 2 "
    "--distributed-executor-backend ray --gpu-memory-utilization 0.85 --host 10.0.0.11 --port 8000 "
    "--max-model-len 32768"
)
SHELL_OPERATORS = {"&&", "||", ";", "|", ">", ">>", "<", "2>&1"}


MODEL_LINE = "    model: Qwen/Qwen3-30B-A3B-Instruct-2507\n"
NO_SYNC = "    sync_weights: false\n"


def edit(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"expected exactly one {old!r}"
    return text.replace(old, new)


def container_inventory(*edits: tuple[str, str]) -> Inventory:
    text = edit(EXAMPLE.read_text(), "  venv: /opt/sparkctl-runtime\n", f"  image: {IMAGE}\n")
    # these cases run chat under vLLM's Ray executor, inside the Ray container (the default, mp, runs it in
    # containers of its own: tests/unit/test_container_mp.py)
    text = edit(text, "    tensor_parallel_size: 2\n", "    tensor_parallel_size: 2\n    executor: ray\n")
    # the weights are taken as present on both hosts (their copy: tests/unit/test_weights.py)
    text = edit(text, MODEL_LINE, MODEL_LINE + NO_SYNC)
    for old, new in edits:
        text = edit(text, old, new)
    return parse_inventory(text, "container-pair.yaml")


WITH_EMBED = ('extra_args: ["--max-model-len", "32768"]\n', 'extra_args: ["--max-model-len", "32768"]' + EMBED)


def _converged_venv_facts() -> dict[str, dict[str, Any]]:
    case = yaml.safe_load((HERE / "cases" / "up-converged-pair.yaml").read_text())
    return {host: dict(data) for host, data in case["facts"].items()}


def converged_facts(user: str = "root") -> dict[str, HostFacts]:
    """A converged pair in container mode: Ray runs in containers (as `user`, root unless rootless Docker), vLLM in
    the head's Ray container.

    `docker ps` lists sparkctl-ray on both hosts, from IMAGE; the probe finds chat's recorded process alive inside.
    """
    ray = "/usr/local/lib/python3.12/dist-packages/ray/core/src/ray"
    procs = {
        "spark-a": [
            Process(pid=1, user="root", args="/sbin/init"),
            Process(pid=3990, user="root", args="/usr/bin/containerd-shim-runc-v2 -namespace moby -id 6f1c0e"),
            Process(
                pid=4101,
                user=user,
                args=f"{ray}/gcs/gcs_server --gcs_server_port=6379 --node-ip-address=192.168.100.10",
            ),
            Process(
                pid=4160,
                user=user,
                args=f"{ray}/raylet/raylet --raylet_socket_name=/tmp/ray/session_latest/sockets/raylet "
                "--object_manager_port=6382 --node_manager_port=6381 --node_ip_address=192.168.100.10 --head",
            ),
            Process(
                pid=5120,
                user=user,
                args="/usr/bin/python3 /usr/local/bin/vllm serve " + CHAT_SPEC.split(" vllm serve ")[1],
            ),
        ],
        "spark-b": [
            Process(pid=1, user="root", args="/sbin/init"),
            Process(
                pid=3377,
                user=user,
                args=f"{ray}/raylet/raylet --raylet_socket_name=/tmp/ray/session_latest/sockets/raylet "
                "--node_ip_address=192.168.100.11",
            ),
        ],
    }
    containers = {"spark-a": {"sparkctl-ray": IMAGE}, "spark-b": {"sparkctl-ray": IMAGE}}
    inside = {"spark-a": ["chat"], "spark-b": []}
    result = {}
    for host, data in _converged_venv_facts().items():
        files = dict(data["files"])
        if "workload-chat.spec" in files:
            files["workload-chat.spec"] = CHAT_SPEC
        result[host] = HostFacts.model_validate(
            {
                "host": host,
                **data,
                "files": files,
                "processes": procs[host],
                "containers": containers[host],
                "container_workloads": inside[host],
                "runtime": Runtime(image_id=IMAGE_ID),
            }
        )
    return result


def fresh(inv: Inventory) -> dict[str, HostFacts]:
    return {h.name: fresh_facts(inv, h) for h in inv.hosts}


def plan_of(
    inv: Inventory, facts: dict[str, HostFacts], runbook: str = "up", digests: dict[str, str] = DIGESTS
) -> Plan:
    rb = load_runbook(runbook)
    params = resolve_params(rb, {})
    return build_runbook_plan(rb, PlanContext(inv, facts, params, digests), params)


def steps(plan: Plan, host: str | None = None, kind: str | None = None) -> list[Step]:
    return [
        s
        for st in plan.stages
        for s in st.steps
        if (host is None or s.host == host) and (kind is None or s.kind == kind)
    ]


def one(plan: Plan, host: str, kind: str, target: str | None = None) -> Step:
    found = [s for s in steps(plan, host, kind) if target is None or s.target == target]
    assert len(found) == 1, [s.id for s in steps(plan, host)]
    return found[0]


def sh_line(cmd: Command) -> str:
    assert cmd.argv[:2] == ["sh", "-c"] and len(cmd.argv) == 3, cmd.argv
    return cmd.argv[2]


def docker_run(line: str) -> tuple[list[str], list[str]]:
    """The `docker run` in a planned line: (its options, the command after the image)."""
    tokens = shlex.split(line)
    start = next(i for i in range(len(tokens) - 1) if tokens[i : i + 2] == ["docker", "run"])
    end = next((i for i in range(start, len(tokens)) if tokens[i] in SHELL_OPERATORS), len(tokens))
    run = tokens[start + 2 : end]
    assert IMAGE in run, f"image {IMAGE} not in {run}"
    at = run.index(IMAGE)
    options = run[:at]
    # the entrypoint is always named (never the image's own): the command is that program and the arguments
    assert options.count("--entrypoint") == 1, options
    return options, [options[options.index("--entrypoint") + 1], *run[at + 1 :]]


def docker_exec(line: str) -> tuple[list[str], str, list[str]]:
    """The `docker exec` in a planned line: (its options, the container, the command run inside)."""
    tokens = shlex.split(line)
    start = next(i for i in range(len(tokens) - 1) if tokens[i : i + 2] == ["docker", "exec"])
    end = next((i for i in range(start, len(tokens)) if tokens[i] in SHELL_OPERATORS), len(tokens))
    run = tokens[start + 2 : end]
    at = next(i for i, t in enumerate(run) if t.startswith("sparkctl-") and run[i - 1] != "-e")
    return run[:at], run[at], run[at + 1 :]


def inside(line: str) -> list[str]:
    """The workload's argv in the `sh -c` a `docker exec` runs: `{ setsid ARGV > log ... & } && echo $! > pid`."""
    _, container, command = docker_exec(line)
    assert container == "sparkctl-ray" and command[:2] == ["sh", "-c"], (container, command)
    tokens = shlex.split(command[2])
    assert tokens[:2] == ["{", "setsid"], tokens
    return tokens[2 : tokens.index(">")]


def has(options: list[str], *seq: str) -> bool:
    return any(options[i : i + len(seq)] == list(seq) for i in range(len(options)))


def assert_spark_container(options: list[str], name: str) -> None:
    assert options[:3] == ["-d", "--name", name]
    assert has(options, "--init")  # a PID 1 that reaps what `docker exec` started
    assert has(options, "--gpus", "all")
    assert has(options, "--network", "host")
    assert not has(options, "--ipc", "host")  # --shm-size is the container's own /dev/shm (run_cluster.sh)
    assert has(options, "--shm-size=64g") or has(options, "--shm-size", "64g")
    assert has(options, "--ulimit", "memlock=-1")
    assert has(options, "--device", "/dev/infiniband")
    assert has(options, "--env-file", paths.ENV_FILE)
    assert has(options, "-v", f"{HOME}/.cache/huggingface:/root/.cache/huggingface")
    # token auth: the token is a file in the mounted state dir, never a value
    assert has(options, "-e", "RAY_AUTH_MODE=token")
    assert has(options, "-e", "RAY_AUTH_TOKEN_PATH=/sparkctl/ray-token")
    assert has(options, "-v", f"{STATE}:/sparkctl")
    assert paths.token_path(HOME) == f"{STATE}/ray-token"
    # vLLM in the container (root, another $HOME) reads the non-carry-over list the host keeps in ~/.config/vllm
    assert has(options, "-e", "VLLM_CONFIG_ROOT=/sparkctl-config/vllm")
    assert has(options, "-v", f"{HOME}/.config/vllm:/sparkctl-config/vllm")


# --- Ray -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "role", "ip", "role_args"),
    [
        ("spark-a", "head", "192.168.100.10", ["--head", "--port=6379", "--dashboard-host=127.0.0.1"]),
        ("spark-b", "worker", "192.168.100.11", ["--address=192.168.100.10:6379"]),
    ],
)
def test_ray_runs_in_a_detached_container(host: str, role: str, ip: str, role_args: list[str]) -> None:
    inv = container_inventory()
    step = one(plan_of(inv, fresh(inv)), host, "ray_node", role)
    (cmd,) = step.commands  # nothing runs yet: no stop first
    options, command = docker_run(sh_line(cmd))
    assert_spark_container(options, "sparkctl-ray")
    assert command[:2] == ["sh", "-c"] and len(command) == 3
    inner = shlex.split(command[2])
    assert inner[:2] == ["ray", "start"]
    assert inner[-1] == "--block", "under `docker run -d` Ray must stay in the foreground of the container"
    assert f"--node-ip-address={ip}" in inner and "--disable-usage-stats" in inner
    assert all(a in inner for a in role_args)
    assert ("--head" in inner) == (role == "head")
    assert "--node-manager-port=6381" in inner and "--min-worker-port=10100" in inner


def test_ray_token_is_installed_where_the_container_reads_it() -> None:
    inv = container_inventory()
    plan = plan_of(inv, fresh(inv))
    for host in ("spark-a", "spark-b"):
        (cmd,) = one(plan, host, "ray_token").commands
        assert cmd.argv == ["install", "-D", "-m", "0600", "/dev/stdin", f"{STATE}/ray-token"]
        assert cmd.stdin_secret == "ray_token" and cmd.stdin is None


def test_ray_formation_is_checked_inside_the_ray_container() -> None:
    inv = container_inventory()
    (cmd,) = one(plan_of(inv, fresh(inv)), "spark-a", "verify_ray").commands
    assert shlex.split(sh_line(cmd)) == [
        "exec",
        "docker",
        "exec",
        "-i",
        "-e",
        "RAY_ADDRESS=192.168.100.10:6379",
        "sparkctl-ray",
        "python3",
        "-",
    ]
    assert cmd.stdin is not None and '"192.168.100.10", "192.168.100.11"' in cmd.stdin


def test_shm_size_and_hf_cache_follow_the_inventory() -> None:
    inv = container_inventory(
        (f"  image: {IMAGE}\n", f"  image: {IMAGE}\n  shm_size_gb: 32\n  hf_cache: /data/hf\n"),
    )
    plan = plan_of(inv, fresh(inv))
    for step in (one(plan, "spark-b", "ray_node"), one(plan, "spark-a", "ray_node")):
        options, _ = docker_run(sh_line(step.commands[-1]))
        assert has(options, "--shm-size=32g") or has(options, "--shm-size", "32g")
        assert has(options, "-v", "/data/hf:/root/.cache/huggingface")
        assert not any("64g" in o for o in options)


# --- workloads -------------------------------------------------------------------------------------------------


def test_vllm_workload_runs_in_the_heads_ray_container() -> None:
    """`docker exec` into sparkctl-ray: the driver shares the container's Ray session and process namespace."""
    inv = container_inventory()
    step = one(plan_of(inv, fresh(inv)), "spark-a", "workload", "chat")
    (cmd,) = step.commands
    assert cmd.stdin_secret == "api_key:chat" and cmd.stdin is None
    line = sh_line(cmd)
    assert "docker run" not in line
    options, container, command = docker_exec(line)
    assert container == "sparkctl-ray"
    assert inside(line) == [
        "vllm",
        "serve",
        "Qwen/Qwen3-30B-A3B-Instruct-2507",
        "--served-model-name",
        "chat",
        "--tensor-parallel-size",
        "2",
        "--distributed-executor-backend",
        "ray",
        "--gpu-memory-utilization",
        "0.85",
        "--host",
        "10.0.0.11",
        "--port",
        "8000",
        "--max-model-len",
        "32768",
    ]
    assert not any("VLLM_DISTRIBUTED_EXECUTOR_CONFIG" in o for o in options)  # not a vLLM variable
    assert has(options, "-e", "RAY_ADDRESS=192.168.100.10:6379")
    # the API key: read from stdin into the shell, handed to docker by name only
    assert has(options, "-e", "VLLM_API_KEY")
    assert not any(o.startswith("VLLM_API_KEY=") for o in shlex.split(line))
    assert line.index("IFS= read -r VLLM_API_KEY && export VLLM_API_KEY") < line.index("docker exec")
    # output and pid go to the mounted state dir: the same log and pid file as in venv mode
    inner = command[2]
    assert "> /sparkctl/logs/chat.log 2>&1 < /dev/null & }" in inner
    assert inner.endswith("&& echo $! > /sparkctl/workload-chat.pid")
    assert f"> {STATE}/workload-chat.spec" in line
    assert step.diff[-1] == f"+ chat: {CHAT_SPEC}"


@pytest.mark.parametrize("workload", ["chat", "emb"])
def test_workloads_are_told_where_the_ray_cluster_is(workload: str) -> None:
    inv = container_inventory(WITH_EMBED)
    options, _, _ = docker_exec(sh_line(one(plan_of(inv, fresh(inv)), "spark-a", "workload", workload).commands[-1]))
    assert has(options, "-e", "RAY_ADDRESS=192.168.100.10:6379"), options


def test_embed_worker_runs_from_the_mounted_state_dir() -> None:
    """In container mode the embed worker's program is /sparkctl/embed_worker.py: the host's state dir, mounted."""
    inv = container_inventory(WITH_EMBED)
    line = sh_line(one(plan_of(inv, fresh(inv)), "spark-a", "workload", "emb").commands[-1])
    options, _, _ = docker_exec(line)
    assert has(options, "-e", "SPARKCTL_API_KEY")
    command = inside(line)
    assert command[:2] == ["python3", f"/sparkctl/{workload_commands.WORKER_FILE}"]
    assert has(command, "--bundle-resources", '{"GPU":1}')
    assert has(command, "--ray-address", "192.168.100.10:6379")


def test_venv_mode_ships_the_embed_worker() -> None:
    text = edit(EXAMPLE.read_text(), *WITH_EMBED)
    inv = parse_inventory(text, "venv-pair.yaml")
    (cmd,) = one(plan_of(inv, fresh(inv)), "spark-a", "worker_code").commands
    assert cmd.argv == ["install", "-D", "-m", "0644", "/dev/stdin", f"{STATE}/{workload_commands.WORKER_FILE}"]
    assert cmd.stdin_blob == "worker_code"


def test_container_mode_ships_the_embed_worker_it_runs() -> None:
    """The container runs /sparkctl/embed_worker.py from the mounted state dir, so `up` installs it there."""
    inv = container_inventory(WITH_EMBED)
    plan = plan_of(inv, fresh(inv))
    (cmd,) = one(plan, "spark-a", "worker_code").commands
    assert cmd.argv == ["install", "-D", "-m", "0644", "/dev/stdin", f"{STATE}/{workload_commands.WORKER_FILE}"]
    assert cmd.stdin_blob == "worker_code"
    ids = [s.id for s in steps(plan, "spark-a")]
    assert ids.index(one(plan, "spark-a", "worker_code").id) < ids.index("workload:emb")


def test_container_mode_without_an_embed_workload_ships_no_worker() -> None:
    inv = container_inventory()
    assert steps(plan_of(inv, fresh(inv)), kind="worker_code") == []


# --- converged pair, restarts, leftovers -------------------------------------------------------------------------


def test_converged_container_pair_plans_no_change() -> None:
    plan = plan_of(container_inventory(), converged_facts())
    assert [s for s in steps(plan) if s.changes] == []
    assert sorted(s.id for s in steps(plan, "spark-a")) == [
        "verify_jumbo:enP2p1s0f1np1->spark-b",
        "verify_jumbo:enp1s0f1np1->spark-b",
        "verify_placement:chat",
        "verify_ray:formation",
        "verify_workload:chat",
    ]


CHAT_STOP = (
    "docker exec sparkctl-ray sh -c 'if [ -f /sparkctl/workload-chat.pid ]; then "
    "pid=$(cat /sparkctl/workload-chat.pid); "
    'kill -TERM -"$pid" 2>/dev/null; i=0; while kill -0 -"$pid" 2>/dev/null && [ $i -lt 150 ]; do sleep 0.2; '
    'i=$((i+1)); done; kill -KILL -"$pid" 2>/dev/null; rm -f /sparkctl/workload-chat.pid /sparkctl/workload-chat.spec; '
    "fi; true' 2>/dev/null; "
    f"rm -f {STATE}/workload-chat.pid {STATE}/workload-chat.spec {STATE}/workload-chat.health; true"
)


RAY_RM = (
    "docker rm -f sparkctl-ray >/dev/null 2>&1; "
    f'for f in {STATE}/workload-*.pid; do [ -f "$f" ] || continue; n=${{f%.pid}}; '
    'rm -f "$n.pid" "$n.spec" "$n.health"; done; true'
)
"""Removing the Ray container ends the workloads inside and forgets their pid records with them."""


def test_rotated_token_restarts_ray_by_removing_its_container() -> None:
    plan = plan_of(container_inventory(), converged_facts(), digests=DIGESTS | {"ray_token": "99aa88bb77cc"})
    for host in ("spark-a", "spark-b"):
        stop, start = one(plan, host, "ray_node").commands
        assert sh_line(stop) == RAY_RM
        assert docker_run(sh_line(start))[0][:3] == ["-d", "--name", "sparkctl-ray"]
    # chat ended with its Ray container and its pid record went too: no stop runs inside the new container (where
    # the old pid may name another process group), chat is only started there
    chat = one(plan, "spark-a", "workload", "chat")
    (start,) = chat.commands
    assert docker_exec(sh_line(start))[1] == "sparkctl-ray"
    assert chat.diff[0] == "- chat: stopped"


def test_a_leftover_container_is_removed_before_docker_run() -> None:
    """A stopped container keeps its name (after a reboot, or when Ray exited): `docker run --name` would fail with
    a name conflict, so the start line removes any container of that name first."""
    facts = converged_facts()
    # after a reboot: the containers exist, stopped (`docker ps` lists none); nothing runs
    facts = {
        h: f.model_copy(update={"processes": f.processes[:1], "containers": {}, "container_workloads": []})
        for h, f in facts.items()
    }
    step = one(plan_of(container_inventory(), facts), "spark-a", "ray_node")
    lines = [sh_line(c) for c in step.commands]
    (run_at,) = [i for i, line in enumerate(lines) if "--name sparkctl-ray" in line]
    run = lines[run_at]
    removal = "{ docker rm -f sparkctl-ray >/dev/null 2>&1; true; } && docker run -d --name sparkctl-ray "
    assert removal in run, run
    assert run.index(removal) < run.index("docker run")


def test_a_workload_whose_process_exited_is_started_again() -> None:
    """vLLM exited inside the Ray container: the probe no longer finds its process, so up starts it again."""
    facts = converged_facts()
    facts["spark-a"] = facts["spark-a"].model_copy(update={"container_workloads": []})
    plan = plan_of(container_inventory(), facts)
    (start,) = one(plan, "spark-a", "workload", "chat").commands
    assert docker_exec(sh_line(start))[1] == "sparkctl-ray"
    assert {s.id for s in steps(plan) if s.changes} == {"page_cache:drop", "workload:chat"}


def test_a_new_image_restarts_ray_and_the_workloads() -> None:
    new = "nvcr.io/nvidia/vllm:25.12-py3"
    inv = container_inventory((f"  image: {IMAGE}\n", f"  image: {new}\n"))
    plan = plan_of(inv, converged_facts())
    assert {s.id for s in steps(plan) if s.changes} >= {"ray_node:head", "ray_node:worker", "workload:chat"}
    for host in ("spark-a", "spark-b"):
        stop, start = one(plan, host, "ray_node").commands
        assert sh_line(stop) == RAY_RM
        assert f" --entrypoint sh {new} -c " in sh_line(start)
    chat = one(plan, "spark-a", "workload", "chat")
    assert chat.diff[-1] == f"+ chat: {CHAT_SPEC.replace(IMAGE, new)}"
    assert inside(sh_line(chat.commands[-1]))[:2] == ["vllm", "serve"]


def test_ray_converges_on_the_container_docker_lists() -> None:
    """In container mode Ray runs as specified when `docker ps` lists sparkctl-ray from the inventory's image.

    spark-b's runs another image: it is replaced, and since the chat workload (Ray executor) is recorded on the
    head, the head's Ray starts anew too (plan/ray_stages.lost_ray_nodes)."""
    facts = converged_facts()
    b = facts["spark-b"]
    facts["spark-b"] = b.model_copy(update={"containers": {"sparkctl-ray": "nvcr.io/nvidia/vllm:25.09-py3"}})
    plan = plan_of(container_inventory(), facts)
    assert {s.id for s in steps(plan) if s.changes and s.kind == "ray_node"} == {"ray_node:worker", "ray_node:head"}
    assert "the cluster lost spark-b under a placement group" in one(plan, "spark-a", "ray_node").description
    stop, _ = one(plan, "spark-b", "ray_node").commands
    assert sh_line(stop) == RAY_RM


# --- down --------------------------------------------------------------------------------------------------------


def test_down_stops_the_workload_inside_then_removes_the_containers() -> None:
    """With rootless Docker the containers' processes belong to the login user, and `down` removes them."""
    plan = plan_of(container_inventory(), converged_facts(user="nvidia"), runbook="down")
    (stop,) = one(plan, "spark-a", "workload_stopped", "chat").commands
    assert sh_line(stop) == CHAT_STOP
    for host in ("spark-a", "spark-b"):
        (cmd,) = one(plan, host, "ray_stopped").commands
        assert sh_line(cmd) == RAY_RM


def test_down_removes_ray_containers_running_as_root() -> None:
    """The NGC image runs Ray as root: `down` finds sparkctl-ray through `docker ps`, not the login user's processes."""
    plan = plan_of(container_inventory(), converged_facts(user="root"), runbook="down")
    for host in ("spark-a", "spark-b"):
        step = one(plan, host, "ray_stopped")
        (cmd,) = step.commands
        assert sh_line(cmd) == RAY_RM
        assert step.diff == ["- ray: container sparkctl-ray", "+ ray: stopped"]
    (stop,) = one(plan, "spark-a", "workload_stopped", "chat").commands
    assert sh_line(stop) == CHAT_STOP


def test_down_on_a_clean_container_pair_stops_nothing() -> None:
    inv = container_inventory()
    plan = plan_of(inv, fresh(inv), runbook="down")
    assert [s.id for s in steps(plan) if s.changes] == []


def test_verify_clean_also_asks_docker_in_container_mode() -> None:
    """Root's processes in the containers escape `pgrep -u $(id -un)`: docker must list no sparkctl-* container."""
    pgrep = (
        '! pgrep -u "$(id -un)" -f -a -- '
        "'[r]aylet|[g]cs_server|[r]ay/dashboard|[r]ay/_private|[r]ay::|[e]mbed_worker[.]py|[v]llm serve'"
    )
    plan = plan_of(container_inventory(), converged_facts(), runbook="down")
    for host in ("spark-a", "spark-b"):
        (cmd,) = one(plan, host, "verify_clean").commands
        assert sh_line(cmd) == pgrep + " && ! docker ps -q --filter name=sparkctl- | grep -q ."
    venv = parse_inventory(EXAMPLE.read_text(), "venv-pair.yaml")
    (cmd,) = one(plan_of(venv, fresh(venv), runbook="down"), "spark-a", "verify_clean").commands
    assert sh_line(cmd) == pgrep


# --- every shell line parses; the launch lines run against stubs ------------------------------------------------


def _plans() -> dict[str, Plan]:
    inv, emb = container_inventory(), container_inventory(WITH_EMBED)
    return {
        "up-fresh": plan_of(emb, fresh(emb)),
        "up-converged-token-rotated": plan_of(inv, converged_facts(), digests=DIGESTS | {"ray_token": "x"}),
        "down-converged": plan_of(inv, converged_facts(user="nvidia"), runbook="down"),
    }


@pytest.mark.parametrize("name", ["up-fresh", "up-converged-token-rotated"])
def test_every_docker_run_replaces_its_container_and_follows_its_output(name: str) -> None:
    """A stopped container keeps its name: each `docker run` removes it first; `docker logs -f` fills the log."""
    runs = [line for line in _sh_lines(_plans()[name]) if "docker run" in line]
    assert runs
    for line in runs:
        (container,) = {t for t in shlex.split(line) if t.startswith("sparkctl-")}
        log = f"{STATE}/logs/{container.removeprefix('sparkctl-')}.log"
        assert line.count("docker run") == 1
        assert f"{{ docker rm -f {container} >/dev/null 2>&1; true; }} && docker run -d --name {container} " in line
        # docker run -d prints the container id only; the container's output goes to the log through docker logs
        assert f" > /dev/null && {{ setsid docker logs -f {container} >> {log} 2>&1 < /dev/null & }}" in line
        assert line.index(f"docker rm -f {container}") < line.index("docker run") < line.index("docker logs -f")


def _sh_lines(plan: Plan) -> list[str]:
    lines = []
    for s in steps(plan):
        for c in s.commands:
            if c.argv[:2] == ["sh", "-c"]:
                lines.append(c.argv[2])
                if "docker run" in c.argv[2]:  # the command inside the container, when it is a shell line too
                    _, command = docker_run(c.argv[2])
                    if command[:2] == ["sh", "-c"]:
                        lines.append(command[2])
                if "docker exec sparkctl-ray sh -c" in c.argv[2] or "docker exec -e" in c.argv[2]:
                    _, _, command = docker_exec(c.argv[2])
                    if command[:2] == ["sh", "-c"]:
                        lines.append(command[2])
    return lines


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX sh")
@pytest.mark.parametrize("name", ["up-fresh", "up-converged-token-rotated", "down-converged"])
def test_every_planned_shell_line_parses(name: str) -> None:
    lines = _sh_lines(_plans()[name])
    assert lines
    for line in lines:
        r = subprocess.run(["sh", "-n", "-c", line], capture_output=True, text=True, timeout=10)
        assert r.returncode == 0, f"{line}\n{r.stderr}"


SHELLS = [
    pytest.param(sh, marks=pytest.mark.skipif(shutil.which(sh) is None, reason=f"no {sh}"), id=sh)
    for sh in ("dash", "bash")
]
STUB_DOCKER = """#!/bin/sh
echo "$1 $2 $3" >> "$REC/calls.log"
case "$1" in
  run) printf '%s\\n' "$@" > "$REC/run.argv"; printf '%s' "$VLLM_API_KEY" > "$REC/run.key"; echo 6f1c0e9b2a7d ;;
  exec) printf '%s\\n' "$@" > "$REC/exec.argv"; printf '%s' "$VLLM_API_KEY" > "$REC/exec.key" ;;
  logs) echo "output of $3" ;;
esac
"""
STUB_RAY = """#!/bin/sh
printf '%s\\n' "$@" > "$REC/ray.argv"
"""


@pytest.fixture
def stubs(tmp_path: Path) -> tuple[dict[str, str], Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("docker", STUB_DOCKER), ("ray", STUB_RAY)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "worker.env").write_text("NCCL_IB_GID_INDEX=3\n")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "REC": str(tmp_path)}
    return env, tmp_path


def _followed(log: Path, deadline: float = 5.0) -> str:
    """The log file once the backgrounded `docker logs -f` (the stub prints one line and exits) has written it."""
    end = time.monotonic() + deadline
    while not (log.exists() and log.read_text().endswith("\n")):
        assert time.monotonic() < end, f"{log.name}: docker logs -f never wrote to it"
        time.sleep(0.02)
    return log.read_text()


def _calls(tmp: Path) -> list[str]:
    return (tmp / "calls.log").read_text().splitlines()


@pytest.mark.skipif(shutil.which("setsid") is None, reason="needs util-linux setsid")
@pytest.mark.parametrize("shell", SHELLS)
def test_workload_line_gives_docker_the_key_by_name_only(stubs: tuple[dict[str, str], Path], shell: str) -> None:
    env, tmp = stubs
    home = str(tmp / "home")
    inv = container_inventory()
    line = workload_commands.build_workload_start(inv, inv.workload("chat"), home)
    r = subprocess.run([shell, "-c", line], input="sk-unit-test\n", env=env, capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    argv = (tmp / "exec.argv").read_text().splitlines()
    assert (tmp / "exec.key").read_text() == "sk-unit-test"
    assert "sk-unit-test" not in "\n".join(argv) and "sk-unit-test" not in line
    assert argv[:3] == ["exec", "-e", "VLLM_API_KEY"]
    assert has(argv, "-e", "RAY_ADDRESS=192.168.100.10:6379")
    assert argv[argv.index("sparkctl-ray") + 1 : argv.index("sparkctl-ray") + 3] == ["sh", "-c"]
    assert (
        Path(workload_commands.spec_file(home, "chat")).read_text()
        == workload_commands.workload_spec(inv, inv.workload("chat"), home) + "\n"
    )
    assert _calls(tmp) == ["exec -e VLLM_API_KEY"]
    # what the container's sh runs, here on this machine with /sparkctl as the state dir: the pid is recorded
    inner = argv[argv.index("sparkctl-ray") + 3]
    state = tmp / "state"
    (state / "logs").mkdir(parents=True)
    sleeper = inner.replace("/sparkctl/", f"{state}/").split("setsid ", 1)
    script = sleeper[0] + "setsid sleep 30 > " + sleeper[1].split(" > ", 1)[1]
    r = subprocess.run([shell, "-c", script], env=env, capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    pid = int((state / "workload-chat.pid").read_text())
    try:
        end = time.monotonic() + 3
        while os.getpgid(pid) != pid and time.monotonic() < end:  # the child runs setsid after the shell returned
            time.sleep(0.02)
        assert os.getpgid(pid) == pid  # its own process group: `down` TERMs all of it
    finally:
        os.killpg(pid, signal.SIGKILL)


@pytest.mark.skipif(shutil.which("setsid") is None, reason="needs util-linux setsid")
@pytest.mark.parametrize("shell", SHELLS)
def test_ray_line_survives_both_levels_of_quoting(stubs: tuple[dict[str, str], Path], shell: str) -> None:
    env, tmp = stubs
    inv = container_inventory()
    home = str(tmp / "home")
    line = ray_commands.build_ray_start(inv, inv.host("spark-b"), home)
    r = subprocess.run([shell, "-c", line], env=env, capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    assert _followed(Path(paths.log_path(home, "ray"))) == "output of sparkctl-ray\n"
    assert _calls(tmp)[:2] == ["rm -f sparkctl-ray", "run -d --name"]
    assert sorted(_calls(tmp)) == ["logs -f sparkctl-ray", "rm -f sparkctl-ray", "run -d --name"]
    argv = (tmp / "run.argv").read_text().splitlines()
    command = [argv[argv.index("--entrypoint") + 1], *argv[argv.index(IMAGE) + 1 :]]
    assert command[:2] == ["sh", "-c"]
    # what the container's sh runs, here with the stub ray
    r = subprocess.run([shell, "-c", command[2]], env=env, capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    ray_argv = (tmp / "ray.argv").read_text().splitlines()
    assert ray_argv[0] == "start" and ray_argv[-1] == "--block"
    assert "--address=192.168.100.10:6379" in ray_argv and "--node-ip-address=192.168.100.11" in ray_argv


# --- doctor: the same image on every host ----------------------------------------------------------------------


def test_probe_asks_docker_for_the_image_id_size_and_environment() -> None:
    inv = container_inventory()
    want = "docker image inspect --format 'image_id={{.Id}} image_size={{.Size}} image_env={{json .Config.Env}}'"
    assert f"{want} {IMAGE}" in build_probe(inv, inv.hosts[0])


@pytest.mark.parametrize(
    ("outputs", "level", "evidence"),
    [
        (
            {"spark-a": f"image_id={IMAGE_ID}\n", "spark-b": f"image_id={IMAGE_ID}\n"},
            "pass",
            "image sha256:4c1e2b7a9d0f",
        ),
        (
            {"spark-a": f"image_id={IMAGE_ID}\n", "spark-b": "image_id=sha256:9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b\n"},
            "warn",  # up copies the Ray head's image to spark-b (plan/images.py)
            "spark-b (image sha256:9e8d7c6b5a4f): up copies spark-a's image there",
        ),
        ({"spark-a": f"image_id={IMAGE_ID}\n", "spark-b": ""}, "warn", "spark-b (no image): up copies spark-a's"),
    ],
    ids=["same-image", "images-differ", "image-missing"],
)
def test_doctor_compares_image_ids(outputs: dict[str, str], level: str, evidence: str) -> None:
    """The probe's runtime section (`docker image inspect`) parsed per host, then the runtime-versions rule."""
    inv = container_inventory()
    facts = {h: f.model_copy(update={"runtime": parse_runtime(outputs[h])}) for h, f in converged_facts().items()}
    (finding,) = [f for f in evaluate(CheckContext(inv, facts), preflight_only=True) if f.rule == "runtime-versions"]
    assert (finding.level, finding.subject) == (level, "cluster")
    assert evidence in finding.evidence
    assert not finding.force_ok
