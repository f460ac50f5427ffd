"""Benchmark (not a test): a converged `plan`, `status` and no-op `up` beside the plain-SSH floor, on the testbed.

Run as root after tests/prepare.sh:
    python3 -m benchmarks.bench_converged [--runs 7] [--hosts 2] [--baseline DIR]

It waits for the machine-wide testbed lock, brings up its own testbed, converges it with `sparkctl up` (no
workloads: fabric, env, firewall, token, Ray), then measures, interleaved round by round so that load on the machine
hits every row alike:
- the floor: one plain OpenSSH `ssh host true` per host, all hosts in parallel, with the testbed's key and
  known_hosts (no ControlMaster), and the same with the fact probe as the command (`ssh host sh -s < probe`);
- `sparkctl plan`, `sparkctl status` and `sparkctl up --yes` (nothing to change), wall time and the CPU this machine
  spent (user + system of the sparkctl process; the SSH server side runs in the hosts' namespaces and is not counted).
`--baseline DIR` runs the same commands from another source tree too (e.g. `git archive <rev> | tar -x -C DIR`), so
before and after are measured in the same run. It also times `sparkctl --help` and `sparkctl plan --offline`
against `python -c pass`. It takes the testbed down at the end and prints a Markdown table plus JSON.
"""

from __future__ import annotations

import argparse
import compileall
import fcntl
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.testbed import Testbed  # noqa: E402
from tests.testbed.layout import LOGIN_USER  # noqa: E402

Sample = tuple[float, float]  # wall seconds, CPU seconds of the children


