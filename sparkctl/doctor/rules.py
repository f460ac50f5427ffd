"""The rule table and the findings it yields."""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

Level = Literal["pass", "warn", "fail"]


class Rule(BaseModel):
    """One piece of knowledge: what to check, how bad a violation is, why, the fix, and where it comes from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    category: Literal["host", "gpu", "fabric", "memory", "flags", "ray"]
    check: str
    level: Literal["warn", "fail"]
    preflight: bool = False
    force_ok: bool = True
    args: dict[str, Any] = Field(default_factory=dict)
    why: str
    fix: str
    source: str


class RuleTable(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int
    rules: list[Rule]


class Finding(BaseModel):
    """The result of one rule on one subject (a host, a link, a workload, or the cluster)."""

    model_config = ConfigDict(frozen=True)

    rule: str
    category: str = ""
    level: Level
    subject: str
    evidence: str
    fix: str = ""
    why: str = ""
    source: str = ""
    preflight: bool = False
    force_ok: bool = True


@cache
def load_rules() -> RuleTable:
    """The table shipped in the package."""
    text = resources.files("sparkctl").joinpath("data/rules.yaml").read_text()
    # The bundled table needs no line numbers: libyaml's safe loader when PyYAML has it (several times faster).
    return RuleTable.model_validate(yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))
