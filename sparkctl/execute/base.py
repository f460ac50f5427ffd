"""The Transport seam: run one command line on one host, with optional stdin and a timeout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from sparkctl.errors import HostError


@dataclass(frozen=True)
class Result:
    """What one command did."""

    exit_code: int
    stdout: str
    stderr: str
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class Unreachable(HostError):
    """A host could not be connected to (network, auth, or host key)."""


class CommandTimeout(HostError):
    """A command did not finish in time (the host stopped it, or its session was closed)."""


class Transport(Protocol):
    """One connection to one host, reused for every command of a run."""

    host: str

    def run(self, command: str, *, stdin: str | None = None, timeout: float) -> Result:
        """Run a shell command line (already quoted) on the host; feed `stdin`, then close it."""
        ...

    def close(self) -> None:
        """Close the connection."""
        ...
