"""Benchmark (not a test): a converged `plan` and a converged `up` (no workloads) on 2, 4 and 8 fake Sparks.

Run as root after tests/prepare.sh:
    python3 -m benchmarks.bench_scaling [--runs 5] [--sizes 2,4,8] [--baseline DIR]

For each size it waits for the machine-wide testbed lock, brings up that many fake Sparks (2: a direct pair,
more: a switch), converges them with `sparkctl up --yes` (fabric, env, firewall, token, Ray with every node), checks
that a plan then changes nothing, and measures, round by round: the floor (one plain `ssh host true` per host, all
in parallel), `sparkctl plan` and `sparkctl up --yes` with nothing to change (wall time, and the CPU this process's
children spent: sparkctl itself, not the hosts' sshd). `--baseline DIR` runs `plan` and `up` from another source tree
too (e.g. `git archive <rev> sparkctl | tar -x -C DIR`), in the same rounds, so before and after share the load.
It takes each testbed down before the next size, prints a Markdown table (each size against 2 hosts) and JSON.

The hosts are network namespaces on this machine: their sshd, NetworkManager and Ray share its cores with
sparkctl, so the figures include the hosts' own work, serialised on few cores (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import compileall
import fcntl
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_converged import Sample, measured, median, parallel_ssh, run_checked, sparkctl  # noqa: E402
from tests.testbed import Testbed  # noqa: E402


def measure_size(hosts: int, runs: int, baseline: Path | None = None) -> dict[str, Any]:
    py = sys.executable
    tb = Testbed()
    tb.down()
    t0 = time.monotonic()
    tb.up(hosts=hosts)
    bring_up = time.monotonic() - t0
    state = Path(tempfile.mkdtemp(prefix="sparkctl-bench-scaling-"))
    env = {
        **os.environ,
        "XDG_STATE_HOME": str(state),
        "SPARKCTL_SUDO_PASSWORD": tb.sudo_password,
        "PYTHONPATH": str(REPO),
    }
    inv = tb.inventory_path()
    samples: dict[str, list[Sample]] = {}
    try:
        first = measured(lambda: run_checked([py, "-m", "sparkctl", "up", "--yes", "-i", str(inv)], env=env,
                                             cwd=str(REPO)))  # fmt: skip
        out = subprocess.run([py, "-m", "sparkctl", "plan", "--json", "-i", str(inv)], env=env, cwd=str(REPO),
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        changes = sum(1 for st in json.loads(out)["stages"] for s in st["steps"] if s["changes"])
        if changes:
            raise SystemExit(f"{hosts} hosts: not converged after up ({changes} planned changes)")
        trees = {"": REPO} | ({"baseline: ": baseline} if baseline else {})
        for _ in range(runs):
            samples.setdefault("floor: ssh host true", []).append(measured(lambda: parallel_ssh(tb, "true")))
            for label, tree in trees.items():
                tree_env = {**env, "PYTHONPATH": str(tree)}
                samples.setdefault(f"{label}sparkctl plan", []).append(sparkctl(py, ["plan", "-i", str(inv)], tree_env))
                samples.setdefault(f"{label}sparkctl up (converged)", []).append(
                    sparkctl(py, ["up", "--yes", "-i", str(inv)], tree_env)
                )
    finally:
        with_down = time.monotonic()
        tb.down()
        down = time.monotonic() - with_down
    return {
        "hosts": hosts,
        "topology": "direct" if hosts == 2 else "switch",
        "testbed_up_seconds": round(bring_up, 1),
        "first_up_seconds": round(first[0], 1),
        "testbed_down_seconds": round(down, 1),
        "rows": {k: median(v) for k, v in samples.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--sizes", default="2,4,8", help="comma-separated host counts (default 2,4,8)")
    ap.add_argument("--baseline", type=Path, help="another sparkctl source tree, measured in the same rounds")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    baseline = args.baseline.resolve() if args.baseline else None
    for tree in [REPO, *([baseline] if baseline else [])]:
        compileall.compile_dir(str(tree / "sparkctl"), quiet=1)
    lock = open("/var/tmp/sparkctl-testbed.lock", "w")  # noqa: SIM115
    t_wait = time.monotonic()
    fcntl.flock(lock, fcntl.LOCK_EX)
    waited = time.monotonic() - t_wait
    t_hold = time.monotonic()
    try:
        results = [measure_size(n, args.runs, baseline) for n in sizes]
    finally:
        lock.close()
    held = time.monotonic() - t_hold
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_at_end": load,
        },
        "runs": args.runs,
        "lock_wait_seconds": round(waited, 1),
        "lock_held_seconds": round(held, 1),
        "sizes": results,
    }
    base = {k: v["wall"] for k, v in results[0]["rows"].items()}
    print(f"| hosts | row (median of {args.runs}) | wall s | x {sizes[0]} hosts | min-max s | CPU s (sparkctl) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        for k, v in r["rows"].items():
            ratio = v["wall"] / base[k] if base.get(k) else float("nan")
            print(
                f"| {r['hosts']} | {k} | {v['wall']:.2f} | {ratio:.2f} | {v['wall_min']:.2f}-{v['wall_max']:.2f} "
                f"| {v['cpu']:.2f} |"
            )
    print()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
