"""What a run's report means for the commands that read it (pure over the Report)."""

from __future__ import annotations

from typing import Any

from sparkctl.plan.bench import RDMA_QPS, parse_all_reduce_perf, parse_ib_write_bw
from sparkctl.plan.serve_bench import parse_bench_result, summarise_result
from sparkctl.session.report import Report


def summarise_bench(report: Report) -> dict[str, Any]:
    """Per link (host, twin -> peer): did jumbo frames cross, the RDMA Gb/s (ib_write_bw, several QPs) or the TCP
    fallback's MB/s; and nccl-tests' all_reduce busbw when it ran."""
    links: dict[tuple[str, str], dict[str, Any]] = {}
    nccl: dict[str, Any] | None = None
    tcp = False
    for r in report.results:
        kind, _, link = r.step.partition(":")
        if kind == "verify_jumbo":
            links.setdefault((r.host, link), {"host": r.host, "link": link})["jumbo"] = r.status == "ok"
        elif kind == "bench_send" and r.commands:
            tcp = True
            sent, _, secs = r.commands[-1].stdout.strip().partition(" ")
            rate = int(sent) / float(secs) / 1e6 if r.status == "ok" and secs else 0.0
            links.setdefault((r.host, link), {"host": r.host, "link": link})["mbytes_per_s"] = round(rate, 1)
        elif kind == "bench_rdma_send" and r.commands:
            gbits = parse_ib_write_bw(r.commands[-1].stdout) if r.status == "ok" else None
            links.setdefault((r.host, link), {"host": r.host, "link": link})["rdma_gbits_per_s"] = gbits
        elif kind == "bench_nccl" and r.commands:
            nccl = parse_all_reduce_perf(r.commands[-1].stdout) if r.status == "ok" else {"failed": True}
    rdma = any("rdma_gbits_per_s" in v for v in links.values())
    notes = []
    if rdma:
        notes.append(f"RoCE: ib_write_bw with {RDMA_QPS} queue pairs per twin (one QP underestimates the link)")
    if tcp:
        notes.append(
            "TCP fallback on links without ib_write_bw on both ends: a fallback, not RoCE bandwidth (install "
            "perftest; nccl-tests' all_reduce_perf gives the collective figure)"
        )
    if nccl is None:
        notes.append("no nccl-tests all_reduce_perf (and mpirun) on every host: no collective figure")
    method = "rdma" if rdma and not tcp else ("rdma+tcp-fallback" if rdma else "tcp-fallback")
    return {
        "method": method,
        "links": [{"jumbo": False, **v} for v in links.values()],
        "nccl_all_reduce": nccl,
        "notes": notes,
        "journal": report.run_id,
    }


def bench_serve_rows(steps: list[dict[str, Any]], run_id: str = "", runbook: str = "") -> list[dict[str, Any]]:
    """One row per `bench_serve` step of a run (its StepResult as the report or the journal holds it): vLLM's result
    read back and summarised, or why there is none."""
    rows = []
    for r in steps:
        if r.get("kind") != "bench_serve":
            continue
        commands = r.get("commands") or []
        raw = parse_bench_result(commands[-1].get("stdout", "")) if commands and r.get("status") == "ok" else None
        row: dict[str, Any] = {"run": run_id, "runbook": runbook, "host": r.get("host"), "status": r.get("status")}
        if raw is None:
            row |= {"workload": str(r.get("step", "")).partition(":")[2], "error": r.get("error") or "no result"}
        else:
            row |= summarise_result(raw)
        rows.append(row)
    return rows


def summarise_bench_serve(report: Report) -> dict[str, Any]:
    """`bench serve`: each bench of the run with its layout, request shape and vLLM's figures; the journal entry."""
    steps = [r.model_dump() for r in report.results]
    return {"results": bench_serve_rows(steps, report.run_id, report.runbook), "journal": report.run_id}


def bench_history(records: list[dict[str, Any]], workload: str | None = None) -> list[dict[str, Any]]:
    """Every bench serve result kept in the journal, oldest first (only those that produced a result)."""
    rows = []
    for rec in records:
        for row in bench_serve_rows(rec.get("steps") or [], str(rec.get("id", "")), str(rec.get("runbook", ""))):
            if "error" in row or (workload and row.get("workload") != workload):
                continue
            rows.append({**row, "cluster": rec.get("cluster")})
    return rows
