"""What every evaluator shares: `CheckContext`, the registry (`@evaluator`, `EVALUATORS`), the finding helpers."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from sparkctl.doctor.rules import Finding, Level, Rule
from sparkctl.errors import Problem
from sparkctl.facts.models import HostFacts
from sparkctl.inventory.models import Host, Inventory


@dataclass(frozen=True)
class CheckContext:
    """What checks look at: the inventory, facts per host, and jumbo-ping outcomes per link direction."""

    inventory: Inventory
    facts: Mapping[str, HostFacts]
    pings: Mapping[tuple[str, str, str], tuple[bool, str]] = field(default_factory=dict)
    """(host, interface, peer address) -> (crossed?, output tail)."""
    unreachable: Mapping[str, Sequence[Problem]] = field(default_factory=dict)
    """Hosts that could not be read (no facts), with why: the other rules judge the hosts that were."""


Evaluator = Callable[[CheckContext, Rule], list[Finding]]
EVALUATORS: dict[str, Evaluator] = {}


def evaluator(name: str) -> Callable[[Evaluator], Evaluator]:
    """Registers the decorated function as the evaluator of the rules whose `check` is `name`."""

    def register(fn: Evaluator) -> Evaluator:
        EVALUATORS[name] = fn
        return fn

    return register


def _f(
    rule: Rule, ok: bool | None, subject: str, evidence: str, level: Level | None = None, fix: str | None = None
) -> Finding:
    lvl: Level = "pass" if ok else (level or rule.level)
    return Finding(
        rule=rule.id,
        category=rule.category,
        level=lvl,
        subject=subject,
        evidence=evidence,
        fix="" if ok else (fix or rule.fix),
        why=rule.why,
        source=rule.source,
        preflight=rule.preflight,
        force_ok=rule.force_ok,
    )


def _probed(ctx: CheckContext) -> list[tuple[Host, HostFacts]]:
    """Inventory hosts with their facts, in inventory order (hosts without facts are left out)."""
    return [(h, ctx.facts[h.name]) for h in ctx.inventory.hosts if h.name in ctx.facts]


def _hosts(ctx: CheckContext) -> list[tuple[str, HostFacts]]:
    return [(h.name, f) for h, f in _probed(ctx)]
