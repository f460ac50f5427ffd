"""Benchmark on the testbed (not a test): `up` time per phase, and embeddings/s for TP=1, TP=2 and replicas=2.

Run as root after tests/prepare.sh:  python3 -m benchmarks.bench_testbed [--sentences 512] [--batch 32]
It brings up its own testbed (waiting for the machine-wide testbed lock), drives the real CLI, and prints a
Markdown table plus JSON. Numbers depend on the machine: record them with its description (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.integration.helpers import EMBED  # noqa: E402
from tests.testbed import Testbed  # noqa: E402

LAYOUTS = [
    ("TP=2", {"tensor_parallel_size": 2, "replicas": 1}),
    ("TP=1", {"tensor_parallel_size": 1, "replicas": 1}),
    ("replicas=2", {"tensor_parallel_size": 1, "replicas": 2}),
]


def sentences(n: int) -> list[str]:
    words = [
        "fabric",
        "twin",
        "jumbo",
        "frame",
        "tensor",
        "rank",
        "gloo",
        "ray",
        "spark",
        "unified",
        "memory",
        "page",
        "cache",
        "driver",
        "kernel",
        "attention",
        "head",
        "column",
        "split",
        "reduce",
        "embedding",
        "vector",
        "model",
        "weights",
    ]
    return [" ".join(words[(i * 7 + k) % len(words)] for k in range(8 + i % 24)) for i in range(n)]


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [sys.executable, "-m", "sparkctl", *args], env=env, cwd=REPO, capture_output=True, text=True, check=False
    )
    if r.returncode != 0:
        raise SystemExit(f"sparkctl {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}")
    return r


def phases(state: Path) -> dict[str, float]:
    """Seconds per stage of the last run, from the journal (wall time of the stage across hosts)."""
    record = json.loads((state / "sparkctl" / "journal.jsonl").read_text().splitlines()[-1])
    spans: dict[str, list[float]] = {}
    for s in record["steps"]:
        if s["started"]:
            lo, hi = spans.get(s["stage"], [s["started"], s["ended"]])
            spans[s["stage"]] = [min(lo, s["started"]), max(hi, s["ended"])]
    out = {k: round(v[1] - v[0], 2) for k, v in spans.items()}
    out["total"] = round(record["ended"] - record["started"], 2)
    return out


def throughput(key: str, texts: list[str], batch: int, rounds: int) -> dict[str, float]:
    import openai

    client = openai.OpenAI(base_url="http://10.77.0.11:8100/v1", api_key=key)
    client.embeddings.create(model="embed", input=texts[:batch])  # warm up
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for i in range(0, len(texts), batch):
            client.embeddings.create(model="embed", input=texts[i : i + batch])
        rates.append(len(texts) / (time.perf_counter() - t0))
    return {"median": round(statistics.median(rates), 1), "min": round(min(rates), 1), "max": round(max(rates), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sentences", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    lock = open("/var/tmp/sparkctl-testbed.lock", "w")  # noqa: SIM115
    fcntl.flock(lock, fcntl.LOCK_EX)
    tb = Testbed()
    tb.down()
    tb.up(hosts=2)
    state = Path(tempfile.mkdtemp(prefix="sparkctl-bench-"))
    env = {
        **os.environ,
        "XDG_STATE_HOME": str(state),
        "SPARKCTL_SUDO_PASSWORD": tb.sudo_password,
        "PYTHONPATH": str(REPO),
    }
    inv = str(tb.inventory_path(workloads=[EMBED]))
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "sentences": args.sentences,
        "batch": args.batch,
    }
    try:
        t0 = time.monotonic()
        cli(env, "up", "--yes", "-i", inv)
        result["up_fresh_seconds"] = round(time.monotonic() - t0, 2)
        result["up_phases"] = phases(state)
        t0 = time.monotonic()
        cli(env, "up", "--yes", "-i", inv)
        result["up_converged_seconds"] = round(time.monotonic() - t0, 2)
        t0 = time.monotonic()
        cli(env, "plan", "-i", inv)
        result["plan_seconds"] = round(time.monotonic() - t0, 2)
        key = (state / "sparkctl" / "testbed" / "api-key-embed").read_text().strip()
        texts = sentences(args.sentences)
        result["embeddings_per_second"] = {}
        for label, layout in LAYOUTS:
            sets = [x for k, v in layout.items() for x in ("--set", f"{k}={v}")]
            t0 = time.monotonic()
            cli(
                env,
                "run",
                str(REPO / "playbooks" / "swap-model.yaml"),
                "--yes",
                "-i",
                inv,
                "--set",
                "workload=embed",
                "--set",
                "model=all-MiniLM-L6-v2",
                *sets,
            )
            result.setdefault("swap_seconds", {})[label] = round(time.monotonic() - t0, 2)
            result["embeddings_per_second"][label] = throughput(key, texts, args.batch, args.rounds)
        cli(env, "down", "-i", inv)
    finally:
        tb.down()
        lock.close()
    print(json.dumps(result, indent=2))
    print("\n| layout | embeddings/s (median, min-max) |\n|---|---|")
    for label, r in result["embeddings_per_second"].items():
        print(f"| {label} | {r['median']} ({r['min']}-{r['max']}) |")
    print("\n| up phase | seconds |\n|---|---|")
    for k, v in result["up_phases"].items():
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
