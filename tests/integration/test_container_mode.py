"""Container mode end to end, with a real container engine: Debian's podman behind the `docker` command sparkctl runs.

The image is built locally by tests/prepare.sh (a Debian bookworm rootfs plus the runtime venv: Ray, torch, the
embed worker's needs); no registry is reached. One Ray container per fake Spark; the TP=2 embed worker runs inside the
head's Ray container through `docker exec`. Every assertion reads the hosts (podman, /proc inside the container) or
the endpoint. The testbed's podman needs `--ulimit host` and has no /dev/infiniband: the inventory says so
(runtime.ulimits, runtime.devices), the one difference from a real Spark.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sparkctl.plan.env import render_non_carry_over
from tests.integration.helpers import REPO, cli_env, open_from_laptop, plan_steps, sparkctl
from tests.testbed import Testbed
from tests.testbed.provision import IMAGE_STORE, TESTBED_IMAGE

pytestmark = pytest.mark.testbed


def test_the_engine_and_the_image_are_installed() -> None:
    """tests/prepare.sh installs podman and builds the image; without them container mode is not tested at all."""
    assert Path("/usr/bin/podman").exists(), "podman missing: run tests/prepare.sh"
    assert IMAGE_STORE.exists(), f"{IMAGE_STORE} missing: run tests/prepare.sh (tests/testbed/build_image.sh)"


EMBED = {"name": "embed", "engine": "embed", "tensor_parallel_size": 2, "port": 8100, "ready_timeout": 600}


def container_inventory(tb: Testbed, path: Path) -> Path:
    data = yaml.safe_load(tb.inventory_path(workloads=[EMBED]).read_text())
    data["runtime"] = {"image": TESTBED_IMAGE, "ulimits": ["host"], "devices": []}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def podman(tb: Testbed, host: str, *args: str, check: bool = True) -> str:
    return tb.exec(host, ["podman", *args], check=check, timeout=120).stdout


def sparkctl_containers(tb: Testbed, host: str) -> list[str]:
    return podman(tb, host, "ps", "-a", "--filter", "name=sparkctl-", "--format", "{{.Names}}").split()


class Pair:
    def __init__(self, tb: Testbed, inventory: Path, env: dict[str, str]) -> None:
        self.tb, self.inventory, self.env = tb, inventory, env

    def run(self, *args: str, timeout: float = 900) -> Any:
        return sparkctl(*args, "-i", str(self.inventory), env=self.env, timeout=timeout)


@pytest.fixture(scope="module")
def pair(testbed: Testbed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    testbed.reset_hosts()
    tmp = tmp_path_factory.mktemp("container-mode")
    env = cli_env({**os.environ, "SPARKCTL_SUDO_PASSWORD": testbed.sudo_password}, tmp / "state")
    p = Pair(testbed, container_inventory(testbed, tmp / "inventory.yaml"), env)
    yield p
    p.run("down")
    testbed.reset_hosts()


def test_up_runs_ray_in_one_container_per_host_and_the_workload_inside_the_heads(pair: Pair) -> None:
    tb = pair.tb
    r = pair.run("up", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    for host in tb.hosts:
        assert sparkctl_containers(tb, host) == ["sparkctl-ray"], host
        image = podman(tb, host, "inspect", "-f", "{{.ImageName}}", "sparkctl-ray").strip()
        assert image == TESTBED_IMAGE
    # the worker runs in the head's Ray container: its recorded pid is a live process there
    cmdline = podman(
        tb,
        "spark-a",
        "exec",
        "sparkctl-ray",
        "sh",
        "-c",
        "tr '\\0' ' ' < /proc/$(cat /sparkctl/workload-embed.pid)/cmdline",
    )
    assert "/sparkctl/embed_worker.py" in cmdline and '{"GPU":1}' in cmdline
    # what the container carries: the worker env, the token, the non-carry-over list where vLLM reads it
    inside = podman(
        tb,
        "spark-a",
        "exec",
        "sparkctl-ray",
        "sh",
        "-c",
        'echo "$GLOO_SOCKET_IFNAME $RAY_AUTH_MODE $VLLM_CONFIG_ROOT"; test -s "$RAY_AUTH_TOKEN_PATH" && '
        'echo token; cat "$VLLM_CONFIG_ROOT/ray_non_carry_over_env_vars.json"',
    )
    first, token, rest = inside.split("\n", 2)
    assert first == "enp1s0f1np1 token /sparkctl-config/vllm"
    assert token == "token"
    assert json.loads(rest) == json.loads(render_non_carry_over())
    # Ray over the fabric, both nodes, the ranks one per host (the placement step passed; read it again here)
    nodes = podman(
        tb,
        "spark-a",
        "exec",
        "-e",
        "RAY_ADDRESS=192.168.100.10:6379",
        "sparkctl-ray",
        "python3",
        "-c",
        "import ray, json; ray.init(address='auto', logging_level='ERROR'); "
        "print(json.dumps(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive'])))",
    )
    assert json.loads(nodes.strip().splitlines()[-1]) == ["192.168.100.10", "192.168.100.11"]
    assert "placement" in r.stdout + r.stderr


def test_the_endpoint_answers_and_a_second_plan_changes_nothing(pair: Pair) -> None:
    import openai

    key = next((Path(pair.env["XDG_STATE_HOME"]) / "sparkctl" / "testbed").glob("api-key-embed")).read_text().strip()
    client = openai.OpenAI(base_url="http://10.77.0.11:8100/v1", api_key=key, max_retries=0, timeout=60)
    out = client.embeddings.create(model="embed", input=["two Sparks", "one cable"])
    assert [len(d.embedding) for d in out.data] == [384, 384]
    # Ray in its container (--network host) and the worker's gloo rendezvous: only SSH and the API answer the laptop
    assert {h: open_from_laptop(pair.tb, h) for h in pair.tb.hosts} == {"spark-a": {22, 8100}, "spark-b": {22}}
    r = pair.run("plan", "--json")
    assert r.returncode == 0, r.stderr
    assert [s["id"] for s in plan_steps(r.stdout) if s["changes"]] == []


def test_status_and_logs_read_the_container_workload(pair: Pair) -> None:
    r = pair.run("status", "--json")
    assert r.returncode == 0, r.stderr
    embed = json.loads(r.stdout)["workloads"]["embed"]
    assert (embed["process"], embed["health"]) == ("ok", "ready"), embed
    r = pair.run("logs", "embed", "-n", "200")
    assert r.returncode == 0 and "placement group ready" in r.stdout, r.stdout + r.stderr
    r = pair.run("logs", "ray", "--host", "spark-b", "-n", "50")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


def test_down_leaves_no_container(pair: Pair) -> None:
    r = pair.run("down")
    assert r.returncode == 0, r.stdout + r.stderr
    for host in pair.tb.hosts:
        assert sparkctl_containers(pair.tb, host) == [], host


def test_ctrl_c_during_readiness_removes_the_containers(pair: Pair) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sparkctl", "up", "--yes", "-i", str(pair.inventory)],
        cwd=REPO,
        env=pair.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "verify_workload:embed ..." in line:
            break
    else:
        pytest.fail("up never reached the readiness wait:\n" + "".join(seen))
    assert sparkctl_containers(pair.tb, "spark-a") == ["sparkctl-ray"]
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=180)
    assert proc.returncode == 130, "".join(seen) + rest
    for host in pair.tb.hosts:
        assert sparkctl_containers(pair.tb, host) == [], host


# vLLM's Ray executor (the default is mp) needs a GPU per rank, so it is the SIMULATED vllm here
# (tests/testbed/sim/vllm: vLLM's own parser and Ray placement, one Ray actor per rank), mounted over the image's by
# Testbed.use_vllm("simulated"); Ray, podman and the containers are real.
CHAT_RAY: dict[str, Any] = {
    "name": "chat",
    "engine": "vllm",
    "model": "Qwen/Qwen3-0.6B",
    "tensor_parallel_size": 2,
    "executor": "ray",
    "sync_weights": False,  # the simulated vLLM reads no weights, and the testbed reaches no hub
    "port": 8000,
    "ready_timeout": 300,
}


def test_vllms_ray_executor_in_the_containers_opens_only_the_api_to_the_laptop(pair: Pair, tmp_path: Path) -> None:
    """Container mode with vLLM's Ray executor: `vllm serve` runs in the head's Ray container (`docker exec`), one
    rank as a Ray actor in each host's Ray container; every container shares its host's network, and from the
    laptop's side only SSH, and the API on the head, answer (Ray's ports, the actors' worker ports, the
    executor's own listeners stay behind the firewall)."""
    tb = pair.tb
    data = yaml.safe_load(pair.inventory.read_text())
    data["workloads"] = [CHAT_RAY]
    inventory = tmp_path / "chat-ray.yaml"
    inventory.write_text(yaml.safe_dump(data, sort_keys=False))
    tb.use_vllm("simulated")
    try:
        r = sparkctl("up", "--yes", "-i", str(inventory), env=pair.env, timeout=900)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
        for host in tb.hosts:
            assert sparkctl_containers(tb, host) == ["sparkctl-ray"], host
            ranks = podman(tb, host, "exec", "sparkctl-ray", "pgrep", "-f", "-a", "ray::RayWorkerProc", check=False)
            assert ranks.strip(), f"no rank of chat in {host}'s Ray container"
        served = podman(tb, "spark-a", "exec", "sparkctl-ray", "pgrep", "-f", "-a", "vllm serve")
        assert "--distributed-executor-backend ray" in served, served
        assert {h: open_from_laptop(tb, h) for h in tb.hosts} == {"spark-a": {22, 8000}, "spark-b": {22}}
    finally:
        down = sparkctl("down", "-i", str(inventory), env=pair.env, timeout=900)
        tb.use_vllm("real")
    assert down.returncode == 0, down.stdout + down.stderr
    for host in tb.hosts:
        assert sparkctl_containers(tb, host) == [], host
