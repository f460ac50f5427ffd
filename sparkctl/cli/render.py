"""Text renderings of plans, reports, findings, status and progress events."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
import unicodedata
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

from sparkctl.session.logphase import PROGRESS_LABELS

if TYPE_CHECKING:  # annotations only: printing a plan loads neither the rules nor the engine
    from sparkctl.doctor.rules import Finding
    from sparkctl.plan.models import Plan
    from sparkctl.session.report import Event, Report
    from sparkctl.session.views import ClusterStatus

SYMBOL = {
    "ok": "ok",
    "changed": "changed",
    "failed": "FAILED",
    "skipped": "skipped",
    "interrupted": "interrupted",
    "stopped": "stopped",
    "unreachable": "UNREACHABLE",
}

# Characters that act on a terminal or hide instead of showing: the controls (Unicode category Cc: C0 but
# newline and tab, ESC starts ANSI sequences and CR overwrites a line; DEL; C1, where U+009B is CSI), the format
# characters (Cf: the bidi controls U+061C, U+200E/F, U+202A-U+202E, U+2066-U+2069 of "Trojan Source",
# CVE-2021-42574, the zero-width U+200B-U+200D, U+2060 and U+FEFF, the soft hyphen, the tag characters) and
# the line and paragraph separators (Zl, Zp). Text from inventories, runbooks and hosts shows them as \uXXXX
# (a surrogate pair beyond U+FFFF), which is also a valid JSON escape, so the same table serves --json output.
_HIDDEN = frozenset({"Cc", "Cf", "Zl", "Zp"})
_KEPT = frozenset({ord("\t"), ord("\n")})
_BMP = 0x10000


class _Escapes(dict[int, "int | str"]):
    """str.translate's table: each character looked up once, by its category in Python's Unicode database."""

    def __missing__(self, code: int) -> int | str:
        value: int | str = code
        if code not in _KEPT and unicodedata.category(chr(code)) in _HIDDEN:
            value = _escape(code)
        if code < _BMP:  # remembered: at most 65,536 entries, whatever the text
            self[code] = value
        return value


def _escape(code: int) -> str:
    if code < _BMP:
        return f"\\u{code:04x}"
    high, low = divmod(code - _BMP, 0x400)
    return f"\\u{0xD800 + high:04x}\\u{0xDC00 + low:04x}"


_ESCAPES = _Escapes()


def escape_controls(text: str) -> str:
    """`text` safe to print: control, format and separator characters shown as \\uXXXX (newlines, tabs kept)."""
    return text.translate(_ESCAPES)


def render_plan(plan: Plan) -> str:
    """The plan per host, per step: description, exact commands, diff."""
    head = f"plan: {plan.runbook} on {plan.cluster} ({len(plan.hosts)} hosts)"
    if plan.offline:
        head += ", offline: hosts assumed fresh"
    lines = [head]
    for host in plan.hosts:
        steps = [(st.name, s) for st in plan.stages for s in st.steps if s.host == host]
        changing = sum(1 for _, s in steps if s.changes)
        lines.append("")
        lines.append(f"{host}: {changing} change(s)" if changing else f"{host}: no changes")
        for stage, s in steps:
            mark = "~" if s.changes else "?"
            extra = "  [depends on an earlier step]" if s.depends_on_earlier else ""
            lines.append(f"  {mark} {stage}: {s.description}{extra}")
            for c in s.commands:
                lines.append(f"      $ {c.render()}")
            for d in s.diff:
                lines.append(f"      {d}")
            for n in s.notes:
                lines.append(f"      note: {n}")
            if s.verdict:
                lines.append(f"      will fail: {s.verdict}")
            if s.rollback:
                lines.append(f"      if the run fails before {s.rollback.commit}: {s.rollback.description}")
                for c in s.rollback.commands:
                    lines.append(f"        $ {c.render()}")
                if s.rollback.fallback:
                    lines.append(f"        unreachable: {s.rollback.fallback}")
    lines.append("")
    for note in plan.notes:
        lines.append(f"note: {note}")
    lines.append(f"{plan.changes} change(s) planned" if plan.changes else "no changes: the cluster is converged")
    lines.append("(~ changes something, ? read-only check)")
    return "\n".join(lines)


def render_report(report: Report) -> str:
    """Per host: ok / changed / failed / unreachable, then failures with their output."""
    lines = [
        f"{report.runbook} on {report.cluster}: "
        + ("done" if report.ok else "interrupted" if report.interrupted else "FAILED")
    ]
    for host, status in report.hosts.items():
        lines.append(f"  {host}: {SYMBOL.get(status, status)}" + _applied(report, host))
    return "\n".join(lines + render_report_details(report))


def render_report_details(report: Report) -> list[str]:
    """What follows the per-host lines: failures with their output, rollbacks, hints, the journal entry."""
    lines: list[str] = []
    for r in report.results:
        if r.status == "failed":
            lines.append(f"error: {r.host} {r.stage}/{r.step}: {r.error}")
            if r.log_tail:
                lines.append("  log tail:")
                lines += [f"    {x}" for x in r.log_tail.splitlines()]
        elif r.status == "interrupted":
            lines.append(f"interrupted: {r.host} {r.stage}/{r.step}: {r.error}")
    for host, message in report.host_errors.items():
        lines.append(f"error: {host}: {message}")
    for host in report.rolled_back:
        undone = [r for r in report.results if r.host == host and r.stage == "rollback"]
        if undone and all(r.status != "failed" for r in undone):
            lines.append(f"  {host}: rolled back: the run's uncommitted changes were undone")
        else:
            lines.append(f"  {host}: NOT rolled back by sparkctl (see the error above)")
    if report.error:
        lines.append(f"error: the run ended early: {report.error}")
    lost = [h for h, st in report.hosts.items() if st == "unreachable"]
    if lost:
        lines.append(
            f"hint: {', '.join(lost)} could not be reached, so this run did not finish there; "
            f"run `sparkctl {report.runbook}` again once reachable"
        )
    if report.runbook == "up" and not report.ok and any(r.status == "changed" for r in report.results):
        lines.append(
            "hint: the stages listed as applied were; nothing else was. `sparkctl up` again resumes and converges; "
            "`sparkctl down` stops Ray and the workloads"
        )
    for rev in report.revisions:
        lines.append(f"note: plan revised: {rev}")
    if report.journal_error:
        lines.append(f"error: this run is not in the journal: {report.journal_error}")
    elif report.run_id:
        lines.append(f"journal: sparkctl history show {report.run_id}")
    return lines


def _applied(report: Report, host: str) -> str:
    """What a run applied on a host, by stage in order: "; applied: fabric (2 steps), env"."""
    counts: dict[str, int] = {}
    for r in report.results:
        if r.host == host and r.status == "changed":
            counts[r.stage] = counts.get(r.stage, 0) + 1
    if not counts:
        return "; nothing applied" if not report.ok else ""
    parts = [f"{stage} ({n} steps)" if n > 1 else stage for stage, n in counts.items()]
    return "; applied: " + ", ".join(parts)


MARK = {"pass": "pass", "warn": "WARN", "fail": "FAIL"}


def render_findings(findings: list[Finding], verbose: bool = False) -> str:
    """Doctor's findings: failures and warnings with why and fix (passes too with verbose), then the counts."""
    lines = []
    for f in findings:
        if f.level == "pass" and not verbose:
            continue
        lines.append(f"{MARK[f.level]:4} {f.rule:24} {f.subject}: {f.evidence}")
        if f.level != "pass":
            lines.append(f"     why: {f.why}")
            lines.append(f"     fix: {f.fix}")
    counts = {lvl: sum(1 for f in findings if f.level == lvl) for lvl in ("pass", "warn", "fail")}
    lines.append(f"{counts['pass']} passed, {counts['warn']} warning(s), {counts['fail']} failed")
    return "\n".join(lines)


