"""The live view: recorded engine event streams replayed into the renderer, the recap, escaping, log phases."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from sparkctl.cli.live import PHASES, LiveProgress, fmt_seconds, print_report, render_recap
from sparkctl.cli.render import Progress, render_report_details
from sparkctl.execute.base import Result
from sparkctl.execute.fake import RecordingTransport
from sparkctl.execute.http import Probe
from sparkctl.plan.models import Plan, Stage, Step, Wait
from sparkctl.session import door
from sparkctl.session.engine import Engine
from sparkctl.session.logphase import parse_log_phase
from sparkctl.session.report import Event, Report, StepResult
from sparkctl.session.secrets import Secrets

EVENTS = Path(__file__).parent / "fixtures" / "events"


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def recorded(name: str) -> list[tuple[float, Event]]:
    out = []
    for line in (EVENTS / name).read_text().splitlines():
        d = json.loads(line)
        t = d.pop("t")
        out.append((t, Event(**d)))
    return out


def console(width: int = 110) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=width, color_system=None, highlight=False, markup=False, emoji=False), buf


def replay(stream: list[tuple[float, Event]], until: float | None = None) -> tuple[LiveProgress, io.StringIO, Clock]:
    con, buf = console()
    clock = Clock()
    view = LiveProgress(console=con, clock=clock)
    for t, e in stream:
        if until is not None and t > until:
            break
        clock.t = t
        view(e)
    return view, buf, clock


def report_of(stream: list[tuple[float, Event]], cluster: str = "testbed", runbook: str = "up") -> Report:
    """The Report the engine built for the same run (each step_end is one StepResult)."""
    starts: dict[tuple[str, str, str], float] = {}
    report = Report(cluster=cluster, runbook=runbook)
    for t, e in stream:
        if e.kind == "step_start":
            starts[(e.host, e.stage, e.step)] = t
        elif e.kind == "step_end":
            report.hosts.setdefault(e.host, "ok")
            report.results.append(
                StepResult(
                    host=e.host,
                    stage=e.stage,
                    step=e.step,
                    kind=e.step.split(":")[0],
                    changes=e.status == "changed",
                    status=e.status,
                    started=1000 + starts[(e.host, e.stage, e.step)],
                    ended=1000 + t,
                )
            )
            if e.status == "changed" and report.hosts[e.host] == "ok":
                report.hosts[e.host] = "changed"
    return report


def text(renderable: Any, width: int = 110) -> str:
    con, buf = console(width)
    con.print(renderable)
    return buf.getvalue()


def test_up_stream_prints_each_finished_stage_once_with_one_line_per_host() -> None:
    stream = recorded("up-embed-testbed.jsonl")
    view, buf, _ = replay(stream)
    view.stop()
    out = buf.getvalue()
    stages = [e.stage for _, e in stream if e.kind == "stage"]
    hosts_of = {st: {e.host for _, e in stream if e.kind == "step_start" and e.stage == st} for st in stages}
    for st in stages:
        title = f"== {st}\n"
        assert out.count(title) == (1 if hosts_of[st] else 0), st
        if not hosts_of[st]:
            continue
        block = out.split(title, 1)[1].split("== ", 1)[0]
        lines = [ln for ln in block.splitlines() if ln.strip()]
        assert sorted(ln.split()[1] for ln in lines) == sorted(hosts_of[st]), (st, lines)
        assert all(ln.startswith("✓ ") for ln in lines), lines
    fabric = out.split("== fabric\n", 1)[1].splitlines()
    assert any(re.match(r"^✓ spark-a +\d+\.\ds 5 changed$", ln) for ln in fabric[:2]), fabric[:2]


def test_mid_wait_the_live_line_shows_spinner_step_phase_and_elapsed() -> None:
    stream = recorded("up-embed-testbed.jsonl")
    progress_at = next(t for t, e in stream if e.kind == "progress")
    view, _, clock = replay(stream, until=progress_at)
    clock.t = progress_at + 4.0
    screen = text(view.render_current())
    lines = screen.splitlines()
    assert lines[0] == "== ready"
    (row,) = [ln for ln in lines[1:] if ln.strip()]
    assert row[0] in "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"  # rich's "dots" spinner
    assert "spark-a" in row and "embed answers at http://" in row and "loading weights" in row
    started = next(t for t, e in stream if e.kind == "step_start" and e.stage == "ready")
    assert f" {fmt_seconds(progress_at + 4.0 - started)} embed answers at" in row


def test_recap_counts_per_host_and_phase_timings() -> None:
    stream = recorded("up-embed-testbed.jsonl")
    view, _, _ = replay(stream)
    view.stop()
    report = report_of(stream)
    out = text(render_recap(report, view), width=100)
    rows = {ln.split()[0]: ln.replace("│", " ").split() for ln in out.splitlines() if ln.startswith("spark-")}
    for host in ("spark-a", "spark-b"):
        mine = [r for r in report.results if r.host == host]
        ok = sum(r.status == "ok" for r in mine)
        changed = sum(r.status == "changed" for r in mine)
        assert rows[host][1:7] == ["changed", str(ok), str(changed), "0", "0", "0"], rows[host]
    # the wait's phases as the probe and the log named them, each timed from the recorded arrivals
    down = next(t for t, e in stream if e.kind == "phase" and e.status == "down" and "took" not in e.message)
    loading = next(t for t, e in stream if e.kind == "phase" and e.status == "loading")
    timing = [ln for ln in out.splitlines() if PHASES["down"] in ln]
    assert len(timing) == 1 and timing[0].rstrip().endswith(fmt_seconds(loading - down))
    assert any("loading weights" in ln for ln in out.splitlines())
    assert PHASES["ready"] not in out  # the end state is not a phase that took time


def test_down_stream_and_a_failed_host_in_the_recap() -> None:
    stream = recorded("down-testbed.jsonl")
    view, buf, _ = replay(stream)
    view.stop()
    assert "== strays" not in buf.getvalue()  # nothing to do on any host: no empty title
    report = report_of(stream, runbook="down")
    report.hosts["spark-b"] = "unreachable"
    report.results.append(
        StepResult(host="spark-b", stage="ray", step="x", kind="x", changes=True, status="failed", lost=True)
    )
    out = text(render_recap(report, view))
    row = next(ln for ln in out.splitlines() if ln.startswith("spark-b"))
    assert row.replace("│", " ").split()[1:7] == ["UNREACHABLE", "1", "1", "0", "1", "0"]


def test_failure_line_and_details_after_the_recap() -> None:
    con, buf = console()
    clock = Clock()
    view = LiveProgress(console=con, clock=clock)
    view(Event("stage", stage="fabric", message="fabric"))
    view(Event("step_start", host="spark-a", stage="fabric", step="fabric_profile:x", message="profile x"))
    clock.t = 2.5
    message = "boom\nnmcli: Error: a second line"
    view(Event("step_end", host="spark-a", stage="fabric", step="fabric_profile:x", status="failed", message=message))
    view.stop()
    assert buf.getvalue() == "== fabric\n✗ spark-a   2.5s 1 FAILED: boom\n"
    report = Report(cluster="c", runbook="up", ok=False, hosts={"spark-a": "failed"})
    report.results.append(
        StepResult(
            host="spark-a",
            stage="fabric",
            step="fabric_profile:x",
            kind="k",
            changes=True,
            status="failed",
            error="boom",
        )
    )
    out = io.StringIO()
    print_report(report, "\n".join(render_report_details(report)), view, stream=out)
    shown = out.getvalue()
    assert shown.startswith("up on c: FAILED")
    assert "error: spark-a fabric/fabric_profile:x: boom" in shown
    assert shown.index("recap") < shown.index("error: spark-a")


def test_host_text_cannot_style_or_move_the_terminal() -> None:
    con, buf = console()
    view = LiveProgress(console=con, clock=Clock())
    nasty = "[bold red]x[/] \x1b[2J\x1b]0;title\x07 \u202eevil \r"
    view(Event("stage", stage="s"))
    view(Event("step_start", host="spark-a", stage="s", step="k", message=nasty))
    assert "[bold red]x[/]" in text(view.render_current())
    view(Event("step_end", host="spark-a", stage="s", step="k", status="failed", message=nasty))
    view(Event("note", message=nasty))
    view.stop()
    out = buf.getvalue()
    assert "\x1b" not in out and "\u202e" not in out and "\r" not in out and "\x07" not in out
    assert "\\u001b[2J" in out and "\\u202e" in out and "[bold red]x[/]" in out


def test_plain_lines_ignore_log_progress() -> None:
    out = io.StringIO()
    p = Progress(out)
    p(Event("progress", host="spark-a", stage="ready", step="w", status="loading weights", message="1/2 (50%)"))
    p(Event("phase", host="spark-a", stage="ready", step="w", status="down", message="refused"))
    assert out.getvalue() == "   spark-a: w phase down: refused\n"


def test_paused_stops_and_resumes_the_live_region() -> None:
    con = Console(file=io.StringIO(), force_terminal=True, width=80)
    view = LiveProgress(console=con, clock=Clock())
    view.start()
    assert view._live is not None
    with view.paused():
        assert view._live is None
    assert view._live is not None
    view.stop()
    assert view._live is None


# --- what a workload's log says (formats copied from the upstream sources named in sparkctl/session/logphase.py)

VLLM_LOG = (
    "INFO 11-30 13:00:01 [ray_utils.py:607] No current placement group found. Creating a new placement group.\n"
    "Loading safetensors checkpoint shards:   0% Completed | 0/5 [00:00<?, ?it/s]\n"
    "\rLoading safetensors checkpoint shards:  60% Completed | 3/5 [00:41<00:27, 13.8s/it]\n"
)


@pytest.mark.parametrize(
    ("log", "want"),
    [
        ("", None),
        ("INFO nothing to see\n", None),
        (VLLM_LOG, ("loading weights", "3/5 (60%)")),
        (VLLM_LOG + "INFO [default_loader.py:502] Loading weights took 69.10 seconds\n", ("weights loaded", "")),
        (
            VLLM_LOG + "Capturing CUDA graphs (mixed prefill-decode, PIECEWISE):  40%|████      | 20/51 [00:02<00:03]",
            ("graph capture", "20/51 (40%)"),
        ),
        ("INFO [gpu_model_runner.py:6582] Graph capturing finished in 301 secs, took 1.20 GiB\n", ("engine ready", "")),
        ("INFO [entry.py:140] Starting vLLM server on http://0.0.0.0:8000\n", ("starting the API server", "")),
        ('INFO embed[1]: reserving 2 bundles {"GPU": 1.0} with strategy STRICT_SPREAD\n', ("Ray placement", "")),
        (
            "INFO embed[1]: placement group ready\nINFO embed[1]: loading weights (1 group(s) of tp=2)\n",
            ("loading weights", ""),
        ),
    ],
)
def test_parse_log_phase(log: str, want: tuple[str, str] | None) -> None:
    assert parse_log_phase(log) == want


def _wait_step() -> Step:
    return Step(
        host="spark-a",
        kind="verify_workload",
        target="chat",
        description="chat answers",
        changes=False,
        notes=["vllm"],
        wait=Wait(
            kind="http",
            deadline=600,
            interval=5,
            url="http://10.0.0.11:8000",
            model="chat",
            secret="api_key:chat",
            log="/home/u/.local/state/sparkctl/logs/chat.log",
        ),
    )


@pytest.mark.parametrize("follow", [True, False])
def test_engine_reads_the_log_for_progress_only_when_asked(follow: bool) -> None:
    logs = iter([VLLM_LOG, VLLM_LOG, VLLM_LOG + "INFO [default_loader.py:502] Loading weights took 69.10 seconds\n"])
    t = RecordingTransport("spark-a", lambda cmd: Result(0, next(logs) if cmd.startswith("tail -c") else "", ""))
    phases = iter(["down", "down", "down", "ready"])
    clock = Clock()
    events: list[Event] = []
    eng = Engine(
        transports={"spark-a": t},
        nopasswd={"spark-a": True},
        secrets=Secrets({"api_key:chat": "sk-key-1234"}),
        emit=events.append,
        clock=clock,
        now=clock,
        sleep=lambda s: setattr(clock, "t", clock.t + s),
        probe=lambda *a: Probe(next(phases), "detail sk-key-1234"),
        follow_logs=follow,
    )
    plan = Plan(
        cluster="c", runbook="up", hosts=["spark-a"], stages=[Stage(name="ready", action="r", steps=[_wait_step()])]
    )
    assert eng.run(plan).ok
    progress = [(e.status, e.message) for e in events if e.kind == "progress"]
    reads = [c for c in t.commands if c.startswith("tail -c")]
    if follow:
        assert reads == ["tail -c 16384 -- /home/u/.local/state/sparkctl/logs/chat.log"] * 3
        # the second read said the same: no event
        assert progress == [("loading weights", "3/5 (60%)"), ("weights loaded", "")]
    else:
        assert reads == [] and progress == []
    # the probe's detail goes through the same redaction as every other event text
    assert next(e.message for e in events if e.kind == "phase") == "detail <redacted>"
    assert all("sk-key-1234" not in e.message for e in events)


def test_events_while_the_live_region_redraws_never_deadlock() -> None:
    """rich's refresh thread holds Live's lock while it asks for the picture: events must not wait on it."""
    import threading

    stream = recorded("up-embed-testbed.jsonl")
    con = Console(file=io.StringIO(), force_terminal=True, width=100)
    view = LiveProgress(console=con)
    view.start()

    def feed(host: str) -> None:
        for _ in range(20):
            for _, e in stream:
                if e.host in (host, ""):
                    view(e)

    threads = [threading.Thread(target=feed, args=(h,), daemon=True) for h in ("spark-a", "spark-b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    stopper = threading.Thread(target=view.stop, daemon=True)
    stopper.start()
    stopper.join(timeout=30)
    assert not any(t.is_alive() for t in [*threads, stopper]), "the live view deadlocked"


PROBE_OK = "@@sparkctl identity\nspark\n/home/spark\nspark-x\n@@sparkctl end\n"
EXAMPLE = Path(__file__).resolve().parents[2] / "inventories" / "example-pair.yaml"


@pytest.mark.parametrize("plain", [False, True])
def test_down_through_the_cli_ends_with_the_recap_or_the_plain_report(
    isolated_state: Path, mocker: Any, plain: bool
) -> None:
    """The CLI wiring: live (as on a terminal) ends with the recap naming the lost host; --plain keeps the report."""
    from typer.testing import CliRunner

    from sparkctl.cli.app import app
    from sparkctl.execute.fake import FailingConnect

    lost = FailingConnect(unreachable=["spark-b"], message="Connection refused")
    took_lock = Result(0, "@@sparkctl-lock taken\n", "")
    spark_a = RecordingTransport("spark-a", {"sh -s": Result(0, PROBE_OK, ""), "t=$(mktemp": took_lock})

    def ssh_connect(accept_new_host_keys: bool) -> Any:
        return lambda host, settings: spark_a if host.name == "spark-a" else lost(host, settings)

    mocker.patch.object(door, "CONNECTOR", side_effect=ssh_connect)
    mocker.patch("sparkctl.cli.common.live_wanted", side_effect=lambda plain, as_json: not plain and not as_json)
    args = ["down", "-i", str(EXAMPLE)] + (["--plain"] if plain else [])
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1, r.output
    assert len(spark_a.commands) > 3, spark_a.commands  # lock, facts, then down's steps ran on spark-a
    if plain:
        assert "recap" not in r.stdout and "  spark-b: UNREACHABLE" in r.stdout
        assert "== check" in r.stderr and "   spark-a: verify_clean" in r.stderr
    else:
        out = r.stdout
        assert "\ndown on spark-pair: FAILED\nrecap\n" in out
        row = next(ln for ln in out.splitlines() if ln.startswith("spark-b"))
        assert row.replace("│", " ").split()[1] == "UNREACHABLE" and row.replace("│", " ").split()[5] == "1"
        assert "error: spark-b: " in out and "Connection refused" in out  # the details follow the recap
        assert "== check\n✓ spark-a " in r.stderr and "   spark-a: " not in r.stderr
