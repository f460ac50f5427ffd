"""What a run says and leaves: the events the engine emits while it runs (rendered by the CLI), and its Report
(per step: status, commands with their output, timings), which the session journals."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, Field

from sparkctl.plan.models import Step


@dataclass(frozen=True)
class Event:
    """Progress, for the CLI to render. The engine never prints."""

    kind: str  # stage | step_start | step_end | phase | progress | revised | note
    host: str = ""
    stage: str = ""
    step: str = ""
    status: str = ""
    message: str = ""
    elapsed: float = 0.0


class CommandRecord(BaseModel):
    """What one command did (output tails, secrets redacted)."""

    command: str
    exit_code: int
    duration: float
    stdout: str = ""
    stderr: str = ""


class StepResult(BaseModel):
    """The outcome of one step on one host."""

    host: str
    stage: str
    step: str
    kind: str
    changes: bool
    status: str  # ok | changed | failed | skipped | interrupted (Ctrl-C) | stopped (another host failed)
    started: float = 0.0
    ended: float = 0.0
    commands: list[CommandRecord] = Field(default_factory=list)
    error: str = ""
    log_tail: str = ""
    lost: bool = Field(False, description="the step failed because the host could not be reached any more")


class Report(BaseModel):
    """What a run did, per host and per step."""

    cluster: str
    runbook: str
    run_id: str = ""
    ok: bool = True
    interrupted: bool = False
    error: str = Field("", description="what ended the run if it was not a step (a bug, a force quit)")
    journal_error: str = Field("", description="why the run could not be journaled (the laptop's disk full)")
    hosts: dict[str, str] = Field(default_factory=dict)
    host_errors: dict[str, str] = Field(default_factory=dict)
    results: list[StepResult] = Field(default_factory=list)
    revisions: list[str] = Field(default_factory=list)
    rolled_back: list[str] = Field(default_factory=list, description="hosts whose uncommitted changes were undone")
    executed: list[Step] = Field(default_factory=list, description="the steps as they were run, in order")
