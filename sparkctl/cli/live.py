"""The live view of a run on a terminal: one line per host of the running stage, then a recap.

It renders the same engine events as the plain lines (render.Progress), with rich. rich is imported on first use
only (`sparkctl --help` must not pay for it). Every text from an inventory, runbook or host goes through
escape_controls and into a rich Text, never into markup, so a host cannot style or move the terminal.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from sparkctl.cli.render import SYMBOL, escape_controls
from sparkctl.session.report import Event, Report

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.live import Live

# What the readiness probe (sparkctl/execute/http.py) observes, worded for the operator.
PHASES = {
    "down": "started, port not open yet",
    "loading": "listening, /health not ready",
    "listed": "model listed, awaiting a first answer",
    "ready": "first answer received",
    "broken": "reports a failed backend",
}
_STYLE = {
    "ok": "green",
    "changed": "yellow",
    "failed": "bold red",
    "unreachable": "bold red",
    "interrupted": "magenta",
    "stopped": "magenta",
    "skipped": "cyan",
}
_MARK = {"ok": "✓", "changed": "✓", "failed": "✗", "unreachable": "✗", "interrupted": "!", "stopped": "-"}
_RANK = ["ok", "skipped", "changed", "stopped", "interrupted", "failed", "unreachable"]


def fmt_seconds(s: float) -> str:
    """12.3s, 4m05s, 1h02m."""
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


@dataclass
class Row:
    """One host in one stage."""

    host: str
    stage: str
    started: float
    ended: float = 0.0
    running: dict[str, str] = field(default_factory=dict)
    """step id -> its description, for the steps under way."""
    counts: dict[str, int] = field(default_factory=dict)
    phase: str = ""
    progress: str = ""
    detail: str = ""

    @property
    def status(self) -> str:
        """The worst outcome of the stage's steps on this host so far."""
        seen = [s for s in _RANK if self.counts.get(s)]
        return seen[-1] if seen else "ok"


@dataclass
class Timing:
    """How long one phase of one step lasted on one host."""

    stage: str
    host: str
    step: str
    phase: str
    seconds: float


