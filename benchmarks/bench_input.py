"""Benchmark (not a test): time and peak memory of sparkctl answering hostile inventories.

Run:  python3 -m benchmarks.bench_input [--timeout 120] [--limit-gb 8]

Each case is written to a temporary file and fed to `sparkctl plan --offline -i FILE` in a fresh process;
the line printed per case is: exit code, wall time, CPU time (user+sys) and peak RSS (ru_maxrss) of the child,
and the first error line. CPU time is the number to compare on a loaded machine; both include interpreter start.
The promise (docs/promises.md): exit 2 with a located message, within 2 s and 200 MB, for any file up to 5 MB.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def alias_bomb() -> str:
    """The classic 9-level 'billion laughs' in YAML: nine lines, 10**9 strings when expanded."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    prev = "a"
    for name in "bcdefghi":
        lines.append(f"{name}: &{name} [{','.join(['*' + prev] * 9)}]")
        prev = name
    return "\n".join(lines) + "\n"


def huge_list(size: int = 5 * 1024 * 1024) -> str:
    """A valid inventory head, then one huge list under `workloads`."""
    head = (REPO / "inventories" / "example-pair.yaml").read_text().split("workloads:")[0]
    body = "workloads:\n" + "  - x\n" * ((size - len(head)) // 6)
    return head + body


def deep_nesting(size: int = 5 * 1024 * 1024) -> str:
    """Nested flow sequences."""
    n = size // 2 - 10
    return "cluster: " + "[" * n + "]" * n + "\n"


UNDER = 1024 * 1024 - 100  # just under the reader's size limit: the parser really runs


CASES: dict[str, Callable[[], str]] = {
    "alias-bomb (9 lines)": alias_bomb,
    "one huge list (5 MB)": huge_list,
    "deep nesting (5 MB)": deep_nesting,
    "one huge list (1 MB)": lambda: huge_list(UNDER),
    "deep nesting (1 MB)": lambda: deep_nesting(UNDER),
}


def measure(argv: list[str], timeout: float, limit: int) -> tuple[int, float, float, float, str]:
    def _limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    t0 = time.perf_counter()
    try:
        p = subprocess.run(
            argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, preexec_fn=_limit, check=False
        )
        code, err = p.returncode, (p.stderr.strip().splitlines() or [""])[0]
    except subprocess.TimeoutExpired:
        code, err = -1, f"timed out after {timeout:.0f}s"
    wall = time.perf_counter() - t0
    # ru_maxrss of the largest child so far (KiB on Linux): run each case in its own measuring process.
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return code, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--limit-gb", type=float, default=8, help="address-space limit of each child")
    ap.add_argument("--case", help="run only this case (used internally: one process per case)")
    args = ap.parse_args()
    if args.case is None:
        # One measuring process per case, so ru_maxrss is that case's own peak.
        for name in [*CASES, "/dev/zero"]:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.bench_input",
                    "--case",
                    name,
                    "--timeout",
                    str(args.timeout),
                    "--limit-gb",
                    str(args.limit_gb),
                ],
                cwd=REPO,
                check=False,
            )
        return
    limit = int(args.limit_gb * 1024**3)
    with tempfile.TemporaryDirectory() as tmp:
        if args.case == "/dev/zero":
            path = "/dev/zero"
        else:
            path = os.path.join(tmp, "inv.yaml")
            Path(path).write_text(CASES[args.case]())
        size = os.path.getsize(path) if path != "/dev/zero" else 0
        code, wall, cpu, rss, err = measure(
            [sys.executable, "-m", "sparkctl", "plan", "--offline", "-i", path], args.timeout, limit
        )
    print(
        f"{args.case:22} {size / 1e6:4.1f} MB  exit {code:3}  wall {wall:6.2f} s  cpu {cpu:6.2f} s  "
        f"peak {rss:6.0f} MB  {err[:100]}",
        flush=True,
    )


if __name__ == "__main__":
    main()
