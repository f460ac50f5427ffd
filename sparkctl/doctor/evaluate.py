"""Evaluate the rule table: pure over facts and measured pings."""

from __future__ import annotations

from sparkctl.doctor.evaluators import EVALUATORS, CheckContext
from sparkctl.doctor.rules import Finding, load_rules


def evaluate(
    ctx: CheckContext, *, preflight_only: bool = False, categories: frozenset[str] | None = None
) -> list[Finding]:
    """Every rule's findings, in table order."""
    findings: list[Finding] = []
    for rule in load_rules().rules:
        if (preflight_only and not rule.preflight) or (categories and rule.category not in categories):
            continue
        findings += EVALUATORS[rule.check](ctx, rule)
    return findings


def blocking(findings: list[Finding], force: bool) -> list[Finding]:
    """Fail-level findings that stop `up` (with --force, only those that are unsafe to override)."""
    return [f for f in findings if f.level == "fail" and (not force or not f.force_ok)]
