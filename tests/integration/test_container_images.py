"""Today's Spark images on the testbed, with the real container engine (podman behind `docker`) and real vLLM.

The image is built like the vllm-openai images (vLLM's docker/Dockerfile: ENTRYPOINT ["vllm", "serve"], no Ray) by
tests/testbed/build_image.sh, and states the CUDA it needs as NGC images do (NVIDIA_REQUIRE_CUDA=cuda>=13.0). It is
loaded on spark-a only; spark-b starts without it. One bring-up serves the module:

- a driver too old for the image is refused before anything changes (the simulated nvidia-smi of a 570 driver
  reports CUDA 12.8);
- `up` of a TP=2 vLLM workload under the multiprocessing executor (the default) copies the image to spark-b over
  the twin, runs one container per Spark with vLLM's CPU build, answers like sentence-transformers, and a second
  plan is empty; no Ray runs anywhere;
- an embed workload (which needs Ray) on the same image goes through `runtime.add_ray`: an image derived on each
  host with Ray added from the testbed's wheel directory, Ray in it, the worker answering;
- `down` leaves no container.

Assertions read the hosts (podman, /sys/class/net counters, processes) and the endpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from tests.integration.helpers import cli_env, open_from_laptop, plan_steps, sparkctl
from tests.integration.test_vllm_real import MINI, reference_cosines
from tests.testbed import TWINS, Testbed
from tests.testbed.layout import MGMT_IFNAME

pytestmark = pytest.mark.testbed

ARCHIVES = Path("/var/lib/sparkctl-testbed-archives")
IMAGE = "localhost/sparkctl-vllm-openai-like:test"
RAY_WHEELS = ARCHIVES / "ray-wheels"
TWIN = TWINS[0].interface


def podman(tb: Testbed, host: str, *args: str, check: bool = True) -> str:
    return tb.exec(host, ["podman", *args], check=check, timeout=600).stdout


def image_id(tb: Testbed, host: str, image: str = IMAGE) -> str:
    return podman(tb, host, "image", "inspect", "--format", "{{.Id}}", image, check=False).strip()


def containers(tb: Testbed, host: str) -> list[str]:
    return sorted(podman(tb, host, "ps", "-a", "--filter", "name=sparkctl-", "--format", "{{.Names}}").split())


def rx_bytes(tb: Testbed, host: str, ifname: str) -> int:
    return int(tb.exec(host, ["cat", f"/sys/class/net/{ifname}/statistics/rx_bytes"]).stdout)


def log_tail(tb: Testbed, host: str, name: str, lines: int = 60) -> str:
    return tb.exec(
        host, ["tail", "-n", str(lines), f"/home/spark/.local/state/sparkctl/logs/{name}.log"], check=False
    ).stdout


def write_inventory(tb: Testbed, path: Path, workloads: list[dict[str, Any]], **runtime: Any) -> Path:
    data = yaml.safe_load(tb.inventory_path(workloads=workloads).read_text())
    # the testbed's podman needs --ulimit host and has no /dev/infiniband (as in test_container_mode.py)
    data["runtime"] = {"image": IMAGE, "ulimits": ["host"], "devices": [], **runtime}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def drop_images(tb: Testbed) -> None:
    for host in tb.hosts:
        for image in podman(tb, host, "images", "--format", "{{.Repository}}:{{.Tag}}").split():
            if image.startswith(("localhost/sparkctl-vllm-openai-like", "localhost/sparkctl/")):
                podman(tb, host, "rmi", "-f", image, check=False)


class Cluster:
    def __init__(self, tb: Testbed, tmp: Path) -> None:
        self.tb, self.tmp = tb, tmp
        self.env = cli_env({**os.environ, "SPARKCTL_SUDO_PASSWORD": tb.sudo_password}, tmp / "state")
        tp2 = {**MINI, "tensor_parallel_size": 2, "ready_timeout": 900}  # executor: the default, mp
        self.mp = write_inventory(tb, tmp / "mp.yaml", [tp2])
        self.up: Any = None
        self.moved: dict[str, int] = {}

    def run(self, inventory: Path, *args: str, timeout: float = 1800) -> Any:
        return sparkctl(*args, "-i", str(inventory), env=self.env, timeout=timeout)


@pytest.fixture(scope="module")
def cluster(testbed: Testbed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if not (ARCHIVES / "openai-like.tar").exists():
        pytest.fail(f"{ARCHIVES}/openai-like.tar missing: run tests/prepare.sh (tests/testbed/build_image.sh)")
    testbed.reset_hosts()
    drop_images(testbed)
    podman(testbed, "spark-a", "load", "-q", "-i", str(ARCHIVES / "openai-like.tar"))
    c = Cluster(testbed, tmp_path_factory.mktemp("container-images"))
    yield c
    c.run(c.mp, "down")
    drop_images(testbed)
    testbed.reset_hosts()


def test_only_spark_a_holds_the_image_and_it_has_no_ray(cluster: Cluster) -> None:
    tb = cluster.tb
    assert image_id(tb, "spark-a") and image_id(tb, "spark-b") == ""  # podman prints the ID without "sha256:"
    entry = podman(tb, "spark-a", "image", "inspect", "--format", "{{json .Config.Entrypoint}}", IMAGE)
    assert json.loads(entry) == ["vllm", "serve"]
    probe = tb.exec(
        "spark-a",
        [
            "podman",
            "run",
            "--rm",
            "--network",
            "none",
            "--entrypoint",
            "python3",
            IMAGE,
            "-c",
            "import importlib.util as u; print(u.find_spec('ray'))",
        ],
        timeout=120,
    )
    assert probe.stdout.strip() == "None"


def test_a_driver_too_old_for_the_image_is_refused_before_anything_changes(cluster: Cluster) -> None:
    tb = cluster.tb
    tb.set_driver_version("spark-b", "570.133.20")  # CUDA 12.8: the image asks for cuda>=13.0
    try:
        r = cluster.run(cluster.mp, "up", "--yes", timeout=600)
    finally:
        tb.set_driver_version("spark-b", "580.142")
    assert r.returncode != 0, r.stdout + r.stderr
    assert "image-driver" in r.stderr and "requires CUDA >= 13.0" in r.stderr and "CUDA 12.8" in r.stderr, r.stderr
    assert "570.133.20" in r.stderr and "nothing was changed" in r.stderr, r.stderr
    assert image_id(tb, "spark-b") == ""  # nothing copied
    for host in tb.hosts:
        assert containers(tb, host) == [], host
        assert tb.exec(host, ["test", "-e", "/etc/sparkctl/worker.env"], check=False).returncode != 0, host


def test_up_copies_the_image_over_the_fabric_and_serves_tp2_with_the_mp_executor(cluster: Cluster) -> None:
    tb = cluster.tb
    before = {(h, i): rx_bytes(tb, h, i) for h in tb.hosts for i in (TWIN, MGMT_IFNAME)}
    cluster.up = r = cluster.run(cluster.mp, "up", "--yes")
    after = {(h, i): rx_bytes(tb, h, i) for h in tb.hosts for i in (TWIN, MGMT_IFNAME)}
    cluster.moved = {f"{h}:{i}": after[h, i] - before[h, i] for h, i in before}
    logs = "".join(f"\n--- {h} mini.log\n{log_tail(tb, h, 'mini')}" for h in tb.hosts)
    assert r.returncode == 0, r.stderr[-3000:] + logs
    size = int(podman(tb, "spark-a", "image", "inspect", "--format", "{{.Size}}", IMAGE))
    # the image crossed the twin into spark-b, and not the management network
    assert cluster.moved[f"spark-b:{TWIN}"] > 0.9 * size, cluster.moved
    assert cluster.moved[f"spark-b:{MGMT_IFNAME}"] < 0.05 * size, cluster.moved
    assert image_id(tb, "spark-b") == image_id(tb, "spark-a")
    for host in tb.hosts:  # one vLLM container per Spark, no Ray container, no Ray process
        assert containers(tb, host) == ["sparkctl-mini"], host
        assert podman(tb, host, "inspect", "-f", "{{.ImageName}}", "sparkctl-mini").strip() == IMAGE
        assert "raylet" not in tb.exec(host, ["ps", "-eo", "args"]).stdout, host
    assert "Ray is not started" in r.stdout + r.stderr
    log_b = tb.exec("spark-b", ["cat", "/home/spark/.local/state/sparkctl/logs/mini.log"]).stdout
    assert "headless multiproc executor" in log_b, log_b[-3000:]  # vllm/entrypoints/cli/serve.py


def test_the_endpoint_matches_sentence_transformers_and_a_second_plan_is_empty(cluster: Cluster) -> None:
    assert cluster.up is not None and cluster.up.returncode == 0
    tb = cluster.tb
    key = (cluster.tmp / "state" / "sparkctl" / "testbed" / "api-key-mini").read_text().strip()
    client = openai.OpenAI(base_url=f"http://{tb.mgmt_ip('spark-a')}:{MINI['port']}/v1", api_key=key, timeout=120)
    cos = reference_cosines(client, "mini")
    print(f"container TP=2 (mp) worst cosine {cos.min():.7f}")
    assert cos.min() >= 0.9999, cos
    r = cluster.run(cluster.mp, "plan", "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    assert [s["id"] for s in plan_steps(r.stdout) if s["changes"]] == []
    status = cluster.run(cluster.mp, "status", "--json", timeout=300)
    assert status.returncode == 0, status.stderr
    view = json.loads(status.stdout)
    assert view["workloads"]["mini"]["process"] == "ok", view
    assert view["hosts"]["spark-b"]["ray"] == "not started (no workload needs it)", view
    # the containers share the hosts' network (--network host): the mp rendezvous (29501, every interface), the
    # message queues and gloo answer nobody on the management network, the API does
    assert {h: open_from_laptop(tb, h) for h in tb.hosts} == {"spark-a": {22, MINI["port"]}, "spark-b": {22}}


def test_an_embed_workload_on_the_same_image_gets_ray_through_a_derived_image(cluster: Cluster) -> None:
    tb = cluster.tb
    down = cluster.run(cluster.mp, "down")
    assert down.returncode == 0, down.stderr
    embed = {"name": "embed", "engine": "embed", "tensor_parallel_size": 2, "port": 8100, "ready_timeout": 600}
    inv = write_inventory(tb, cluster.tmp / "embed.yaml", [embed], add_ray="2.60.0", ray_wheels=str(RAY_WHEELS))
    plan = cluster.run(inv, "plan", timeout=300)
    assert plan.returncode == 0, plan.stderr
    assert "--find-links /tmp/sparkctl-ray-wheels 'ray[default]==2.60.0'" in plan.stdout, plan.stdout
    r = cluster.run(inv, "up", "--yes")
    try:
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-6000:]
        derived = "localhost/sparkctl/sparkctl-vllm-openai-like:test-ray2.60.0"
        for host in tb.hosts:
            assert containers(tb, host) == ["sparkctl-ray"], host
            assert podman(tb, host, "inspect", "-f", "{{.ImageName}}", "sparkctl-ray").strip() == derived
            label = podman(tb, host, "image", "inspect", "--format", '{{index .Labels "sparkctl.base"}}', derived)
            assert label.strip() == image_id(tb, host), host  # derived from the image as it is on this host
        key = (cluster.tmp / "state" / "sparkctl" / "testbed" / "api-key-embed").read_text().strip()
        client = openai.OpenAI(base_url=f"http://{tb.mgmt_ip('spark-a')}:8100/v1", api_key=key, timeout=120)
        out = client.embeddings.create(model="embed", input=["two Sparks", "one cable"])
        assert [len(d.embedding) for d in out.data] == [384, 384]
        # Ray in the derived image and the worker's gloo rendezvous: only SSH and the API answer the laptop
        assert {h: open_from_laptop(tb, h) for h in tb.hosts} == {"spark-a": {22, 8100}, "spark-b": {22}}
        again = cluster.run(inv, "plan", "--json", timeout=300)
        assert again.returncode == 0, again.stderr
        assert [s["id"] for s in plan_steps(again.stdout) if s["changes"]] == []
    finally:
        down = cluster.run(inv, "down")
    assert down.returncode == 0, down.stderr
    for host in tb.hosts:
        assert containers(tb, host) == [], host