def measured(fn: Callable[[], None]) -> Sample:
    """Wall time and the CPU (user + system) of the child processes `fn` waited for."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def run_checked(argv: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None) -> None:
    r = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")


def sparkctl(py: str, argv: list[str], env: dict[str, str]) -> Sample:
    # `python -m` puts the working directory first on sys.path: run from the tree PYTHONPATH names.
    return measured(lambda: run_checked([py, "-m", "sparkctl", *argv], env=env, cwd=env["PYTHONPATH"]))


def ssh_argv(tb: Testbed, host: str) -> list[str]:
    return [
        "ssh", "-F", "/dev/null", "-i", str(tb.identity_file), "-o", "IdentitiesOnly=yes",
        "-o", f"UserKnownHostsFile={tb.known_hosts}", "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
        "-o", "ControlMaster=no", "-o", "ControlPath=none", f"{LOGIN_USER}@{tb.mgmt_ip(host)}",
    ]  # fmt: skip


def parallel_ssh(tb: Testbed, command: str, stdin: dict[str, str] | None = None) -> None:
    """One plain OpenSSH session per host, all at once; fail loudly if any fails."""
    procs = {}
    for host in tb.hosts:
        procs[host] = subprocess.Popen(
            [*ssh_argv(tb, host), command], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
    for host, p in procs.items():
        _, err = p.communicate((stdin or {}).get(host))
        if p.returncode != 0:
            raise SystemExit(f"ssh {host} {command}: exit {p.returncode}: {err}")


def probe_scripts(tb: Testbed, inv_path: Path) -> dict[str, str]:
    from sparkctl.facts.probe import build_probe
    from sparkctl.inventory import load_inventory

    inv = load_inventory(inv_path)
    return {h.name: build_probe(inv, h) for h in inv.hosts}


def median(samples: list[Sample]) -> dict[str, float]:
    return {
        "wall": round(statistics.median(s[0] for s in samples), 3),
        "cpu": round(statistics.median(s[1] for s in samples), 3),
        "wall_min": round(min(s[0] for s in samples), 3),
        "wall_max": round(max(s[0] for s in samples), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--hosts", type=int, default=2)
    ap.add_argument("--baseline", type=Path, help="another sparkctl source tree to measure in the same run")
    args = ap.parse_args()
    trees = {"now": REPO}
    if args.baseline:
        trees["baseline"] = args.baseline.resolve()
    py = sys.executable
    example = str(REPO / "inventories" / "example-pair.yaml")
    # Bytecode as an installed package has it: with PYTHONDONTWRITEBYTECODE set, every run would compile sparkctl.
    for tree in trees.values():
        compileall.compile_dir(str(tree / "sparkctl"), quiet=1)

    # Interpreter-start rows first (no testbed, no lock needed).
    local: dict[str, list[Sample]] = {}
    for _ in range(args.runs):
        local.setdefault("python -c pass", []).append(measured(lambda: run_checked([py, "-c", "pass"])))
        for label, tree in trees.items():
            env = {**os.environ, "PYTHONPATH": str(tree)}
            for name, argv in (("--help", ["--help"]), ("plan --offline", ["plan", "--offline", "-i", example])):
                key = f"{label}: sparkctl {name}"
                local.setdefault(key, []).append(sparkctl(py, argv, env))

    lock = open("/var/tmp/sparkctl-testbed.lock", "w")  # noqa: SIM115
    t_wait = time.monotonic()
    fcntl.flock(lock, fcntl.LOCK_EX)
    waited = time.monotonic() - t_wait
    t_hold = time.monotonic()
    tb = Testbed()
    tb.down()
    tb.up(hosts=args.hosts)
    state = Path(tempfile.mkdtemp(prefix="sparkctl-bench-"))
    base_env = {**os.environ, "XDG_STATE_HOME": str(state), "SPARKCTL_SUDO_PASSWORD": tb.sudo_password}
    inv = tb.inventory_path()
    remote: dict[str, list[Sample]] = {}
    try:
        env = {**base_env, "PYTHONPATH": str(REPO)}
        run_checked([py, "-m", "sparkctl", "up", "--yes", "-i", str(inv)], env=env, cwd=str(REPO))
        scripts = probe_scripts(tb, inv)
        commands = {"plan": ["plan"], "status": ["status"], "up (no-op)": ["up", "--yes"]}
        checks: dict[str, list[str]] = {}
        for label, tree in trees.items():  # warm caches, and prove the pair is converged for every tree
            env = {**base_env, "PYTHONPATH": str(tree)}
            out = subprocess.run([py, "-m", "sparkctl", "plan", "--json", "-i", str(inv)], env=env, cwd=str(tree),
                                 capture_output=True, text=True, check=True).stdout  # fmt: skip
            stages = json.loads(out)["stages"]
            changes = sum(1 for st in stages for s in st["steps"] if s["changes"])
            if changes:
                raise SystemExit(f"{label}: the pair is not converged ({changes} planned changes)")
            checks[label] = sorted({f"{st['name']}/{s['kind']}" for st in stages for s in st["steps"]})
        for _ in range(args.runs):
            remote.setdefault("floor: ssh host true", []).append(measured(lambda: parallel_ssh(tb, "true")))
            remote.setdefault("floor: ssh host sh -s < probe", []).append(
                measured(lambda: parallel_ssh(tb, "sh -s", scripts))
            )
            for label, tree in trees.items():
                env = {**base_env, "PYTHONPATH": str(tree)}
                for name, argv in commands.items():
                    remote.setdefault(f"{label}: sparkctl {name}", []).append(
                        sparkctl(py, [*argv, "-i", str(inv)], env)
                    )
    finally:
        tb.down()
        lock.close()
    held = time.monotonic() - t_hold

    hosts = args.hosts
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "runs": args.runs,
        "hosts": hosts,
        "lock_wait_seconds": round(waited, 1),
        "lock_held_seconds": round(held, 1),
        "local": {k: median(v) for k, v in local.items()},
        "testbed": {k: median(v) for k, v in remote.items()},
        "checks_left_in_a_converged_up": checks,
    }
    floor = result["local"]["python -c pass"]["wall"]
    print(f"| command (median of {args.runs}) | seconds | above `python -c pass` |\n|---|---|---|")
    for k, v in result["local"].items():
        print(f"| {k} | {v['wall']:.3f} | {v['wall'] - floor:+.3f} |")
    ssh_floor = result["testbed"]["floor: ssh host true"]["wall"]
    print(f"\n| on the testbed, {hosts} hosts (median of {args.runs}) | seconds | x floor | CPU/host (s) |")
    print("|---|---|---|---|")
    for k, v in result["testbed"].items():
        print(f"| {k} | {v['wall']:.3f} | {v['wall'] / ssh_floor:.1f} | {v['cpu'] / hosts:.3f} |")
    print()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
