"""`sparkctl up`/`down` of a TP=2 vllm workload on the testbed, against the SIMULATED vllm (tests/testbed/sim/vllm).

The hosts have no GPU and vLLM's CPU build has no Ray executor, so for ranks on two Sparks this module lays the
testbed's stand-in over /opt/sparkctl-runtime/bin/vllm (Testbed.use_vllm("simulated")): it parses argv with the
installed vLLM's own parser, runs vLLM's own Ray placement (initialize_ray_cluster) as on a node with one GPU,
places one Ray actor per rank that applies the driver's environment as vLLM's executor does, serves the OpenAI API,
and records all of it in ~/.local/state/sparkctl/vllm-sim/<served name>.json on the head. What vLLM does at one
rank is tested against vLLM itself in test_vllm_real.py.
"""

from __future__ import annotations

import json
import os
import pwd
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.integration.helpers import open_from_laptop
from tests.testbed import LOGIN_USER, TWINS, Testbed

pytestmark = pytest.mark.testbed

REPO = Path(__file__).resolve().parents[2]
HOSTS = ("spark-a", "spark-b")
HEAD = "spark-a"
VENV = "/opt/sparkctl-runtime"
CHAT: dict[str, Any] = {
    "name": "chat",
    "engine": "vllm",
    "model": "Qwen/Qwen3-0.6B",
    "tensor_parallel_size": 2,
    "executor": "ray",  # vLLM's Ray executor (the default is mp), simulated
    "sync_weights": False,  # the simulated vLLM reads no weights, and the testbed reaches no hub
    "port": 8000,
    "ready_timeout": 300,  # the simulation imports vLLM's parser: about 10 s of CPU, more on a busy machine
}
# A vllm or Ray process of the login user; pgrep never matches its own command line.
LEFTOVER = "vllm|ray"


def _home() -> str:
    return pwd.getpwnam(LOGIN_USER).pw_dir


def record_path(name: str) -> str:
    return f"{_home()}/.local/state/sparkctl/vllm-sim/{name}.json"