def render_status(st: ClusterStatus) -> str:
    """`sparkctl status`: per host Ray and the twins, per workload its endpoint, process and health."""
    lines = [f"cluster {st.cluster}"]
    for name, h in st.hosts.items():
        lines.append(f"  {name}: ray {h.ray}")
        for t in h.fabric:
            lines.append(
                f"    {t.interface}: {','.join(t.ipv4) or 'no IPv4'} MTU {t.mtu} ({'ok' if t.ok else 'want ' + t.want})"
            )
    lines += [f"  {name}: UNREACHABLE" for name in st.unreachable]  # why: on stderr, as an error
    for name, w in st.workloads.items():
        on = f" on {','.join(w.hosts)}" if w.hosts else ""
        lines.append(f"  workload {name} ({w.engine}{on}): {w.endpoint} process {w.process}, {w.health}")
        if "broken" in (w.process, w.health):
            # what the workload recorded (a rank lost, or why it exited by itself), else what its endpoint says
            why = w.recorded.removeprefix("failed ").strip() or w.detail
            lines.append(f"    broken: {why}; hint: sparkctl up restarts it")
    return "\n".join(lines)


def render_bench(result: dict[str, Any]) -> str:
    """`sparkctl bench fabric`: the method, per link jumbo frames and the RoCE or TCP rate, the all-reduce figure, then
    the notes."""
    lines = [f"method: {result['method']}"]
    for link in result["links"]:
        rate = f", {link['mbytes_per_s']:.0f} MB/s (one TCP stream)" if link.get("mbytes_per_s") else ""
        if link.get("rdma_gbits_per_s") is not None:
            rate = f", {link['rdma_gbits_per_s']:.1f} Gb/s (ib_write_bw)"
        lines.append(f"  {link['host']} {link['link']}: jumbo {'ok' if link['jumbo'] else 'FAILED'}{rate}")
    nccl = result.get("nccl_all_reduce")
    if nccl and nccl.get("avg_busbw_gbytes") is not None:
        lines.append(f"  all_reduce_perf: avg busbw {nccl['avg_busbw_gbytes']} GB/s, peak {nccl['peak_busbw_gbytes']}")
    lines += [f"note: {note}" for note in result["notes"]]
    return "\n".join(lines)


