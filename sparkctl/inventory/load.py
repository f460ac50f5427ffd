"""Load YAML into validated models, reporting every problem as `file:line key.path: problem` + hint."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from sparkctl.errors import InputError, InventoryError, Problem

M = TypeVar("M", bound=BaseModel)
Loc = tuple[str | int, ...]


def _line_map(node: yaml.Node, path: Loc, out: dict[Loc, int]) -> None:
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            sub = (*path, str(key.value))
            out[sub] = key.start_mark.line + 1
            _line_map(value, sub, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_map(item, (*path, i), out)


def render_loc(loc: Sequence[str | int]) -> str:
    """`('hosts', 1, 'fabric', 0, 'address')` -> `hosts[1].fabric[0].address`."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


# libyaml's loader (PyYAML's C binding) when PyYAML was built with it: the same safe constructor, several times
# faster. Line numbers, which only error messages need, come from a second, pure-Python pass made on demand.
_FAST_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class Source:
    """A parsed YAML document that remembers where each key came from."""

    def __init__(self, text: str, name: str, error: type[InputError] = InventoryError) -> None:
        self.name = name
        self.error = error
        self._text = text
        self._lines: dict[Loc, int] | None = None
        try:
            self.data: Any = yaml.load(str(text), Loader=_FAST_LOADER)  # libyaml takes an exact str only
        except yaml.YAMLError:
            self._lines = self._parse_slowly()  # raises with the pure-Python parser's message and mark
        if not isinstance(self.data, dict):
            found = "an empty document" if self.data is None else f"a {type(self.data).__name__}"
            raise error(
                [
                    Problem(
                        f"{name}:{self.lines.get((), 1)}",
                        f"expected a mapping at the top level, found {found}",
                        "start with `key: value` lines (see the bundled example-pair.yaml)",
                    )
                ]
            )

    @property
    def lines(self) -> dict[Loc, int]:
        """Line of each key path, computed when first asked for (only problems need them)."""
        if self._lines is None:
            self._lines = self._parse_slowly()
        return self._lines

    def _parse_slowly(self) -> dict[Loc, int]:
        """The pure-Python parse that keeps line numbers; raises `error` for text that is not YAML."""
        lines: dict[Loc, int] = {}
        try:
            node = yaml.compose(self._text, Loader=yaml.SafeLoader)
            self.data = yaml.safe_load(self._text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{self.name}:{mark.line + 1}" if mark else f"{self.name}:1"
            raise self.error(
                [
                    Problem(
                        where,
                        f"not valid YAML: {getattr(exc, 'problem', exc)}",
                        "check indentation and quoting on that line or just above it",
                    )
                ]
            ) from None
        if node is not None:
            _line_map(node, (), lines)
        return lines

    def where(self, loc: Sequence[str | int]) -> str:
        """`file:line key.path` for the deepest part of `loc` found in the document."""
        loc = tuple(loc)
        for n in range(len(loc), -1, -1):
            if loc[:n] in self.lines:
                line = self.lines[loc[:n]]
                break
        else:
            line = 1
        path = render_loc(loc)
        return f"{self.name}:{line} {path}" if path else f"{self.name}:{line}"


def _known_fields(model: type[BaseModel], loc: Loc) -> list[str]:
    """Field names of the model at `loc` (for did-you-mean); best effort through lists and nested models."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        annotation = fields[part].annotation
        current = _inner_model(annotation)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def _field_description(model: type[BaseModel], loc: Loc) -> str:
    """The description of the field at `loc`, if the models declare one."""
    current: Any = model
    description = ""
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return ""
        description = fields[part].description or ""
        current = _inner_model(fields[part].annotation)
    return description


_BOUNDS = {
    "greater_than": ("gt", "use a value greater than {}"),
    "greater_than_equal": ("ge", "use a value of at least {}"),
    "less_than": ("lt", "use a value less than {}"),
    "less_than_equal": ("le", "use a value of at most {}"),
    "too_short": ("min_length", "list at least {} item(s)"),
}


def _hint(kind: str, ctx: dict[str, Any], description: str) -> str:
    """How to fix a schema error: the allowed range if it is one, else what the field holds."""
    if kind in _BOUNDS and _BOUNDS[kind][0] in ctx:
        key, text = _BOUNDS[kind]
        return text.format(ctx[key])
    return description


def _inner_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def validation_problems(source: Source, model: type[BaseModel], exc: ValidationError) -> list[Problem]:
    """Turn pydantic's errors into file:line problems with hints."""
    problems = []
    errors = exc.errors()
    # A misspelt required key shows up twice (unknown + missing): report it once, as the unknown key.
    misspelt: set[Loc] = set()
    for err in errors:
        if err["type"] == "extra_forbidden":
            loc = tuple(err["loc"])
            close = difflib.get_close_matches(str(loc[-1]), _known_fields(model, loc[:-1]), n=1)
            if close:
                misspelt.add((*loc[:-1], close[0]))
    for err in errors:
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        kind = err["type"]
        if kind == "missing" and loc in misspelt:
            continue
        if kind == "extra_forbidden":
            key = str(loc[-1])
            choices = _known_fields(model, loc[:-1])
            close = difflib.get_close_matches(key, choices, n=1)
            hint = f"did you mean '{close[0]}'?" if close else (f"known keys: {', '.join(choices)}" if choices else "")
            problems.append(Problem(source.where(loc), f"unknown key '{key}'", hint))
        elif kind == "missing":
            problems.append(Problem(source.where(loc), "is required", "add it (see docs/inventory.md)"))
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = err.get("input")
            if kind not in ("value_error",) and not isinstance(got, dict | list) and got is not None:
                msg = f"{msg} (found {got!r})"
            hint = _hint(kind, dict(err.get("ctx") or {}), _field_description(model, loc))
            problems.append(Problem(source.where(loc), msg, hint))
    return problems


def load_model(
    text: str,
    name: str,
    model: type[M],
    check: Callable[[M], list[tuple[Loc, str, str]]] | None = None,
    error: type[InputError] = InventoryError,
) -> M:
    """Parse + validate + run semantic checks; raise `error` with every problem at once."""
    source = Source(text, name, error)
    try:
        obj = model.model_validate(source.data)
    except ValidationError as exc:
        raise error(validation_problems(source, model, exc)) from None
    if check is not None:
        found = check(obj)
        if found:
            raise error([Problem(source.where(loc), msg, hint) for loc, msg, hint in found])
    return obj


def read_text(path: str | Path, error: type[InputError] = InventoryError) -> str:
    """Read a file or raise an input error naming it."""
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise error([Problem(str(path), f"cannot read: {exc.strerror}")]) from None