def sparkctl(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """The real CLI in a subprocess, as a person would run it."""
    return subprocess.run(
        [sys.executable, "-m", "sparkctl", *args],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def output(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


def read_record(tb: Testbed, name: str = "chat") -> dict[str, Any]:
    data: dict[str, Any] = json.loads(tb.exec(HEAD, ["cat", record_path(name)]).stdout)
    return data


def leftovers(tb: Testbed, host: str, pattern: str = LEFTOVER, grace: float = 10) -> str:
    """Command lines of the login user's processes matching `pattern` still there after `grace` s ('' if none).

    The grace is for processes already on their way out: Ray's dashboard forkserver exits by itself about
    0.5 s after `ray stop` killed its parent.
    """
    deadline = time.monotonic() + grace
    while True:
        r = tb.exec(host, ["pgrep", "-u", LOGIN_USER, "-f", "-a", "--", pattern], user=LOGIN_USER, check=False)
        assert r.returncode in (0, 1), r.stderr
        if not r.stdout.strip() or time.monotonic() > deadline:
            return r.stdout.strip()
        time.sleep(0.5)


def env_file(tb: Testbed, host: str) -> dict[str, str]:
    text = tb.exec(host, ["cat", "/etc/sparkctl/worker.env"]).stdout
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))


def flags(argv: list[str]) -> dict[str, str]:
    """`vllm serve MODEL --flag value ...` -> {flag: value}; every flag sparkctl passes takes a value."""
    rest = argv[3:]
    assert len(rest) % 2 == 0 and all(a.startswith("--") for a in rest[::2]), argv
    pairs = dict(zip(rest[::2], rest[1::2], strict=True))
    assert len(pairs) == len(rest) // 2, f"a flag is repeated: {argv}"
    return pairs


def http_status(url: str, key: str | None = None) -> int:
    req = urllib.request.Request(url)
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture(scope="module", autouse=True)
def simulated_vllm(testbed: Testbed) -> Iterator[None]:
    """The SIMULATED vllm over the runtime venv's bin/ for this module (a GPU path); vLLM itself afterwards."""
    testbed.use_vllm("simulated")
    yield
    testbed.use_vllm("real")


@pytest.fixture
def cli_env(sudo_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """sparkctl's environment: the sudo password, and a private laptop state dir (keys, journal)."""
    return {**sudo_env, "XDG_STATE_HOME": str(tmp_path / "state")}


@pytest.fixture(scope="module")
def chat_up(testbed: Testbed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Fresh hosts, then `sparkctl up` of the chat workload once for the tests of the running pair."""
    testbed.reset_hosts()
    state = tmp_path_factory.mktemp("laptop-state")
    env = {**os.environ, "SPARKCTL_SUDO_PASSWORD": testbed.sudo_password, "XDG_STATE_HOME": str(state)}
    inventory = testbed.inventory_path(workloads=[CHAT])
    result = sparkctl(env, "up", "-i", str(inventory), "--yes")
    yield {
        "env": env,
        "inventory": inventory,
        "up": result,
        "key_file": state / "sparkctl" / "testbed" / "api-key-chat",
    }
    sparkctl(env, "down", "-i", str(inventory))


def test_up_launches_vllm_as_built_and_serves(testbed: Testbed, chat_up: dict[str, Any]) -> None:
    up = chat_up["up"]
    assert up.returncode == 0, output(up)

    rec = read_record(testbed)
    assert rec["simulated"] is True
    assert rec["state"] == "serving", rec
    argv = rec["argv"]
    assert argv[:3] == [f"{VENV}/bin/vllm", "serve", CHAT["model"]], argv
    assert flags(argv) == {
        "--served-model-name": "chat",
        "--tensor-parallel-size": "2",
        "--distributed-executor-backend": "ray",
        "--gpu-memory-utilization": "0.85",
        "--host": testbed.mgmt_ip(HEAD),
        "--port": "8000",
    }

    env, wanted = rec["env"], env_file(testbed, HEAD)
    assert env["NCCL_IB_GID_INDEX"] == wanted["NCCL_IB_GID_INDEX"] == str(testbed.spec(HEAD).gid_index)
    assert env["GLOO_SOCKET_IFNAME"] == wanted["GLOO_SOCKET_IFNAME"] == TWINS[0].interface
    assert env["RAY_AUTH_MODE"] == "token"
    assert rec["api_key_set"] is True and "VLLM_API_KEY" in rec["secrets_set"]

    # vLLM's own placement (RayExecutorV2, the default of vLLM 0.32.0): one {"GPU": 1} bundle per rank, PACK, no
    # pin; the ranks land one per Spark because each Ray node has one GPU, driver node first.
    ex = rec["executor"]
    fabric = {h: testbed.spec(h).fabric_ip(TWINS[0]) for h in HOSTS}
    assert (ex["backend"], ex["class"], ex["strategy"]) == ("ray", "RayExecutorV2", "PACK"), ex
    assert ex["bundles"] == [{"GPU": 1.0}, {"GPU": 1.0}], ex
    assert sorted(ex["bundle_nodes"]) == sorted(fabric.values()), ex
    assert [r["node_ip"] for r in ex["ranks"]] == [fabric["spark-a"], fabric["spark-b"]], ex["ranks"]
    # Each rank keeps its own host's per-host variables (the setdefault of RayWorkerProc.initialize_worker).
    for rank, host in zip(ex["ranks"], HOSTS, strict=True):
        own = env_file(testbed, host)
        for name in ("VLLM_HOST_IP", "NCCL_IB_GID_INDEX", "GLOO_SOCKET_IFNAME"):
            assert rank["env"][name] == own[name], (host, name, rank)
    # vLLM read sparkctl's non-carry-over list where it reads it: $XDG_CONFIG_HOME/vllm, i.e. ~/.config/vllm.
    listed = json.loads(testbed.exec(HEAD, ["cat", f"{_home()}/.config/vllm/ray_non_carry_over_env_vars.json"]).stdout)
    assert ex["non_carry_over"] == {
        "file": f"{_home()}/.config/vllm/ray_non_carry_over_env_vars.json",
        "vars": sorted(listed),
    }

    key = chat_up["key_file"].read_text().strip()
    assert key
    assert key not in json.dumps(rec)
    assert not any(key in line for line in testbed.processes(HEAD)), "the API key is on a command line"

    base = f"http://{testbed.mgmt_ip(HEAD)}:{CHAT['port']}/v1"
    client = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=15)
    answer = client.completions.create(model="chat", prompt="Say one word.", max_tokens=1)
    assert answer.choices[0].text.strip()
    assert answer.usage is not None and answer.usage.completion_tokens == 1
    assert [m.id for m in client.models.list().data] == ["chat"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base, api_key="sk-wrong", max_retries=0, timeout=15).models.list()
    assert http_status(f"{base}/models") == 401

    status = sparkctl(chat_up["env"], "status", "-i", str(chat_up["inventory"]), "--json", timeout=120)
    assert status.returncode == 0, output(status)
    chat = json.loads(status.stdout)["workloads"]["chat"]
    assert (chat["process"], chat["health"]) == ("ok", "ready"), chat

    # the Ray executor's ranks are Ray actors (worker port range) next to Ray's own listeners: from the laptop only
    # SSH, and the API on the head, answer
    for host in HOSTS:
        assert open_from_laptop(testbed, host) == ({22, CHAT["port"]} if host == HEAD else {22}), host


def test_down_stops_vllm_and_ray(testbed: Testbed, chat_up: dict[str, Any]) -> None:
    assert chat_up["up"].returncode == 0, output(chat_up["up"])
    down = sparkctl(chat_up["env"], "down", "-i", str(chat_up["inventory"]))
    assert down.returncode == 0, output(down)

    for host in HOSTS:
        assert leftovers(testbed, host) == "", f"{host} still runs vllm/Ray"
    # SIGTERM reached vllm itself, which released its placement group and exited 0.
    assert read_record(testbed)["state"] == "stopped"
    assert testbed.exec(HEAD, ["ss", "-Htln", f"sport = :{CHAT['port']}"]).stdout.strip() == ""
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((testbed.mgmt_ip(HEAD), CHAT["port"]), timeout=5).close()


def test_crashing_worker_fails_up_with_its_log_and_is_cleaned_up(
    fresh_testbed: Testbed, cli_env: dict[str, str]
) -> None:
    workload = {**CHAT, "env": {"SPARKCTL_SIM_CRASH_AFTER": "1"}, "ready_timeout": 180}
    inventory = fresh_testbed.inventory_path(workloads=[workload])

    up = sparkctl(cli_env, "up", "-i", str(inventory), "--yes")
    assert up.returncode == 1, output(up)
    text = up.stdout + up.stderr
    assert "SIMULATED worker crash" in text, output(up)  # the tail of the worker's log
    assert read_record(fresh_testbed)["state"] == "crashed"
    assert leftovers(fresh_testbed, HEAD, "[v]llm") == ""

    down = sparkctl(cli_env, "down", "-i", str(inventory))
    assert down.returncode == 0, output(down)
    for host in HOSTS:
        assert leftovers(fresh_testbed, host) == "", f"{host} still runs vllm/Ray"


def test_engine_argument_vllm_refuses_fails_up_with_the_parser_error(
    fresh_testbed: Testbed, cli_env: dict[str, str]
) -> None:
    workload = {**CHAT, "extra_args": ["--no-such-flag"], "ready_timeout": 180}
    inventory = fresh_testbed.inventory_path(workloads=[workload])

    up = sparkctl(cli_env, "up", "-i", str(inventory), "--yes")
    assert up.returncode == 1, output(up)
    assert "error: unrecognized arguments: --no-such-flag" in up.stdout + up.stderr, output(up)
    rec = read_record(fresh_testbed)
    assert rec["state"] == "refused" and rec["argv"][-1] == "--no-such-flag", rec
    assert leftovers(fresh_testbed, HEAD, "[v]llm") == ""


def test_v1_ray_executor_pins_rank_0_to_vllm_host_ip_and_keeps_listed_vars_per_host(
    gid_index_mismatch: Testbed, cli_env: dict[str, str]
) -> None:
    # vLLM 0.32.0's RayDistributedExecutor (VLLM_USE_RAY_V2_EXECUTOR_BACKEND=0, and the only Ray executor of older
    # releases) pins the first bundle to node:<VLLM_HOST_IP> and overwrites each rank's variables with the head's,
    # except those on the non-carry-over list: spark-b's rank keeps its own GID index (5, the head's is 3).
    tb = gid_index_mismatch
    workload = {**CHAT, "env": {"VLLM_USE_RAY_V2_EXECUTOR_BACKEND": "0"}}
    inventory = tb.inventory_path(workloads=[workload])
    up = sparkctl(cli_env, "up", "-i", str(inventory), "--yes")
    try:
        assert up.returncode == 0, output(up)
        ex = read_record(tb)["executor"]
        head_ip = tb.spec(HEAD).fabric_ip(TWINS[0])
        assert ex["class"] == "RayDistributedExecutor" and ex["strategy"] == "PACK", ex
        assert ex["bundles"] == [{"GPU": 1.0, f"node:{head_ip}": 0.001}, {"GPU": 1.0}], ex
        assert ex["bundle_nodes"][0] == head_ip
        rank_b = ex["ranks"][1]
        assert rank_b["node_ip"] == tb.spec("spark-b").fabric_ip(TWINS[0])
        assert "NCCL_IB_GID_INDEX" in ex["non_carry_over"]["vars"]
        assert rank_b["env"]["NCCL_IB_GID_INDEX"] == env_file(tb, "spark-b")["NCCL_IB_GID_INDEX"] == "5"
        assert ex["ranks"][0]["env"]["NCCL_IB_GID_INDEX"] == "3"
    finally:
        down = sparkctl(cli_env, "down", "-i", str(inventory))
    assert down.returncode == 0, output(down)
