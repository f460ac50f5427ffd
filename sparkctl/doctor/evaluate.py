"""Evaluate the rule table: pure over facts and measured pings; the preflight that guards `up`."""

from __future__ import annotations

from sparkctl.doctor.evaluators import EVALUATORS, CheckContext
from sparkctl.doctor.rules import Finding, load_rules
from sparkctl.errors import HostError, Problem


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


def preflight(ctx: CheckContext, force: bool) -> tuple[list[Finding], HostError | None]:
    """The preflight rules before `up` changes anything: (findings to warn about, the error that stops the run).

    Fail-level findings stop the run (nothing is changed); --force overrides those that are safe to override.
    """
    findings = evaluate(ctx, preflight_only=True)
    stop = blocking(findings, force)
    warnings = [f for f in findings if f.level != "pass" and f not in stop]
    if not stop:
        return warnings, None
    problems = [
        Problem(
            f"{f.subject} [{f.rule}]", f.evidence, f.fix + ("" if f.force_ok else " (--force cannot override this)")
        )
        for f in stop
    ]
    return warnings, HostError(problems, hint="nothing was changed")
