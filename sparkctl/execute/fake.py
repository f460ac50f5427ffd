"""Test doubles for the Transport seam: a transport that records commands, and a connect that fails."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sparkctl.errors import Problem, Unreachable
from sparkctl.execute.base import Result

# A function of the command line, or command prefixes -> answers (an exception instance is raised).
Responses = Callable[[str], Result] | Mapping[str, Result | BaseException] | None


@dataclass(frozen=True)
class Call:
    """One command a RecordingTransport was asked to run."""

    command: str
    stdin: str | None
    timeout: float


class RecordingTransport:
    """A Transport that records every call and answers from `responses` (default: exit 0, no output).

    With a mapping, the longest key that the command starts with wins.
    """

    def __init__(self, host: str = "fake", responses: Responses = None) -> None:
        self.host = host
        self.responses = responses
        self.calls: list[Call] = []
        self.closed = False

    @property
    def commands(self) -> list[str]:
        """The command lines run so far, in order."""
        return [c.command for c in self.calls]

    def run(
        self,
        command: str,
        *,
        stdin: str | None = None,
        timeout: float,
        on_output: Callable[[str], None] | None = None,
    ) -> Result:
        """Record the call and answer it."""
        self.calls.append(Call(command, stdin, timeout))
        if self.responses is None:
            return Result(0, "", "")
        if callable(self.responses):
            return self.responses(command)
        matches = [prefix for prefix in self.responses if command.startswith(prefix)]
        if not matches:
            return Result(0, "", "")
        answer = self.responses[max(matches, key=len)]
        if isinstance(answer, BaseException):
            raise answer
        if on_output is not None and answer.stdout:  # the whole output at once, as a fast command gives it
            on_output(answer.stdout)
        return answer

    def close(self) -> None:
        """Mark the transport closed."""
        self.closed = True


class FailingConnect:
    """Stands in for `ssh.connect`: the hosts in `unreachable` (all, if None) raise Unreachable.

    The others get a RecordingTransport answering from `responses`, kept in `.transports` by host name.
    """

    def __init__(
        self,
        unreachable: Iterable[str] | None = None,
        *,
        message: str = "connection refused",
        responses: Responses = None,
    ) -> None:
        self.unreachable = None if unreachable is None else set(unreachable)
        self.message = message
        self.responses = responses
        self.attempts: list[str] = []
        self.transports: dict[str, RecordingTransport] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> RecordingTransport:
        """Connect like `ssh.connect(host, settings)` or a runbook connector `(inventory, name)`."""
        name = next((a for a in args if isinstance(a, str)), None) or str(args[0].name)
        self.attempts.append(name)
        if self.unreachable is None or name in self.unreachable:
            raise Unreachable([Problem(name, f"cannot connect: {self.message}", "check that the host is up")])
        return self.transports.setdefault(name, RecordingTransport(name, self.responses))
