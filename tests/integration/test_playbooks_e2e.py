"""The bundled playbooks on the testbed: the hosts' real state after each run, failures, journal, --from."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import EMBED, REPO
from tests.testbed import TWINS, Testbed

pytestmark = pytest.mark.testbed

PLAYBOOKS = REPO / "playbooks"
HOSTS = ["spark-a", "spark-b"]


def sparkctl(env: dict[str, str], *args: str, timeout: float = 420) -> subprocess.CompletedProcess[str]:
    """The CLI as an operator runs it, in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "sparkctl", *args],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ok(result: subprocess.CompletedProcess[str], code: int = 0) -> subprocess.CompletedProcess[str]:
    assert result.returncode == code, (
        f"exit {result.returncode} (wanted {code})\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    )
    return result


@pytest.fixture
def env(sudo_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """sudo password of the hosts + a laptop state dir (keys, token, journal) of this test only."""
    return {**sudo_env, "XDG_STATE_HOME": str(tmp_path / "state"), "PYTHONPATH": str(REPO)}


def journal(env: dict[str, str]) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = json.loads(ok(sparkctl(env, "history", "--json")).stdout)
    return runs


def run_record(env: dict[str, str], run_id: str) -> dict[str, Any]:
    record: dict[str, Any] = json.loads(ok(sparkctl(env, "history", "show", run_id, "--json")).stdout)
    return record


def sets_args(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def twin_state(tb: Testbed, host: str, ifname: str) -> tuple[list[str], int]:
    """IPv4 addresses (with prefix) and MTU of an interface, from `ip -j addr` inside the host."""
    (link,) = json.loads(tb.exec(host, ["ip", "-j", "addr", "show", "dev", ifname]).stdout)
    addrs = [f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", []) if a.get("family") == "inet"]
    return addrs, int(link["mtu"])


def worker_cmdlines(tb: Testbed, host: str) -> list[str]:
    """Command lines of the embedding worker's main process on a host."""
    return [p for p in tb.processes(host) if "embed_worker.py" in p and " -c " not in p and "sh -c" not in p]


def leftovers(tb: Testbed, host: str) -> list[str]:
    """Ray or worker processes of the login user still running on a host."""
    markers = ("raylet", "gcs_server", "ray::", "embed_worker.py", "vllm serve", "default_worker.py")
    return [p for p in tb.processes(host) if any(m in p for m in markers)]


def embeddings(tb: Testbed, env: dict[str, str]) -> list[list[float]]:
    """Ask the embed endpoint on the head with the key sparkctl generated on the laptop."""
    from openai import OpenAI

    key = (Path(env["XDG_STATE_HOME"]) / "sparkctl" / "testbed" / "api-key-embed").read_text().strip()
    client = OpenAI(
        base_url=f"http://{tb.mgmt_ip('spark-a')}:{EMBED['port']}/v1", api_key=key, timeout=30, max_retries=0
    )
    result = client.embeddings.create(model="embed", input=["a pair of Sparks", "one cluster"])
    return [d.embedding for d in result.data]


def test_bringup_swap_model_teardown(fresh_testbed: Testbed, env: dict[str, str]) -> None:
    tb = fresh_testbed
    inv = str(tb.inventory_path(workloads=[EMBED]))

    # --- bringup: the fabric configured on both hosts, the workload answering ---------------------------
    ok(sparkctl(env, "run", str(PLAYBOOKS / "bringup.yaml"), "-i", inv, "--yes"))
    for host in HOSTS:
        spec = tb.spec(host)
        for twin in TWINS:
            addrs, mtu = twin_state(tb, host, twin.interface)
            assert addrs == [spec.fabric_cidr(twin)], (host, twin.interface, addrs)
            assert mtu == 9000, (host, twin.interface, mtu)
    vectors = embeddings(tb, env)
    assert len(vectors) == 2 and len(vectors[0]) == 384
    (before,) = worker_cmdlines(tb, "spark-a")
    assert "--tp 2 --replicas 1" in before, before

    # --- fabric-check on the configured pair: doctor, jumbo pings both ways, a short TCP stream per link ---
    result = ok(sparkctl(env, "run", str(PLAYBOOKS / "fabric-check.yaml"), "-i", inv, "--yes", "--set", "mb=16"))
    last = journal(env)[-1]
    assert last["runbook"] == "fabric-check" and last["ok"] is True, result.stdout
    steps = run_record(env, str(last["id"]))["steps"]
    assert isinstance(steps, list)
    sent = [s for s in steps if s["kind"] == "bench_send"]
    assert len(sent) == len(TWINS) and all(s["status"] == "ok" for s in sent)
    assert all(s["commands"][0]["stdout"].split()[0] == str(16 << 20) for s in sent), sent

    # --- swap-model: TP=2 x 1 replica -> TP=1 x 2 replicas, same endpoint and key --------------------------
    raylet = [p for p in tb.processes("spark-a") if "raylet" in p]
    assert raylet
    sets = ["workload=embed", "model=all-MiniLM-L6-v2", "tensor_parallel_size=1", "replicas=2"]
    ok(sparkctl(env, "run", str(PLAYBOOKS / "swap-model.yaml"), "-i", inv, "--yes", *sets_args(sets)))
    (after,) = worker_cmdlines(tb, "spark-a")
    assert "--tp 1 --replicas 2" in after, after
    assert after.split()[0] != before.split()[0], "the worker was not restarted"
    vectors = embeddings(tb, env)
    assert len(vectors) == 2 and len(vectors[0]) == 384
    # Ray was left alone: the head's raylet is the same process as before the swap.
    assert [p for p in tb.processes("spark-a") if "raylet" in p] == raylet

    # --- teardown: nothing of Ray or the worker left on either host; the fabric stays -------------------
    assert all(leftovers(tb, host) for host in HOSTS), "Ray should be running on both hosts before teardown"
    ok(sparkctl(env, "run", str(PLAYBOOKS / "teardown.yaml"), "-i", inv, "--yes"))
    for host in HOSTS:
        assert leftovers(tb, host) == [], (host, leftovers(tb, host))
        assert twin_state(tb, host, TWINS[0].interface)[1] == 9000

    runs = journal(env)
    assert [(r["runbook"], r["ok"]) for r in runs] == [
        ("bringup", True),
        ("fabric-check", True),
        ("swap-model", True),
        ("teardown", True),
    ]


FAILING = """\
name: stops-on-failure
description: a step that fails, between two that leave a marker on the host.
parameters:
  marker: {default: /tmp/unset}
steps:
  - name: first
    action: shell
    shell: true
    hosts: head
    args: {argv: [touch, "${marker}-first"]}
  - name: broken
    action: shell
    shell: true
    hosts: head
    args: {argv: ["false"]}
    on_failure: stop
  - name: after
    action: shell
    shell: true
    args: {argv: [touch, "${marker}-after"]}
"""


def exists(tb: Testbed, host: str, path: str) -> bool:
    return tb.exec(host, ["test", "-e", path], check=False).returncode == 0


def test_failing_step_stops_the_run_and_from_resumes(testbed: Testbed, env: dict[str, str], tmp_path: Path) -> None:
    tb = testbed
    inv = str(tb.inventory_path())
    book = tmp_path / "stops.yaml"
    book.write_text(textwrap.dedent(FAILING))
    marker = f"/tmp/sparkctl-e2e-{uuid.uuid4().hex[:8]}"
    first, after = f"{marker}-first", f"{marker}-after"
    try:
        result = ok(sparkctl(env, "run", str(book), "-i", inv, "--yes", "--set", f"marker={marker}"), code=1)
        assert "broken" in result.stdout + result.stderr
        assert exists(tb, "spark-a", first)
        assert not any(exists(tb, h, after) for h in HOSTS), "a step after the failed one ran"

        (run,) = journal(env)
        assert run["runbook"] == "stops-on-failure" and run["ok"] is False
        record = run_record(env, str(run["id"]))
        assert record["params"] == {"marker": marker}
        status = {(s["host"], s["stage"]): s for s in record["steps"]}
        assert status[("spark-a", "first")]["status"] == "changed"
        assert status[("spark-a", "broken")]["status"] == "failed"
        assert "exited 1" in status[("spark-a", "broken")]["error"]
        assert [c["exit_code"] for c in status[("spark-a", "broken")]["commands"]] == [1]
        assert not [k for k in status if k[1] == "after"]

        # --from resumes at the named step: the earlier ones (and the broken one) are not run again.
        tb.exec("spark-a", ["rm", "-f", first])
        ok(sparkctl(env, "run", str(book), "-i", inv, "--yes", "--set", f"marker={marker}", "--from", "after"))
        assert all(exists(tb, h, after) for h in HOSTS)
        assert not exists(tb, "spark-a", first), "--from re-ran an earlier step"
        runs = journal(env)
        assert [r["ok"] for r in runs] == [False, True]
        resumed = run_record(env, str(runs[-1]["id"]))
        assert {s["stage"] for s in resumed["steps"]} == {"after"}
    finally:
        for host in HOSTS:
            tb.exec(host, ["rm", "-f", first, after], check=False)
