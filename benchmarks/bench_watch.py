"""Benchmark (not a test): what one `status --watch` refresh costs on the testbed, beside a fresh `status`.

Run as root after tests/prepare.sh:
    python3 -m benchmarks.bench_watch [--rounds 10]

It waits for the machine-wide testbed lock, brings up its own testbed, runs `sparkctl up` with the built-in embed
worker (TP=2), then measures in this process, over one session opened once (real OpenSSH through the session's
connect seam): the wall time of each refresh (`Watch.sample`: the light probe on both hosts in parallel, then the
workload's /health and /metrics), and the wall time of `sparkctl status` run as a command (connect, full fact
probe, HTTP readiness probe). It takes the testbed down at the end and prints the medians as JSON.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.testbed import Testbed  # noqa: E402

EMBED = {"name": "embed", "engine": "embed", "model": "all-MiniLM-L6-v2", "tensor_parallel_size": 2, "port": 8100}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    lock = open("/var/tmp/sparkctl-testbed.lock", "w")  # noqa: SIM115 - held until the process ends
    fcntl.flock(lock, fcntl.LOCK_EX)
    tb = Testbed()
    tb.down()
    try:
        tb.up(hosts=2)
        state = Path(tempfile.mkdtemp(prefix="bench-watch-"))
        os.environ["XDG_STATE_HOME"] = str(state)
        env = {**os.environ, "PYTHONPATH": str(REPO), "SPARKCTL_SUDO_PASSWORD": tb.sudo_password}
        inv_path = tb.inventory_path(workloads=[EMBED])
        cli = [sys.executable, "-m", "sparkctl"]
        up = subprocess.run([*cli, "up", "--yes", "-i", str(inv_path)], env=env, cwd=REPO, capture_output=True,
                            text=True, check=False)  # fmt: skip
        if up.returncode != 0:
            raise SystemExit(up.stdout + up.stderr)

        from sparkctl.inventory import load_inventory
        from sparkctl.session.session import open_session
        from sparkctl.session.watch import Watch

        t0 = time.perf_counter()
        session = open_session(load_inventory(inv_path), False)
        opened = time.perf_counter() - t0
        watch = Watch(session, session.secrets_for_plan())
        refreshes = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            watch.sample()
            refreshes.append(time.perf_counter() - t0)
        session.close()
        statuses = []
        for _ in range(max(3, args.rounds // 2)):
            t0 = time.perf_counter()
            subprocess.run([*cli, "status", "-i", str(inv_path)], env=env, cwd=REPO, capture_output=True, check=True)
            statuses.append(time.perf_counter() - t0)
        subprocess.run([*cli, "down", "-i", str(inv_path)], env=env, cwd=REPO, capture_output=True, check=False)
        print(
            json.dumps(
                {
                    "session_open_s": round(opened, 3),
                    "refresh_median_s": round(statistics.median(refreshes), 3),
                    "refresh_max_s": round(max(refreshes), 3),
                    "status_command_median_s": round(statistics.median(statuses), 3),
                    "rounds": args.rounds,
                },
                indent=2,
            )
        )
    finally:
        tb.down()


if __name__ == "__main__":
    main()
