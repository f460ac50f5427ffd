"""The plan: pure data. Per stage, per host, the steps that would change something and their exact commands."""

from __future__ import annotations

import shlex
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Data(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Command(_Data):
    """One command line run on a host, exactly as the plan shows it."""

    argv: list[str]
    sudo: bool = False
    stdin: str | None = Field(None, description="content fed on stdin (shown in the step's diff)")
    stdin_secret: str | None = Field(None, description="name of a secret the engine feeds on stdin; never its value")
    stdin_blob: str | None = Field(
        None, description="name of a large non-secret file fed on stdin (digest in the diff)"
    )
    timeout: float | None = None
    progress: Literal["", "rsync", "bytes"] = Field(
        "",
        description="its output shows progress the live view follows: rsync's --info=progress2 lines, or "
        "`progress <done> <total>` lines (sparkctl's weights helper)",
    )

    def render(self) -> str:
        """The command as a person reads it (and as it is sent, before sudo/stdin handling)."""
        text = ("sudo " if self.sudo else "") + shlex.join(self.argv)
        if self.stdin_secret:
            text += f"  < secret:{self.stdin_secret}"
        elif self.stdin_blob:
            text += f"  < {self.stdin_blob}"
        elif self.stdin is not None:
            text += "  < stdin"
        return text


def sh(line: str, *, stdin: str | None = None, stdin_secret: str | None = None) -> Command:
    """A shell line (built from quoted, validated values) run by `sh -c`."""
    return Command(argv=["sh", "-c", line], stdin=stdin, stdin_secret=stdin_secret)


class Wait(_Data):
    """A readiness condition the engine polls after the step's commands, until a deadline."""

    kind: str = Field(description="'remote' (re-run the step's commands until they succeed) or 'http'")
    deadline: float = Field(description="seconds")
    interval: float = 1.0
    url: str = ""
    model: str = ""
    secret: str | None = Field(None, description="secret holding the API key for HTTP probes")
    log: str = Field("", description="host log to show when the deadline passes")
    alive: Command | None = Field(None, description="checked each round on the host: failing ends the wait at once")


class Rollback(_Data):
    """How the engine undoes a step's change on its host when the run fails before a later step commits it."""

    commands: list[Command] = Field(description="run on the host, in order, if the run fails or is interrupted")
    commit: str = Field(description="kind of the later step on the same host after which the change is final")
    description: str = ""
    fallback: str = Field("", description="what undoes the change when the engine cannot reach the host")


class Step(_Data):
    """One thing to ensure on one host."""

    host: str
    kind: str = Field(description="what the step ensures, e.g. fabric_profile")
    target: str = Field("", description="what it acts on, e.g. an interface or workload name")
    description: str
    commands: list[Command] = Field(default_factory=list)
    diff: list[str] = Field(default_factory=list, description="'- before' / '+ after' lines")
    changes: bool = Field(True, description="False for read-only checks")
    depends_on_earlier: bool = Field(False, description="its content was predicted from an earlier step's effect")
    notes: list[str] = Field(default_factory=list)
    wait: Wait | None = None
    verdict: str = Field("", description="a check already failed from the facts: the engine fails the step with this")
    rollback: Rollback | None = Field(None, description="undo on failure, until a later step commits the change")

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.target}" if self.target else self.kind


class Stage(_Data):
    """One runbook step expanded to its per-host steps. Hosts run a stage in parallel; stages run in order."""

    name: str
    action: str
    steps: list[Step] = Field(default_factory=list)
    on_failure: str = "stop"

    def for_host(self, host: str) -> list[Step]:
        return [s for s in self.steps if s.host == host]


class Plan(_Data):
    """What a runbook would do to a cluster, given the facts gathered."""

    cluster: str
    runbook: str
    hosts: list[str]
    stages: list[Stage] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    offline: bool = False

    @property
    def changes(self) -> int:
        """How many steps would change something."""
        return sum(1 for st in self.stages for s in st.steps if s.changes)

    def steps_for(self, host: str) -> list[Step]:
        """All steps of one host, in order."""
        return [s for st in self.stages for s in st.steps if s.host == host]