def _ms(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, int | float) else "-"


def _layout(row: dict[str, Any]) -> str:
    lay = row.get("layout") or {}
    pp = f" PP={lay['pipeline_parallel_size']}" if (lay.get("pipeline_parallel_size") or 1) > 1 else ""
    rep = f" x{lay['replicas']}" if (lay.get("replicas") or 1) > 1 else ""
    return f"TP={lay.get('tensor_parallel_size')}{pp}{rep} {lay.get('executor')} on {','.join(lay.get('hosts') or [])}"


def _shape(row: dict[str, Any]) -> str:
    sh = row.get("shape") or {}
    out = f"/{sh['output_len']}" if sh.get("output_len") else ""
    cap = sh.get("max_concurrency")
    rate = sh.get("request_rate")
    pace = f" @{rate:g}/s" if isinstance(rate, int | float) else ""
    return f"{sh.get('prompts')}x{sh.get('input_len')}{out} c={cap if cap else 'all'}{pace}"


def render_bench_serve(result: dict[str, Any]) -> str:
    """`sparkctl bench serve`: per bench, the layout, the request shape and duration, then what vLLM measured."""
    lines: list[str] = []
    for row in result["results"]:
        if "error" in row:
            lines.append(f"{row['workload']} from {row['host']}: no result ({row['status']}): {row['error']}")
            continue
        sh = row["shape"]
        out = f" / {sh['output_len']} out" if sh.get("output_len") else ""
        cap = f"concurrency {sh['max_concurrency']}" if sh.get("max_concurrency") else "no concurrency cap"
        rate = sh.get("request_rate")
        lines.append(
            f"{row['workload']} ({row.get('api')}, vllm bench serve --backend {row.get('backend')}) "
            f"from {row.get('from')}"
        )
        lines.append(f"  layout      {_layout(row)}")
        lines.append(
            f"  requests    {sh['prompts']} x ({sh.get('input_len')} in{out} tokens), {cap}, "
            f"rate {rate if rate == 'inf' or rate is None else f'{rate:g}/s'}"
        )
        dur = row.get("duration_s")
        took = f" in {dur:.1f} s" if isinstance(dur, float) else ""
        lines.append(f"  done        {row['completed']} ok, {row['failed']} failed{took}")
        figures = [f"{_ms(row.get('request_throughput'))} req/s"]
        if row.get("output_throughput") is not None:
            figures.append(f"{_ms(row['output_throughput'])} output tok/s")
        if row.get("total_token_throughput") is not None:
            figures.append(f"{_ms(row['total_token_throughput'])} total tok/s")
        lines.append(f"  throughput  {', '.join(figures)}")
        for metric, lat in (row.get("latency_ms") or {}).items():
            lines.append(
                f"  {metric.upper():<5} ms    mean {_ms(lat.get('mean'))}  median {_ms(lat.get('median'))}  "
                f"p99 {_ms(lat.get('p99'))}"
            )
    if result.get("journal"):
        lines.append(f"journal: sparkctl history show {result['journal']}  (all runs: sparkctl bench history)")
    return "\n".join(lines)