class LiveProgress:
    """Engine events as a live view. Thread-safe: hosts report from their own threads."""

    def __init__(
        self, console: Console | None = None, clock: Callable[[], float] = time.monotonic, stream: TextIO | None = None
    ) -> None:
        from rich.console import Console

        self.console = console or Console(file=stream, highlight=False, markup=False, emoji=False)
        self.clock = clock
        self.rows: dict[tuple[str, str], Row] = {}
        self.stages: list[tuple[str, float]] = []
        """Stage name and when it started, in order."""
        self.timings: list[Timing] = []
        self._phase: dict[tuple[str, str], tuple[str, str, float]] = {}
        """(host, step) -> (stage, phase or log label, since when) for the wait under way."""
        self._stage = ""
        self._lock = threading.RLock()
        """Guards the state above; see __call__ for the order with rich's own locks."""
        self._control = threading.Lock()
        """Guards starting and stopping the live region."""
        self._live: Live | None = None
        self._spinners: dict[tuple[str, str], Any] = {}

    # -- events ---------------------------------------------------------------------------------------------------
    # Lock order: the state lock (self._lock) is never held while calling into rich. rich's refresh thread holds
    # Live's lock while it asks render_current() for the picture, which takes the state lock.
    def __call__(self, e: Event) -> None:
        out: list[RenderableType] = []
        with self._lock:
            self._update(e, out)
        for r in out:
            self._print(r)
        live = self._live
        if live is not None:
            with contextlib.suppress(OSError):
                live.refresh()

    def _update(self, e: Event, out: list[RenderableType]) -> None:
        now = self.clock()
        if e.kind == "stage":
            out += self._flush()
            self._stage = e.stage
            self.stages.append((e.stage, now))
        elif e.kind == "step_start":
            row = self._row(e.host, e.stage, now)
            row.running[e.step] = e.message or e.step
            row.phase = row.progress = row.detail = ""
        elif e.kind == "step_end":
            row = self._row(e.host, e.stage, now)
            row.running.pop(e.step, None)
            row.counts[e.status] = row.counts.get(e.status, 0) + 1
            row.ended = now
            if e.status in ("failed", "interrupted", "stopped"):
                row.detail = e.message
            self._close_phase(e.host, e.step, now)
            row.phase = row.progress = ""
        elif e.kind == "phase":
            row = self._row(e.host, e.stage, now)
            if e.message == f"{e.status} took {e.elapsed:.1f}s":
                return  # the end of the previous phase: timed here, from the events' arrival
            self._open_phase(row.stage, e.host, e.step, PHASES.get(e.status, e.status), now)
            row.phase, row.progress = PHASES.get(e.status, e.status), ""
        elif e.kind == "progress":
            row = self._row(e.host, e.stage, now)
            self._open_phase(row.stage, e.host, e.step, e.status, now)
            row.phase, row.progress = e.status, e.message
        else:  # note, revised: a line above the live view
            out.append(_line(f"note: {e.message}", "dim" if e.kind == "revised" else ""))

    def _row(self, host: str, stage: str, now: float) -> Row:
        key = (stage or self._stage, host)
        if key not in self.rows:
            self.rows[key] = Row(host=host, stage=key[0], started=now)
        return self.rows[key]

    def _open_phase(self, stage: str, host: str, step: str, label: str, now: float) -> None:
        current = self._phase.get((host, step))
        if current and current[1] == label:
            return
        self._close_phase(host, step, now)
        self._phase[(host, step)] = (stage, label, now)

    def _close_phase(self, host: str, step: str, now: float) -> None:
        current = self._phase.pop((host, step), None)
        if current:
            stage, label, since = current
            self.timings.append(Timing(stage, host, step, label, now - since))

    # -- the screen -----------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Begin redrawing (about 8 times a second) until stop()."""
        from rich.live import Live

        with self._control:
            if self._live is None:
                live = Live(
                    get_renderable=self.render_current,
                    console=self.console,
                    refresh_per_second=8,
                    transient=True,
                    redirect_stdout=False,
                    redirect_stderr=False,
                )
                live.start()
                self._live = live

    def stop(self) -> None:
        """Stop redrawing; the last stage stays on screen as plain lines."""
        self._halt()
        with self._lock:
            out = self._flush()
        for r in out:
            self._print(r)

    def _halt(self) -> bool:
        with self._control:
            live, self._live = self._live, None
            if live is None:
                return False
            with contextlib.suppress(OSError):
                live.stop()
            return True

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Stop the live region while the operator is asked something, then resume."""
        was = self._halt()
        try:
            yield
        finally:
            if was:
                self.start()

    def _print(self, renderable: RenderableType) -> None:
        with contextlib.suppress(OSError):  # a terminal gone (SIGHUP) must not stop the cleanup
            self.console.print(renderable)

    def _flush(self) -> list[RenderableType]:
        """The finished stage's final lines (one per host), to print above the live region once."""
        stage, self._stage = self._stage, ""
        if not any(st == stage for st, _ in self.rows):  # a stage with nothing to do on any host
            return []
        return [self.render_stage(stage, final=True)]

    def render_current(self) -> RenderableType:
        """The live region: the stage under way, one line per host."""
        with self._lock:
            return self.render_stage(self._stage, final=False) if self._stage else ""

    def render_stage(self, stage: str, final: bool) -> RenderableType:
        """A stage title and one line per host: mark or spinner, host, what runs (phase, progress), elapsed."""
        from rich.console import Group
        from rich.spinner import Spinner
        from rich.table import Table
        from rich.text import Text

        now = self.clock()
        grid = Table.grid(padding=(0, 1))
        grid.add_column(width=1)
        grid.add_column(no_wrap=True)
        grid.add_column(justify="right", no_wrap=True, min_width=6)
        grid.add_column(overflow="ellipsis", no_wrap=True)
        for (st, host), row in self.rows.items():
            if st != stage:
                continue
            what = Text()
            if row.running and not final:
                key = (st, host)
                spinner = self._spinners.setdefault(key, Spinner("dots", style="cyan"))
                mark: Any = spinner
                what.append(escape_controls(" | ".join(row.running.values())))
                if row.phase:
                    what.append(" — " + escape_controls(row.phase), style="bold")
                if row.progress:
                    what.append(" " + escape_controls(row.progress), style="bold cyan")
                elapsed = now - row.started
            else:
                status = row.status
                mark = Text(_MARK.get(status, "·"), style=_STYLE.get(status, ""))
                for i, (s, n) in enumerate(
                    sorted(row.counts.items(), key=lambda kv: _RANK.index(kv[0]) if kv[0] in _RANK else 0)
                ):
                    what.append(", " if i else "")
                    what.append(f"{n} {SYMBOL.get(s, s)}", style=_STYLE.get(s, ""))
                if row.detail.strip():  # its first line: the whole message follows the recap
                    what.append(": " + escape_controls(row.detail.strip().splitlines()[0]))
                elapsed = (row.ended or now) - row.started
            grid.add_row(mark, Text(escape_controls(host), style="bold"), Text(fmt_seconds(elapsed), style="dim"), what)
        title = Text("== " + escape_controls(stage), style="bold blue")
        return Group(title, grid)


