"""Runbook files: named, parameterised, ordered steps that each name a built-in action."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sparkctl.errors import InputError
from sparkctl.inventory.models import PlainName


class RunbookError(InputError):
    """A runbook file is invalid."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Parameter(_Model):
    """A runbook parameter, overridable with `--set name=value`."""

    default: Any = None
    description: str = ""
    secret: bool = Field(False, description="redacted in the journal and in output")
    required: bool = Field(False, description="the run needs a value (`--set name=value`)")


class RunbookStep(_Model):
    """One step: an action from the library, where it runs, when, and what a failure does."""

    name: PlainName = Field(description="Step name (for --from / --only and on_failure).")
    action: str = Field(description="Built-in action (`sparkctl runbook actions` lists them).")
    args: dict[str, Any] = Field(default_factory=dict, description="Action arguments; '${param}' is substituted.")
    hosts: str = Field("all", description="'all', 'head', 'workers' or a host name.")
    when: str | None = Field(None, description="'param', 'not param', or 'param == value'.")
    on_failure: str | list[str] = Field("stop", description="'stop', 'continue', or cleanup step names to run.")
    shell: bool = Field(False, description="Opt-in required by the 'shell' action.")

    @field_validator("when")
    @classmethod
    def _when_form(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^(not\s+)?[A-Za-z_]\w*(\s*(==|!=)\s*\S+)?$", v.strip()):
            raise ValueError("use 'param', 'not param', 'param == value' or 'param != value'")
        return v


class Runbook(_Model):
    """A reviewable, repeatable procedure."""

    name: PlainName
    description: str = ""
    parameters: dict[str, Parameter] = Field(default_factory=dict)
    steps: list[RunbookStep] = Field(min_length=1)
    cleanup: list[RunbookStep] = Field(default_factory=list, description="Steps run only via on_failure.")
