"""The engine: applies a Plan stage by stage, hosts in parallel, stopping the cluster on the first failure."""

from __future__ import annotations

import shlex
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from sparkctl.errors import HostError
from sparkctl.execute.base import Result, Transport, Unreachable
from sparkctl.plan.models import Command, Plan, Stage, Step
from sparkctl.session.report import CommandRecord, Event, Report, StepResult
from sparkctl.session.secrets import Secrets

if TYPE_CHECKING:
    from sparkctl.execute.http import Probe


def remote_line(cmd: Command, nopasswd: bool, secrets: Secrets, blobs: Mapping[str, str]) -> tuple[str, str | None]:
    """The exact line sent to the host and its stdin: sudo password and secrets go on stdin, never in argv."""
    line = shlex.join(cmd.argv)
    data = cmd.stdin
    if cmd.stdin_secret:
        data = secrets.get(cmd.stdin_secret) + "\n"
    elif cmd.stdin_blob:
        data = blobs[cmd.stdin_blob]
    if cmd.sudo:
        if nopasswd:
            line = f"sudo -n -- {line}"
        else:
            line = f"sudo -k -S -p '' -- {line}"
            data = secrets.get("sudo_password") + "\n" + (data or "")
    return line, data


class _Stopped(Exception):
    """A wait ended early because the run is interrupted or stopping (not a failure of this step)."""

    def __init__(self, why: str, detail: str = "") -> None:
        super().__init__(why)
        self.why, self.detail = why, detail


def probe_workload(url: str, model: str, api_key: str | None, engine: str) -> Probe:
    """The HTTP readiness probe, imported on first use: urllib's HTTP stack is not needed to plan."""
    from sparkctl.execute.http import probe_workload as probe

    return probe(url, model, api_key, engine)


def _batches(steps: list[Step]) -> list[list[Step]]:
    """Consecutive read-only checks (no change, no operator prompt) form one batch; every other step is alone."""
    out: list[list[Step]] = []
    for step in steps:
        check = not step.changes and step.kind != "pause"
        if check and out and not out[-1][-1].changes and out[-1][-1].kind != "pause":
            out[-1].append(step)
        else:
            out.append([step])
    return out


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _what_changed(old: tuple[list[Command], str], new: tuple[list[Command], str], width: int = 160) -> str:
    """The first difference between two versions of a step, short enough for one line of a report."""
    if old[1] != new[1]:
        return f" (verdict {old[1]!r} -> {new[1]!r})"
    for i, (a, b) in enumerate(zip(old[0], new[0], strict=False)):
        if a == b:
            continue
        if a.render() != b.render():
            return f" (command {i + 1}: {a.render()[:width]!r} -> {b.render()[:width]!r})"
        was, now = (a.stdin or "").splitlines(), (b.stdin or "").splitlines()
        gone = [x for x in was if x not in now][:2]
        came = [x for x in now if x not in was][:2]
        return f" (command {i + 1} stdin: -{gone!r} +{came!r})"
    return f" ({len(old[0])} -> {len(new[0])} commands)"