def _line(text: str, style: str = "") -> RenderableType:
    from rich.text import Text

    return Text(escape_controls(text), style=style)


def render_recap(report: Report, live: LiveProgress | None = None) -> RenderableType:
    """PLAY RECAP: per host its state and step counts (ok / changed / failed / unreachable / skipped), then the
    time each stage and each observed workload phase took."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    recap = Table(show_edge=False, pad_edge=False)
    for col in ("host", "state", "ok", "changed", "failed", "unreachable", "skipped", "time"):
        recap.add_column(col, justify="left" if col in ("host", "state") else "right")
    for host, state in report.hosts.items():
        mine = [r for r in report.results if r.host == host]
        count = {s: sum(1 for r in mine if r.status == s) for s in ("ok", "changed", "failed", "skipped")}
        count["skipped"] += sum(1 for r in mine if r.status in ("stopped", "interrupted"))
        lost = sum(1 for r in mine if r.lost) or (1 if state == "unreachable" else 0)
        count["failed"] -= sum(1 for r in mine if r.lost)
        spans = [(r.started, r.ended) for r in mine if r.started and r.ended]
        took = max(e for _, e in spans) - min(s for s, _ in spans) if spans else 0.0

        def cell(n: int, style: str) -> Text:
            return Text(str(n), style=style if n else "dim")

        recap.add_row(
            Text(escape_controls(host), style="bold"),
            Text(SYMBOL.get(state, state), style=_STYLE.get(state, "")),
            cell(count["ok"], "green"),
            cell(count["changed"], "yellow"),
            cell(count["failed"], "bold red"),
            cell(lost, "bold red"),
            cell(count["skipped"], "cyan"),
            Text(fmt_seconds(took), style="dim"),
        )
    parts: list[Any] = [Text("recap", style="bold"), recap]
    if live is not None and live.stages:
        timing = Table(show_edge=False, pad_edge=False)
        timing.add_column("stage / phase")
        timing.add_column("host")
        timing.add_column("time", justify="right")
        for stage in dict.fromkeys(name for name, _ in live.stages):
            rows = [r for (st, _), r in live.rows.items() if st == stage]
            if not rows:
                continue
            took = max(r.ended or r.started for r in rows) - min(r.started for r in rows)
            timing.add_row(Text(escape_controls(stage)), Text(""), Text(fmt_seconds(took)))
            for t in live.timings:
                if t.stage == stage and t.phase != PHASES["ready"]:
                    timing.add_row(
                        Text("  " + escape_controls(t.phase), style="dim"),
                        Text(escape_controls(t.host)),
                        Text(fmt_seconds(t.seconds)),
                    )
        parts += [Text(""), Text("timings", style="bold"), timing]
    return Group(*parts)


def print_report(report: Report, details: str, live: LiveProgress, stream: TextIO | None = None) -> None:
    """The run's end on a terminal: the headline, the recap tables, then the plain details (errors, hints)."""
    from rich.console import Console
    from rich.text import Text

    console = Console(file=stream, highlight=False, markup=False, emoji=False)
    head = "done" if report.ok else "interrupted" if report.interrupted else "FAILED"
    style = "bold green" if report.ok else "bold red"
    with contextlib.suppress(OSError):
        console.print(Text(escape_controls(f"{report.runbook} on {report.cluster}: ")) + Text(head, style=style))
        console.print(render_recap(report, live))
        if details:  # soft_wrap: long lines (hints, commands) are left to the terminal, not cut into pieces
            console.print(Text(escape_controls(details)), soft_wrap=True)
