"""Secret values of a run (sudo password, Ray token, API keys): kept apart from the engine, so that printing a plan
(which redacts them) does not load the engine."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sparkctl.errors import HostError


class Secrets:
    """Secret values by name; knows how to scrub them from any text."""

    def __init__(self, values: Mapping[str, str] | None = None) -> None:
        self._values = dict(values or {})

    def get(self, name: str) -> str:
        if name not in self._values:
            raise HostError(f"secret '{name}' is needed but was not provided")
        return self._values[name]

    def has(self, name: str) -> bool:
        return name in self._values

    def redact(self, text: str) -> str:
        # Longest first, so a secret containing another is replaced whole.
        for value in sorted(self._values.values(), key=len, reverse=True):
            if value and len(value) >= 4:
                text = text.replace(value, "<redacted>")
        return text

    def scrub(self, data: Any) -> Any:
        """`data` (JSON-like: dicts, lists, strings) with every secret value redacted in every string."""
        if isinstance(data, str):
            return self.redact(data)
        if isinstance(data, list | tuple):
            return [self.scrub(v) for v in data]
        if isinstance(data, dict):
            return {k: self.scrub(v) for k, v in data.items()}
        return data
