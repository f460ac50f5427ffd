"""Model weights on every Spark, on the testbed: fetched once from a hub, copied host to host over the fabric,
verified, resumed after an interruption, refused when a disk is too small.

The hub is the one SIMULATED service (tests/testbed/fakehub.py: the part of the Hugging Face Hub HTTP API that
huggingface_hub 2.4.0 uses to download a repository, serving the MiniLM files the runtime ships); it listens on the
laptop's management address and the hosts reach it through HF_ENDPOINT. The download client (the runtime's
huggingface_hub), the copy (rsync over OpenSSH with the cluster's peer key, its receiving side confined by the
target's forced command), the checks and vLLM loading the copied files are real. One bring-up serves the module,
in this order:

- spark-b's cache on a 40 MB tmpfs: `up` is refused before any weight byte moves, naming spark-b and the numbers;
- the twin slowed down (tc tbf on spark-a's side), the copy killed half-way: the next `models sync` resumes it
  (fewer bytes cross the twin than the model holds) and ends verified; the hub saw one download per file;
- `up` of a TP=2 vLLM workload under the mp executor naming the hub id answers like sentence-transformers without
  fetching again; a second `up` moves no weight byte and a second `plan` is empty.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.integration.helpers import REPO, cli_env, plan_steps, sparkctl
from tests.integration.test_vllm_real import MINI, MODEL, reference_cosines
from tests.testbed import TWINS, Testbed
from tests.testbed.fakehub import FakeHub, count_gets, read_log, start_fakehub
from tests.testbed.layout import LAPTOP_IP, MGMT_IFNAME

pytestmark = pytest.mark.testbed

REPO_ID = "sentence-transformers/all-MiniLM-L6-v2"
FOLDER = "models--sentence-transformers--all-MiniLM-L6-v2"
TWIN = TWINS[0].interface
HF = "/home/spark/.cache/huggingface"
STATE = "/home/spark/.local/state/sparkctl"
MANIFEST = f"{STATE}/weights/{FOLDER}@main.json"
WEIGHTS = "model.safetensors"


def rx_bytes(tb: Testbed, host: str, ifname: str) -> int:
    return int(tb.exec(host, ["cat", f"/sys/class/net/{ifname}/statistics/rx_bytes"]).stdout)


def sh(tb: Testbed, host: str, script: str, check: bool = True) -> str:
    return tb.exec(host, ["sh", "-c", script], check=check, timeout=120).stdout


class Cluster:
    def __init__(self, tb: Testbed, tmp: Path, hub: FakeHub) -> None:
        self.tb, self.tmp, self.hub = tb, tmp, hub
        self.env = cli_env({**os.environ, "SPARKCTL_SUDO_PASSWORD": tb.sudo_password}, tmp / "state")
        workload = {
            **MINI,
            "model": REPO_ID,
            "tensor_parallel_size": 2,  # executor: the default, mp
            "env": {"HF_ENDPOINT": hub.url, "VLLM_CPU_KVCACHE_SPACE": "1"},
        }
        self.inventory = tb.inventory_path(workloads=[workload])
        self.size = sum(f.stat().st_size for f in Path(MODEL).rglob("*") if f.is_file())

    def run(self, *args: str, timeout: float = 1800) -> Any:
        return sparkctl(*args, "-i", str(self.inventory), env=self.env, timeout=timeout)

    def gets(self) -> dict[str, int]:
        return count_gets(read_log(self.tmp / "hub.log"), REPO_ID)


@pytest.fixture(scope="module")
def cluster(testbed: Testbed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    testbed.reset_hosts()
    tmp = tmp_path_factory.mktemp("weights")
    hub = start_fakehub({REPO_ID: MODEL}, host=LAPTOP_IP, port=0, log_path=tmp / "hub.log")
    c = Cluster(testbed, tmp, hub)
    yield c
    c.run("down")
    hub.stop()
    for host in testbed.hosts:
        sh(testbed, host, f"tc qdisc del dev {TWIN} root 2>/dev/null; umount {HF} 2>/dev/null; true", check=False)
    testbed.reset_hosts()


def test_a_disk_too_small_is_refused_before_any_weight_moves(cluster: Cluster) -> None:
    tb = cluster.tb
    for host in tb.hosts:  # both caches empty
        assert sh(tb, host, f"ls -A {HF} 2>/dev/null; true").strip() == "", host
    # the mount point made as the login user's own, as the cache directory would be
    sh(
        tb,
        "spark-b",
        f"install -d -o spark -g spark /home/spark/.cache {HF} && mount -t tmpfs -o size=40m tmpfs {HF} "
        f"&& chown spark {HF}",
    )
    try:
        r = cluster.run("up", "--yes", timeout=900)
    finally:
        sh(tb, "spark-b", f"umount {HF}")
    assert r.returncode != 0, r.stdout[-2000:]
    err = r.stdout + r.stderr
    assert "refused: spark-b has less than 1 GiB free" in err and f"{REPO_ID} needs 0.09 GB more" in err, err[-3000:]
    assert cluster.gets() == {}, cluster.gets()  # the hub's file list was read; no file was downloaded
    for host in tb.hosts:
        assert sh(tb, host, f"find {HF} -type f 2>/dev/null | grep -c . || true").strip() == "0", host


def test_an_interrupted_copy_resumes_and_ends_verified(cluster: Cluster) -> None:
    tb = cluster.tb
    # 40 Mbit/s from spark-a's side of the twin: the 91 MB of weights take ~18 s to cross
    sh(tb, "spark-a", f"tc qdisc add dev {TWIN} root tbf rate 40mbit burst 64kb latency 400ms")
    try:
        up = subprocess.Popen(
            [sys.executable, "-m", "sparkctl", "models", "sync", "--yes", "-i", str(cluster.inventory)],
            env=cluster.env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        blobs = f"{HF}/hub/{FOLDER}/blobs"
        deadline = time.monotonic() + 600
        held = 0
        while time.monotonic() < deadline and up.poll() is None:
            # rsync receives into a hidden temporary file beside the final name
            out = sh(tb, "spark-b", f"du -sb {blobs} 2>/dev/null | cut -f1; true").strip()
            held = int(out) if out.isdigit() else 0
            if held > 30_000_000:
                break
            time.sleep(0.5)
        assert held > 30_000_000, (held, up.poll(), up.stdout.read()[-3000:] if up.stdout else "")
        # the copying process dies (as with a lost session or a reboot of the source)
        sh(tb, "spark-a", "pkill -KILL -f '^rsync -a --partial-dir'")
        out, _ = up.communicate(timeout=300)
    finally:
        sh(tb, "spark-a", f"tc qdisc del dev {TWIN} root")
    assert up.returncode != 0, out[-2000:]
    assert sh(tb, "spark-a", f"test -f {MANIFEST} && echo yes").strip() == "yes"  # fetched and verified there
    assert sh(tb, "spark-b", f"test -f {MANIFEST} && echo yes; true").strip() == ""  # not on spark-b
    # the receiving rsync, cut off, keeps what arrived aside (--partial-dir), never under the blob's own name
    kept = 0
    for _ in range(40):
        out = sh(tb, "spark-b", f"du -sb {blobs}/.rsync-partial 2>/dev/null | cut -f1; true").strip()
        kept = int(out) if out.isdigit() else 0
        if kept:
            break
        time.sleep(0.5)
    assert kept > 20_000_000, kept
    big = json.loads(sh(tb, "spark-a", f"cat {MANIFEST}"))
    blob = next(f["blob"] for f in big["files"] if f["path"] == WEIGHTS)
    assert sh(tb, "spark-b", f"test -e {blobs}/{blob} && echo yes; true").strip() == ""

    before = rx_bytes(tb, "spark-b", TWIN)
    r = cluster.run("models", "sync", "--yes", timeout=900)
    moved = rx_bytes(tb, "spark-b", TWIN) - before
    assert r.returncode == 0, r.stderr[-3000:]
    assert moved < cluster.size - kept + 5_000_000, (moved, cluster.size, kept)  # resumed, not started over
    manifest = json.loads(sh(tb, "spark-b", f"cat {MANIFEST}"))
    assert manifest == json.loads(sh(tb, "spark-a", f"cat {MANIFEST}"))
    assert {f["path"] for f in manifest["files"]} >= {WEIGHTS, "config.json", "tokenizer.json"}
    weights = next(f for f in manifest["files"] if f["path"] == WEIGHTS)
    snapshot = f"{HF}/hub/{FOLDER}/snapshots/{manifest['commit']}"
    digest = sh(tb, "spark-b", f"sha256sum {snapshot}/{WEIGHTS}").split()[0]
    assert digest == weights["sha256"] and len(digest) == 64  # the hub's LFS sha256
    assert sh(tb, "spark-b", f"ls -A {HF}/hub/{FOLDER}/blobs/.rsync-partial 2>/dev/null; true").strip() == ""
    assert set(cluster.gets().values()) == {1}, cluster.gets()  # one download of each file, on spark-a only


def test_up_serves_the_copied_weights_and_a_second_up_moves_nothing(cluster: Cluster) -> None:
    tb = cluster.tb
    gets = cluster.gets()
    r = cluster.run("up", "--yes")
    assert r.returncode == 0, r.stderr[-3000:]
    assert cluster.gets() == gets  # vLLM read the cache (HF_HUB_OFFLINE=1): no download
    key = (cluster.tmp / "state" / "sparkctl" / "testbed" / "api-key-mini").read_text().strip()
    client = openai.OpenAI(base_url=f"http://{tb.mgmt_ip('spark-a')}:{MINI['port']}/v1", api_key=key, timeout=120)
    cos = reference_cosines(client, "mini")
    assert cos.min() >= 0.9999, cos
    log_b = sh(tb, "spark-b", f"cat {STATE}/logs/mini.log")
    assert "headless multiproc executor" in log_b, log_b[-3000:]  # rank 1 loaded spark-b's copy

    before = {h: (rx_bytes(tb, h, TWIN), rx_bytes(tb, h, MGMT_IFNAME)) for h in tb.hosts}
    again = cluster.run("up", "--yes")
    assert again.returncode == 0, again.stderr[-3000:]
    for h in tb.hosts:
        twin = rx_bytes(tb, h, TWIN) - before[h][0]
        mgmt = rx_bytes(tb, h, MGMT_IFNAME) - before[h][1]
        assert twin < 2_000_000 and mgmt < 2_000_000, (h, twin, mgmt)  # no weights moved, either way
    plan = cluster.run("plan", "--json", timeout=300)
    assert plan.returncode == 0, plan.stderr
    assert [s["id"] for s in plan_steps(plan.stdout) if s["changes"]] == []
    assert cluster.gets() == gets
