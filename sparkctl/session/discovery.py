"""Discovery: a read-only session with hosts that have no inventory yet (`sparkctl discover`)."""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sparkctl.errors import HostError, InputError, Problem
from sparkctl.execute.base import Connect, Transport
from sparkctl.inventory.models import HostAddress, SshOverride, SshSettings
from sparkctl.plan.models import Command, Step
from sparkctl.session.engine import Engine
from sparkctl.session.session import read_plan, run_read, silent


class Target(BaseModel):
    """A host known only by its address (`discover`): what connecting needs, nothing more."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    address: HostAddress
    ssh: SshOverride = Field(default_factory=SshOverride)


def targets_of(addresses: list[str]) -> list[Target]:
    """The hosts to discover, each address validated (InputError naming every bad one, before any connection)."""
    targets = []
    problems = []
    for addr in addresses:
        try:
            targets.append(Target(name=addr, address=addr))
        except ValidationError as exc:
            problems += [
                Problem(addr, e["msg"].removeprefix("Value error, "), "give a host name or an IP address")
                for e in exc.errors()
            ]
    if problems:
        raise InputError(problems)
    return targets


@dataclass
class Discovery:
    """A read-only session with hosts that have no inventory yet: connect, run one probe script, close."""

    addresses: list[str]
    settings: SshSettings
    connect: Connect

    def probe(self, script: str, timeout: float = 60) -> dict[str, str]:
        """Each host's output of `script` (run by `sh -s`), by address; HostError names every host that failed."""
        targets = targets_of(self.addresses)
        problems: list[Problem] = []
        transports: dict[str, Transport] = {}

        def conn(target: Target) -> None:
            try:
                transports[target.name] = self.connect(target, self.settings)
            except HostError as exc:
                problems.extend(exc.problems)

        try:
            with ThreadPoolExecutor(max_workers=max(1, len(targets))) as pool:
                list(pool.map(conn, targets))
            steps = [
                Step(
                    host=t.name,
                    kind="discover",
                    description="read-only discovery probe",
                    changes=False,
                    commands=[Command(argv=["sh", "-s"], stdin=script, timeout=timeout)],
                )
                for t in targets
                if t.name in transports
            ]
            engine = Engine(transports=transports, nopasswd={}, emit=silent, keep_going=True, output_lines=10**6)
            report = run_read(engine, read_plan("discover", "discover", steps)) if steps else None
        finally:
            for t in transports.values():
                with contextlib.suppress(Exception):
                    t.close()
        if problems:
            raise HostError(problems)
        outputs: dict[str, str] = {}
        for r in report.results if report else []:
            if not r.commands:
                problems.append(Problem(r.host, r.error))
            outputs[r.host] = r.commands[-1].stdout if r.commands else ""
        if problems:
            raise HostError(problems)
        return {a: outputs[a] for a in self.addresses}
