"""What a run's report means for the commands that read it (pure over the Report)."""

from __future__ import annotations

from typing import Any

from sparkctl.runbook.engine import Report


def summarise_bench(report: Report) -> dict[str, Any]:
    """Per link (host, twin -> peer): did jumbo frames cross, and the TCP stream's MB/s (from the sender's output)."""
    links: dict[tuple[str, str], dict[str, Any]] = {}
    for r in report.results:
        kind, _, link = r.step.partition(":")
        if kind == "verify_jumbo":
            links.setdefault((r.host, link), {"host": r.host, "link": link})["jumbo"] = r.status == "ok"
        elif kind == "bench_send" and r.commands:
            sent, _, secs = r.commands[-1].stdout.strip().partition(" ")
            rate = int(sent) / float(secs) / 1e6 if r.status == "ok" and secs else 0.0
            links.setdefault((r.host, link), {"host": r.host, "link": link})["mbytes_per_s"] = round(rate, 1)
    return {
        "method": "tcp-fallback",
        "links": [{"jumbo": False, **v} for v in links.values()],
        "notes": [
            "a fallback, not RoCE bandwidth: on a real pair run nccl-tests' all_gather_perf with the env file "
            "applied (two rails: ~20-24 GB/s busbw is good; ~3 GB/s at every size means a misconfigured link)"
        ],
        "journal": report.run_id,
    }
