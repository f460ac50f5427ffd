"""Runbook files: named, parameterised, ordered steps that each name a built-in action."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from sparkctl.errors import InputError
from sparkctl.inventory.models import PlainName, invalid

_WHEN = re.compile(r"^\s*(?:(not)\s+)?([A-Za-z_]\w*)\s*(?:(==|!=)\s*(\S+?))?\s*$")


def parse_when(expr: str) -> tuple[bool, str, str | None, str | None] | None:
    """`not p` / `p` / `p == v` / `p!=v` -> (negated, param, operator, value); None if not of these forms."""
    m = _WHEN.match(expr)
    if m is None or (m.group(1) and m.group(3)):
        return None
    value = m.group(4)
    if value is not None and len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]
    return bool(m.group(1)), m.group(2), m.group(3), value


class RunbookError(InputError):
    """A runbook file is invalid."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class Parameter(_Model):
    """A runbook parameter, overridable with `--set name=value`."""

    default: Any = None
    description: str = ""
    secret: bool = Field(False, description="redacted in the journal and in output")
    required: bool = Field(False, description="the run needs a value (`--set name=value`)")
    raw: bool = Field(
        False,
        description="inside a longer string of a `shell: true` step's argv, inserted as text, not shell-quoted: "
        "whoever sets it may run any shell code on the hosts",
    )


class RunbookStep(_Model):
    """One step: an action from the library, where it runs, when, and what a failure does."""

    name: PlainName = Field(description="Step name (for --from / --only and on_failure).")
    action: str = Field(description="Built-in action (`sparkctl runbook actions` lists them).")
    args: dict[str, Any] = Field(default_factory=dict, description="Action arguments; '${param}' is substituted.")
    hosts: PlainName = Field("all", description="'all', 'head', 'workers' or a host name.")
    when: str | None = Field(None, description="'param', 'not param', or 'param == value'.")
    on_failure: str | list[str] = Field("stop", description="'stop', 'continue', or cleanup step names to run.")
    shell: bool = Field(False, description="Opt-in required by the 'shell' action.")

    @field_validator("when")
    @classmethod
    def _when_form(cls, v: str | None) -> str | None:
        if v is not None and parse_when(v) is None:
            raise invalid(f"cannot read when: {v!r}", "use 'param', 'not param', 'param == value' or 'param != value'")
        return v


class Runbook(_Model):
    """A reviewable, repeatable procedure."""

    name: PlainName
    description: str = ""
    parameters: dict[str, Parameter] = Field(default_factory=dict)
    steps: list[RunbookStep] = Field(min_length=1)
    cleanup: list[RunbookStep] = Field(default_factory=list, description="Steps run only via on_failure.")
    on_interrupt: list[str] = Field(
        default_factory=list,
        description="Run after Ctrl-C stops the run: cleanup step names of this runbook, or built-in runbook names.",
    )
    _where: Any = PrivateAttr(default=None)

    def where(self, loc: tuple[str | int, ...]) -> str:
        """`file:line key.path` of a part of this runbook (its name alone if it was not read from YAML)."""
        if self._where is not None:
            return str(self._where(loc))
        return f"<runbook {self.name}> " + ".".join(map(str, loc))

    def raw_params(self) -> frozenset[str]:
        """The parameters marked `raw: true`."""
        return frozenset(k for k, p in self.parameters.items() if p.raw)

    def secret_values(self, params: dict[str, Any]) -> dict[str, str]:
        """The values of the parameters marked `secret: true`, by name (`param:<name>`), for redaction."""
        return {
            f"param:{k}": str(params[k])
            for k, p in self.parameters.items()
            if p.secret and params.get(k) not in (None, "")
        }