def render_bench_table(rows: list[dict[str, Any]]) -> str:
    """Bench serve results side by side, one line each: layout, where from, request shape, duration, the figures
    (medians and p99 in ms)."""
    head = [
        "run",
        "workload",
        "layout",
        "from",
        "requests",
        "time s",
        "req/s",
        "out tok/s",
        "TTFT med/p99",
        "TPOT med/p99",
        "E2EL med/p99",
    ]
    table = [head]
    for r in rows:
        lat = r.get("latency_ms") or {}

        def pair(m: str, lat: dict[str, Any] = lat) -> str:
            v = lat.get(m)
            return f"{_ms(v.get('median'))}/{_ms(v.get('p99'))}" if v else "-"

        dur = r.get("duration_s")
        table.append(
            [
                str(r.get("run", "")),
                str(r.get("workload")),
                _layout(r),
                str(r.get("from")),
                _shape(r),
                f"{dur:.1f}" if isinstance(dur, float) else "-",
                _ms(r.get("request_throughput")),
                _ms(r.get("output_throughput")),
                pair("ttft"),
                pair("tpot"),
                pair("e2el"),
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in table)


class Progress:
    """Renders engine events: one plain line per event (stderr), compact on a terminal."""

    COPY_EVERY = 5.0
    """Seconds between two plain lines of one long copy's progress (the live view shows every update)."""

    def __init__(
        self, stream: TextIO | None = None, quiet: bool = False, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.clock = clock
        self._lock = threading.Lock()  # hosts report from their own threads
        self._copy_said: dict[tuple[str, str], float] = {}

    def __call__(self, e: Event) -> None:
        if self.quiet:
            return
        # a workload log's progress is for the live view only; a long copy's is printed now and then
        if e.kind == "progress" and (e.status not in PROGRESS_LABELS.values() or not self._copy_due(e)):
            return
        if e.kind == "stage":
            text = f"== {e.stage}"
        elif e.kind == "step_start":
            text = f"   {e.host}: {e.step} ..."
        elif e.kind == "step_end":
            text = f"   {e.host}: {e.step} {SYMBOL.get(e.status, e.status)} ({e.elapsed:.1f}s)"
            if e.status in ("failed", "interrupted", "stopped"):
                text += f": {e.message}"
        elif e.kind == "phase":
            text = f"   {e.host}: {e.step} phase {e.status}" + (f": {e.message}" if e.message else "")
        elif e.kind == "progress":
            text = f"   {e.host}: {e.step} {e.status} {e.message}"
        else:
            text = f"   note: {e.message}"
        with self._lock, contextlib.suppress(OSError):  # a terminal gone (SIGHUP) must not stop the cleanup
            self.stream.write(escape_controls(text) + "\n")
            self.stream.flush()

    def _copy_due(self, e: Event) -> bool:
        now = self.clock()
        with self._lock:
            last = self._copy_said.get((e.host, e.step))
            if last is not None and now - last < self.COPY_EVERY:
                return False
            self._copy_said[(e.host, e.step)] = now
            return True
