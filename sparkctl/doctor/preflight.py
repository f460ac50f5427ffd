"""The preflight that guards `up`: the table's preflight rules, before anything changes."""

from __future__ import annotations

from sparkctl.doctor.evaluate import blocking, evaluate
from sparkctl.doctor.evaluators import CheckContext
from sparkctl.doctor.rules import Finding
from sparkctl.errors import HostError, Problem


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
