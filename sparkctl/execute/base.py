"""The Transport seam: run one command line on one host, with optional stdin and a timeout."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sparkctl.errors import HostError, Unreachable
from sparkctl.inventory.models import SshOverride, SshSettings

__all__ = ["CommandTimeout", "Connect", "Endpoint", "Result", "Transport", "Unreachable"]


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


class CommandTimeout(HostError):
    """A command did not finish in time (the host stopped it, or its session was closed)."""


class Transport(Protocol):
    """One connection to one host, reused for every command of a run."""

    host: str

    def run(
        self,
        command: str,
        *,
        stdin: str | None = None,
        timeout: float,
        on_output: Callable[[str], None] | None = None,
    ) -> Result:
        """Run a shell command line (already quoted) on the host; feed `stdin`, then close it. `on_output`, when
        given, sees the command's stdout as it arrives (a long copy's progress), besides the Result."""
        ...

    def close(self) -> None:
        """Close the connection."""
        ...


class Endpoint(Protocol):
    """What connecting to a host needs: a name for messages, its address, and its own SSH overrides.

    An inventory `Host` is one; so is a host known only by its address (`sparkctl discover`).
    """

    @property
    def name(self) -> str: ...

    @property
    def address(self) -> str: ...

    @property
    def ssh(self) -> SshOverride: ...


# The one seam through which sparkctl reaches a host: the session is given one of these.
Connect = Callable[[Endpoint, SshSettings], Transport]
