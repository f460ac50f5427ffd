"""The error tree: every error a user can act on carries what happened and how to fix it."""

from __future__ import annotations

from dataclasses import dataclass

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Problem:
    """One actionable finding: where, what is wrong, and the fix."""

    where: str
    message: str
    hint: str = ""

    def render(self) -> str:
        text = f"error: {self.where}: {self.message}" if self.where else f"error: {self.message}"
        return f"{text}\nhint: {self.hint}" if self.hint else text


class SparkctlError(Exception):
    """Base of every error sparkctl reports without a traceback."""

    exit_code = EXIT_FAILED

    def __init__(self, problems: list[Problem] | str, hint: str = "") -> None:
        if isinstance(problems, str):
            problems = [Problem("", problems, hint)]
        elif hint:
            problems = [
                *problems[:-1],
                Problem(problems[-1].where, problems[-1].message, "; ".join(x for x in (problems[-1].hint, hint) if x)),
            ]
        self.problems = problems
        super().__init__("\n".join(p.render() for p in problems))


class InputError(SparkctlError):
    """Bad input: inventory, runbook, options. Nothing has run on any host."""

    exit_code = EXIT_BAD_INPUT


class InventoryError(InputError):
    """The inventory file is invalid."""


class PlanError(InputError):
    """The inventory cannot be applied to these hosts as they are (e.g. it would cut the SSH session)."""


class HostError(SparkctlError):
    """A host was unreachable or a command on it failed."""


class Unreachable(HostError):
    """A host could not be connected to or probed (network, auth, or host key)."""


class StateError(SparkctlError):
    """The laptop's state directory could not be written (a full disk, a read-only filesystem)."""


class SecretError(InputError):
    """A secret needed for the run is missing."""
