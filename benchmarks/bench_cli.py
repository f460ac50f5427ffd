"""Benchmark (not a test): how fast the CLI starts and plans offline, and which heavy modules it loads.

Run:  python3 -m benchmarks.bench_cli [--runs 10]
"""

from __future__ import annotations

import argparse
import compileall
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("ray", "torch", "paramiko", "fabric", "transformers")


def timed(argv: list[str], runs: int) -> float:
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, cwd=REPO, capture_output=True, check=True)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=10)
    runs = ap.parse_args().runs
    py = sys.executable
    # Bytecode as an installed package has it (with PYTHONDONTWRITEBYTECODE set, every run would compile sparkctl).
    compileall.compile_dir(str(REPO / "sparkctl"), quiet=1)
    example = str(REPO / "inventories" / "example-pair.yaml")
    rows = {
        "python -c pass (interpreter floor)": timed([py, "-c", "pass"], runs),
        "sparkctl --help": timed([py, "-m", "sparkctl", "--help"], runs),
        "sparkctl plan --offline": timed([py, "-m", "sparkctl", "plan", "--offline", "-i", example], runs),
    }
    probe = (
        "import sys; from typer.testing import CliRunner; from sparkctl.cli.app import app; "
        f"CliRunner().invoke(app, ['plan', '--offline', '-i', {example!r}]); "
        f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules) or 'none')"
    )
    loaded = subprocess.run([py, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    print("| command | median seconds |\n|---|---|")
    for name, secs in rows.items():
        print(f"| {name} | {secs:.3f} |")
    print(f"\nheavy modules loaded by an offline plan: {loaded}")


if __name__ == "__main__":
    main()