@dataclass
class Engine:
    """Runs plans. Effects come in as arguments: transports, clock, sleep, HTTP probe, confirm."""

    transports: Mapping[str, Transport]
    nopasswd: Mapping[str, bool]
    secrets: Secrets = field(default_factory=Secrets)
    blobs: Mapping[str, str] = field(default_factory=dict)
    emit: Callable[[Event], None] = lambda e: None
    command_timeout: float = 120
    clock: Callable[[], float] = time.monotonic
    now: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    probe: Callable[[str, str, str | None, str], Probe] = probe_workload
    confirm: Callable[[str], bool] = lambda message: True
    keep_going: bool = False
    """A failed step does not stop the other hosts' steps of its stage (read-only measurements)."""
    output_lines: int = 20
    """How many trailing lines of each command's output the report keeps."""
    follow_logs: bool = False
    """While a workload is not ready, read its log each round and emit `progress` events for what it names."""
    _abort: threading.Event = field(default_factory=threading.Event)
    _open: dict[str, list[Step]] = field(default_factory=dict)
    """Per host, executed steps whose change awaits a commit (undone by their rollback if the run fails)."""
    _interrupted: threading.Event = field(default_factory=threading.Event)

    def run(
        self,
        plan: Plan,
        replan: Callable[[frozenset[str], int], Plan | None] | None = None,
        cleanup: Callable[[list[str]], list[Stage]] | None = None,
        report: Report | None = None,
    ) -> Report:
        """Apply `plan`. `replan(done_kinds, next_index)` re-plans the remaining stages from fresh facts.

        `report` (if given) is filled in place, so a caller still holds what was done if this raises.
        A host lost between stages (re-reading it fails) ends the run like a failed step, naming the host.
        """
        if report is None:
            report = Report(cluster=plan.cluster, runbook=plan.runbook)
        for h in plan.hosts:
            report.hosts.setdefault(h, "ok")
        stages = list(plan.stages)
        done: set[str] = set()
        i = 0
        try:
            while i < len(stages):
                stage = stages[i]
                results = self._run_stage(stage, report)
                failed = [r for r in results if r.status == "failed"]
                changed = {r.kind for r in results if r.status == "changed"}
                done |= changed
                if failed:
                    if stage.on_failure == "continue":
                        self.emit(Event("note", stage=stage.name, message="failure ignored (on_failure: continue)"))
                        self._abort.clear()
                    else:
                        if stage.on_failure not in ("stop", "") and cleanup is not None:
                            self._abort.clear()
                            try:
                                extras = cleanup(stage.on_failure.split(","))
                            except HostError as exc:
                                self._lost(exc, report)
                                extras = []
                            for extra in extras:
                                self._run_stage(extra, report, cleanup=True)
                        report.ok = False
                        break
                if changed and replan is not None and i + 1 < len(stages):
                    try:
                        fresh = replan(frozenset(done), i + 1)
                    except HostError as exc:
                        self._lost(exc, report)
                        break
                    if fresh is not None:
                        stages = self._revise(stages, i + 1, fresh, report)
                i += 1
        except KeyboardInterrupt:
            self._interrupted.set()
            self._abort.set()
            report.ok = False
            report.interrupted = True
        finally:
            if not report.ok and any(self._open.values()):
                self._roll_back(report)
            self._summarise(report)
        return report

    def _lost(self, exc: HostError, report: Report) -> None:
        """Re-reading the hosts failed between stages: the run stops there; name the hosts and why."""
        report.ok = False
        for p in exc.problems:
            host = p.where if p.where in report.hosts else ""
            if host:
                report.hosts[host] = "unreachable"
            key = host or p.where or "cluster"
            report.host_errors[key] = self.secrets.redact(
                "; ".join(x for x in (report.host_errors.get(key, ""), p.message) if x)
            )
        first = exc.problems[0] if exc.problems else None
        where = f"{first.where}: " if first and first.where else ""
        self.emit(Event("note", message=f"stopped: {where}{self.secrets.redact(first.message if first else '')}"))

    @staticmethod
    def _summarise(report: Report) -> None:
        for r in list(report.results):
            if r.status == "failed":
                report.ok = False  # `on_failure: continue` goes on, but the run still failed
                if r.lost:
                    report.hosts[r.host] = "unreachable"
                elif report.hosts.get(r.host) != "unreachable":
                    report.hosts[r.host] = "failed"
            elif r.status == "changed" and report.hosts.get(r.host) == "ok":
                report.hosts[r.host] = "changed"
        if report.host_errors:
            report.ok = False

    def _roll_back(self, report: Report) -> None:
        """Undo every uncommitted change, newest first per host, all hosts in parallel."""
        self._abort.clear()
        steps = []
        for host, opened in self._open.items():
            for step in reversed(opened):
                assert step.rollback is not None
                steps.append(
                    Step(
                        host=host,
                        kind="rollback",
                        target=step.id,
                        description=step.rollback.description or f"undo {step.id}",
                        commands=step.rollback.commands,
                        notes=[step.rollback.fallback] if step.rollback.fallback else [],
                    )
                )
        self._open.clear()
        self.emit(Event("note", message="the run failed before its changes were committed: rolling them back"))
        for res in self._run_stage(Stage(name="rollback", action="rollback", steps=steps), report, cleanup=True):
            note = next((s.notes[0] for s in steps if s.host == res.host and s.id == res.step and s.notes), "")
            if res.status == "failed" and note:
                res.error += f"; {note}"
        report.rolled_back = sorted({s.host for s in steps})

    def _track(self, host: str, step: Step, res: StepResult) -> None:
        """Remember a change awaiting its commit; forget the changes a successful commit step makes final."""
        if res.status == "changed" and step.rollback is not None:
            self._open.setdefault(host, []).append(step)
        elif res.status in ("ok", "changed"):
            opened = self._open.get(host, [])
            opened[:] = [s for s in opened if s.rollback is None or s.rollback.commit != step.kind]

    def _revise(self, stages: list[Stage], start: int, fresh: Plan, report: Report) -> list[Stage]:
        # Only what would run counts; notes and predictions may legitimately differ.
        old = {(st.name, s.host, s.id): (s.commands, s.verdict) for st in stages[start:] for s in st.steps}
        new = {(st.name, s.host, s.id): (s.commands, s.verdict) for st in fresh.stages for s in st.steps}
        diffs = []
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                what = "added" if key not in old else "dropped" if key not in new else "changed"
                line = f"{key[1]} {key[0]}/{key[2]}: {what} after re-reading the hosts"
                if key in old and key in new:
                    line += _what_changed(old[key], new[key])
                diffs.append(self.secrets.redact(line))
        if not diffs:
            return stages
        report.revisions += diffs
        for d in diffs:
            self.emit(Event("revised", message=d))
        return stages[:start] + list(fresh.stages)

    def _run_stage(self, stage: Stage, report: Report, cleanup: bool = False) -> list[StepResult]:
        self.emit(Event("stage", stage=stage.name, message=stage.action))
        by_host: dict[str, list[Step]] = {}
        for s in stage.steps:
            by_host.setdefault(s.host, []).append(s)
        results: list[StepResult] = []
        lock = threading.Lock()

        def one(host: str, step: Step) -> StepResult:
            if self._abort.is_set():
                return StepResult(
                    host=host, stage=stage.name, step=step.id, kind=step.kind, changes=step.changes, status="skipped"
                )
            res = self._run_step(stage.name, step)
            with lock:
                report.executed.append(step)
                if not cleanup:
                    self._track(host, step, res)
            if res.status == "failed" and not self.keep_going:
                self._abort.set()
            return res

        def host_worker(host: str, steps: list[Step]) -> None:
            for batch in _batches(steps):
                if len(batch) == 1:
                    done = [one(host, batch[0])]
                else:  # read-only checks of one host: side by side, each on its own channel of the connection
                    with ThreadPoolExecutor(max_workers=len(batch)) as checks:
                        done = list(checks.map(lambda st: one(host, st), batch))
                with lock:
                    results.extend(done)
                    report.results.extend(done)

        started: set[str] = set()
        finished = {h: threading.Event() for h in by_host}

        def run_host(host: str, steps: list[Step]) -> None:
            started.add(host)
            try:
                host_worker(host, steps)
            finally:
                finished[host].set()

        if by_host:
            with ThreadPoolExecutor(max_workers=len(by_host)) as pool:
                try:
                    futures = [pool.submit(run_host, h, steps) for h, steps in by_host.items()]
                    for f in futures:
                        f.result()
                except KeyboardInterrupt:
                    self._interrupted.set()
                    self._abort.set()  # waits end at their next poll; running commands finish, no new step starts
                    # Wait for the commands under way before the run goes on to its cleanup. Joining the pool is not
                    # enough: an interrupt landing inside submit() can leave a started thread the pool does not know.
                    # A host whose work starts after this point finds the abort set and runs nothing.
                    for host in list(started):
                        finished[host].wait()
                    raise
        return results

    def _run_step(self, stage: str, step: Step) -> StepResult:
        res = StepResult(
            host=step.host,
            stage=stage,
            step=step.id,
            kind=step.kind,
            changes=step.changes,
            status="ok",
            started=self.now(),
        )
        self.emit(
            Event(
                "step_start",
                host=step.host,
                stage=stage,
                step=self.secrets.redact(step.id),
                message=self.secrets.redact(step.description),
            )
        )
        t0 = self.clock()
        try:
            if step.verdict:
                raise HostError(step.verdict)
            if step.kind == "pause":
                if not self.confirm(step.description):
                    raise HostError("declined by the operator")
            elif step.wait is None:
                for cmd in step.commands:
                    self._run_command(step.host, cmd, res, check=True)
            elif step.wait.kind == "http":
                self._wait_http(stage, step, res, t0)
            else:
                self._wait_remote(stage, step, res, t0)
            res.status = "changed" if step.changes else "ok"
        except _Stopped as exc:
            res.status = "interrupted" if self._interrupted.is_set() else "stopped"
            res.error = f"{exc.why} after {self.clock() - t0:.1f}s" + (f" ({exc.detail})" if exc.detail else "")
        except HostError as exc:
            res.status = "failed"
            res.lost = isinstance(exc, Unreachable)
            res.error = self.secrets.redact("; ".join(p.message for p in exc.problems))
            if step.wait and step.wait.log and not res.lost:
                res.log_tail = self._log_tail(step.host, step.wait.log)
        res.ended = self.now()
        self.emit(
            Event(
                "step_end",
                host=step.host,
                stage=stage,
                step=self.secrets.redact(step.id),
                status=res.status,
                message=res.error or self.secrets.redact(step.description),
                elapsed=self.clock() - t0,
            )
        )
        return res

    def _run_command(self, host: str, cmd: Command, res: StepResult, check: bool) -> Result:
        line, data = remote_line(cmd, self.nopasswd.get(host, False), self.secrets, self.blobs)
        timeout = cmd.timeout or self.command_timeout
        if cmd.progress:
            result = self.transports[host].run(
                line, stdin=data, timeout=timeout, on_output=self._progress_reader(host, res, cmd.progress)
            )
        else:
            result = self.transports[host].run(line, stdin=data, timeout=timeout)
        res.commands.append(
            CommandRecord(
                command=self.secrets.redact(cmd.render()),
                exit_code=result.exit_code,
                duration=round(result.duration, 3),
                stdout=self.secrets.redact(_tail(result.stdout, self.output_lines)),
                stderr=self.secrets.redact(_tail(result.stderr, self.output_lines)),
            )
        )
        if check and not result.ok:
            detail = _tail(result.stderr or result.stdout, 5)
            raise HostError(self.secrets.redact(f"`{cmd.render()}` exited {result.exit_code}: {detail}"))
        return result

    def _progress_reader(self, host: str, res: StepResult, kind: str) -> Callable[[str], None]:
        """Emit `progress` events (at most one a second) from a long command's output as it arrives."""
        from sparkctl.session.logphase import PROGRESS_LABELS, CopyProgress

        reader = CopyProgress(kind, self.clock)
        label = PROGRESS_LABELS.get(res.kind, "working")

        def feed(text: str) -> None:
            said = reader.feed(text)
            if said is not None:
                message = self.secrets.redact(said)
                self.emit(Event("progress", host=host, stage=res.stage, step=res.step, status=label, message=message))

        return feed

    def _wait_remote(self, stage: str, step: Step, res: StepResult, t0: float) -> None:
        assert step.wait is not None
        while True:
            attempt = StepResult(host=step.host, stage=stage, step=step.id, kind=step.kind, changes=False, status="ok")
            try:
                for cmd in step.commands:
                    self._run_command(step.host, cmd, attempt, check=True)
                res.commands = attempt.commands
                return
            except HostError as exc:
                res.commands = attempt.commands
                self._check_abort()
                if self.clock() - t0 >= step.wait.deadline:
                    raise HostError(
                        f"not true after {step.wait.deadline:g}s: {step.description}; last: {exc}"
                    ) from None
            self.sleep(step.wait.interval)

    def _wait_http(self, stage: str, step: Step, res: StepResult, t0: float) -> None:
        wait = step.wait
        assert wait is not None
        key = self.secrets.get(wait.secret) if wait.secret else None
        engine = step.notes[0] if step.notes else "vllm"
        phase = ""
        phase_t = t0
        said: tuple[str, str] | None = None
        while True:
            p = self.probe(wait.url, wait.model, key, engine)
            p = replace(p, detail=self.secrets.redact(p.detail))
            if p.phase != phase:
                now = self.clock()
                if phase:
                    self.emit(
                        Event(
                            "phase",
                            host=step.host,
                            stage=stage,
                            step=step.id,
                            status=phase,
                            message=f"{phase} took {now - phase_t:.1f}s",
                            elapsed=now - phase_t,
                        )
                    )
                phase, phase_t = p.phase, now
                self.emit(Event("phase", host=step.host, stage=stage, step=step.id, status=phase, message=p.detail))
            if p.ready:
                return
            if self.follow_logs and wait.log:
                said = self._log_progress(stage, step, said)
            if p.phase == "broken":  # reported by the workload itself; it does not heal while waiting
                raise HostError(f"{wait.model} is broken: {p.detail}")
            if wait.alive is not None and p.phase != "ready":
                line, data = remote_line(wait.alive, self.nopasswd.get(step.host, False), self.secrets, self.blobs)
                if not self.transports[step.host].run(line, stdin=data, timeout=30).ok:
                    raise HostError(f"{wait.model} exited before it was ready (phase {phase}: {p.detail})")
            self._check_abort(f"phase {phase}")
            if self.clock() - t0 >= wait.deadline:
                raise HostError(f"{wait.model} not ready after {wait.deadline:g}s (phase {phase}: {p.detail})")
            self.sleep(wait.interval)

    def _log_progress(self, stage: str, step: Step, said: tuple[str, str] | None) -> tuple[str, str] | None:
        """Emit what the workload's log names now (phase, progress), when it differs from what was said."""
        from sparkctl.session.logphase import parse_log_phase

        assert step.wait is not None
        try:
            r = self.transports[step.host].run(f"tail -c 16384 -- {shlex.quote(step.wait.log)}", timeout=15)
        except HostError:
            return said
        now = parse_log_phase(r.stdout) if r.ok else None
        if now is not None and now != said:
            label, detail = now
            self.emit(
                Event(
                    "progress",
                    host=step.host,
                    stage=stage,
                    step=step.id,
                    status=label,
                    message=self.secrets.redact(detail),
                )
            )
            return now
        return said

    def _check_abort(self, detail: str = "") -> None:
        """End a wait at once when the run is interrupted or another host failed: say which, not a timeout."""
        if self._interrupted.is_set():
            raise _Stopped("interrupted", detail)
        if self._abort.is_set():
            raise _Stopped("stopped: a step failed on another host", detail)

    def _log_tail(self, host: str, path: str) -> str:
        try:
            r = self.transports[host].run(f"tail -n 30 {shlex.quote(path)}", timeout=15)
            return self.secrets.redact(r.stdout)
        except HostError:
            return ""
