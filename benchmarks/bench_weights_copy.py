"""Benchmark on the testbed (not a test): sparkctl's weights copy between two fake Sparks beside a plain copy of the
same files over the same link.

Run as root after tests/prepare.sh:  python3 -m benchmarks.bench_weights_copy [--gb 2] [--files 4] [--rounds 3]

A model of `--files` random files (`--gb` in all, the way checkpoints come in shards) is served by the simulated hub
(tests/testbed/fakehub.py) and fetched once onto spark-a by `sparkctl models sync`. Then, each round:
- sparkctl: spark-b's copy and record removed, `sparkctl models sync` again: the copy stage (rsync through the peer
  key over the twin) and the check stage (sizes and LFS sha256 on spark-b) are timed from the journal;
- the floor: `tar -c | ssh spark-b tar -x` of the same folder from spark-a to spark-b's fabric address, as the same
  user, with the same OpenSSH (defaults: same cipher), into a scratch folder; timed by the clock around it.
The ratio is the copy stage over the floor (goal: within 1.2x). Numbers depend on the machine (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_testbed import cli, phases  # noqa: E402
from tests.testbed import TWINS, Testbed  # noqa: E402
from tests.testbed.fakehub import start_fakehub  # noqa: E402
from tests.testbed.layout import LAPTOP_IP  # noqa: E402

REPO_ID = "bench/big"
HUB = "/home/spark/.cache/huggingface/hub"
FOLDER = "models--bench--big"
STATE = "/home/spark/.local/state/sparkctl"


def as_spark(tb: Testbed, host: str, script: str, timeout: float = 3600) -> str:
    return tb.exec(host, ["sh", "-c", script], user="spark", timeout=timeout).stdout


def make_model(folder: Path, gb: float, files: int) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "bench"}\n')
    each = int(gb * 1e9 / files)
    for i in range(files):
        path = folder / f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        if not path.exists() or path.stat().st_size != each:
            with open(path, "wb") as f:
                left = each
                while left:
                    chunk = os.urandom(min(left, 1 << 24))
                    f.write(chunk)
                    left -= len(chunk)
    return each * files


def floor_copy(tb: Testbed) -> float:
    """tar | ssh | tar of the repository folder, spark-a -> spark-b's fabric address, with a plain key."""
    fabric_b = tb.spec("spark-b").fabric_ip(TWINS[0])
    as_spark(tb, "spark-b", "rm -rf /tmp/floor && mkdir -p /tmp/floor")
    t0 = time.monotonic()
    as_spark(
        tb,
        "spark-a",
        f"tar -C {HUB} -cf - {FOLDER} | ssh -i ~/.ssh/bench-floor -o BatchMode=yes "
        f"-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null spark@{fabric_b} "
        "'tar -C /tmp/floor -xf -'",
    )
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    lock = open("/var/tmp/sparkctl-testbed.lock", "w")  # noqa: SIM115
    fcntl.flock(lock, fcntl.LOCK_EX)
    tb = Testbed()
    tb.down()
    tb.up(hosts=2)
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "gb": args.gb,
        "files": args.files,
        "rounds": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-weights-") as tmp:
        model = Path("/var/tmp/sparkctl-bench-model")
        size = make_model(model, args.gb, args.files)
        hub = start_fakehub({REPO_ID: model}, host=LAPTOP_IP, port=0, log_path=Path(tmp) / "hub.log")
        try:
            env = {
                **os.environ,
                "XDG_STATE_HOME": f"{tmp}/state",
                "PYTHONPATH": str(REPO),
                "SPARKCTL_SUDO_PASSWORD": tb.sudo_password,
            }
            workload = {
                "name": "big",
                "engine": "vllm",
                "model": REPO_ID,
                "tensor_parallel_size": 2,
                "env": {"HF_ENDPOINT": hub.url},
            }
            inventory = tb.inventory_path(workloads=[workload])
            # the download onto spark-a, and a first copy
            cli(env, "models", "sync", "--yes", "--plain", "-i", str(inventory))
            # the floor's own key: spark-a may run anything on spark-b with it (the benchmark's, not sparkctl's)
            as_spark(tb, "spark-a", "rm -f ~/.ssh/bench-floor*; ssh-keygen -q -t ed25519 -N '' -f ~/.ssh/bench-floor")
            pub = as_spark(tb, "spark-a", "cat ~/.ssh/bench-floor.pub").strip()
            as_spark(tb, "spark-b", f"echo {pub!r} >> ~/.ssh/authorized_keys")
            for _ in range(args.rounds):
                as_spark(tb, "spark-b", f"rm -rf {HUB}/{FOLDER} {STATE}/weights; sync")
                tb.exec("spark-b", ["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=False)
                cli(env, "models", "sync", "--yes", "--plain", "-i", str(inventory))
                stages = phases(Path(tmp) / "state")
                tb.exec("spark-a", ["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=False)
                floor = floor_copy(tb)
                results["rounds"].append(
                    {
                        "copy_s": stages.get("weights-copy", 0.0),
                        "check_s": stages.get("weights-check", 0.0),
                        "sync_total_s": stages["total"],
                        "floor_s": round(floor, 2),
                    }
                )
        finally:
            hub.stop()
    tb.down()
    lock.close()
    rounds = results["rounds"]
    copy = statistics.median(r["copy_s"] for r in rounds)
    floor = statistics.median(r["floor_s"] for r in rounds)
    check = statistics.median(r["check_s"] for r in rounds)
    results |= {
        "bytes": size,
        "copy_median_s": copy,
        "floor_median_s": floor,
        "check_median_s": check,
        "ratio_copy_over_floor": round(copy / floor, 3),
    }
    print("| what | median s | GB/s |")
    print("|---|---|---|")
    print(f"| plain `tar \\| ssh \\| tar` (floor) | {floor:.2f} | {size / 1e9 / floor:.2f} |")
    print(f"| sparkctl copy stage (rsync through the peer key) | {copy:.2f} | {size / 1e9 / copy:.2f} |")
    print(f"| sparkctl check stage (sizes, sha256) | {check:.2f} | {size / 1e9 / check:.2f} |")
    print(f"\ncopy / floor = {copy / floor:.2f}x")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
