"""Load YAML into validated models, reporting every problem as `file:line key.path: problem` + hint."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from sparkctl.errors import InputError, InventoryError, Problem
from sparkctl.inventory.reader import ReadError, decode, read_bytes, read_yaml

M = TypeVar("M", bound=BaseModel)
Loc = tuple[str | int, ...]


def render_loc(loc: Sequence[str | int]) -> str:
    """`('hosts', 1, 'fabric', 0, 'address')` -> `hosts[1].fabric[0].address`."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{_one_line(part)}" if text else _one_line(part))
    return text


def _one_line(key: str) -> str:
    """A key as written on one line: a key may hold any character, a message line may not break."""
    return key.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


class Source:
    """A parsed YAML document that remembers where each key came from (read once, within bounds: see reader)."""

    def __init__(self, text: str, name: str, error: type[InputError] = InventoryError) -> None:
        self.name = name
        self.error = error
        try:
            doc = read_yaml(text)
        except ReadError as exc:
            raise error([Problem(_located(name, exc.line, exc.loc), exc.message, exc.hint)]) from None
        self.lines: dict[Loc, int] = doc.lines
        self.raw: dict[Loc, str] = doc.raw
        self.data: Any = doc.data
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

    def where(self, loc: Sequence[str | int]) -> str:
        """`file:line key.path` for the deepest part of `loc` found in the document."""
        loc = tuple(loc)
        for n in range(len(loc), -1, -1):
            if loc[:n] in self.lines:
                line = self.lines[loc[:n]]
                break
        else:
            line = 1
        return _located(self.name, line, loc)


def _located(name: str, line: int, loc: Sequence[str | int]) -> str:
    path = render_loc(loc)
    return f"{name}:{line} {path}" if path else f"{name}:{line}"


def _known_fields(model: type[BaseModel], loc: Loc) -> list[str]:
    """Field names of the model at `loc` (for did-you-mean); best effort through lists and nested models."""
    current: Any = model
    in_mapping = False  # the last field was a dict of models: the next part is one of its keys
    for part in loc:
        if isinstance(part, int) or in_mapping:
            in_mapping = False
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        annotation = fields[part].annotation
        in_mapping = getattr(annotation, "__origin__", None) is dict
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
            return description  # inside a mapping or list value: the enclosing field describes it
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
_KIND_HINTS = {
    "finite_number": "use a finite number (.inf and .nan are not numbers of seconds)",
    "list_type": "write a list: one `- item` line per item, or [a, b]",
    "dict_type": "write a mapping: `key: value` lines indented under this key",
    "model_type": "write a mapping: `key: value` lines indented under this key",
}


def _hint(kind: str, ctx: dict[str, Any], description: str) -> str:
    """How to fix a schema error: the allowed range if it is one, else what the field holds."""
    if kind in _BOUNDS and _BOUNDS[kind][0] in ctx:
        key, text = _BOUNDS[kind]
        return text.format(ctx[key])
    if kind in _KIND_HINTS and description:
        return f"{_KIND_HINTS[kind]} ({description.rstrip('.')})"
    return _KIND_HINTS.get(kind, description)


def _inner_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


MAX_PROBLEMS = 30
"""More problems than this are counted, not listed: the first ones are what to fix first."""

_YAML_TYPES = {bool: "a boolean", type(None): "null (no value)", int: "a number", float: "a number"}
_TYPE_KINDS = {"string_type", "int_type", "float_type", "bool_type", "int_from_float", "dict_type", "list_type"}


def _type_hint(source: Source, loc: Loc, got: Any, kind: str) -> str:
    """YAML 1.1 reads `no`, `on`, `~`, `1e3` as non-strings: say so and show the quoted form."""
    raw = source.raw.get(loc)
    key = loc[-1] if loc and isinstance(loc[-1], str) else "value"
    if isinstance(got, str) and kind in ("int_type", "float_type", "bool_type"):
        # Quoted, so text: strict types do not read text as a number or a boolean.
        plain = {"int_type": r"-?\d+", "float_type": r"-?\d+(\.\d*)?([eE][-+]?\d+)?", "bool_type": r"true|false"}
        if re.fullmatch(plain[kind], got.strip()):
            return f"write it without quotes: {key}: {got.strip()}"
        return {"int_type": "write a whole number", "float_type": "write a number", "bool_type": "write true or false"}[
            kind
        ]
    if raw is None or kind not in _TYPE_KINDS:
        return ""
    read_as = _YAML_TYPES.get(type(got), f"a {type(got).__name__}")
    if kind == "string_type":
        return f'YAML reads {raw or "an empty value"} as {read_as}: quote it, e.g. {key}: "{raw}"'
    wanted = {"int_type": "a whole number", "float_type": "a number", "bool_type": "true or false"}.get(kind, "")
    return f"YAML reads {raw or 'an empty value'} as {read_as}" + (f": write {wanted}" if wanted else "")


def validation_problems(source: Source, model: type[BaseModel], exc: ValidationError) -> list[Problem]:
    """Turn pydantic's errors into file:line problems with hints."""
    problems = []
    docs = "docs/runbooks.md" if source.error.__name__ == "RunbookError" else "docs/inventory.md"
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
        is_key = bool(loc) and loc[-1] == "[key]"
        if is_key:  # a mapping key is wrong (e.g. an env variable name): blame that key, on its own line
            loc = (*loc[:-2], str(loc[-2]))
        kind = err["type"]
        ctx = dict(err.get("ctx") or {})
        if kind == "missing" and loc in misspelt:
            continue
        if kind == "extra_forbidden":
            key = str(loc[-1])
            choices = _known_fields(model, loc[:-1])
            close = difflib.get_close_matches(key, choices, n=1)
            hint = f"did you mean '{close[0]}'?" if close else (f"known keys: {', '.join(choices)}" if choices else "")
            problems.append(Problem(source.where(loc), f"unknown key '{_one_line(key)}'", hint))
        elif kind == "missing":
            problems.append(Problem(source.where(loc), "is required", f"add it (see {docs})"))
        elif kind == "sparkctl":
            problems.append(Problem(source.where(loc), str(ctx["message"]), str(ctx["hint"])))
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = err.get("input")
            if is_key:
                msg = f"key {msg[0].lower()}{msg[1:]}"
            secret = bool(loc) and str(loc[-1]).endswith("_env")  # a secret pasted in place of a variable name
            if kind not in ("value_error",) and not isinstance(got, dict | list) and got is not None and not secret:
                msg = f"{msg} (found {got!r})"
            description = _field_description(model, loc)
            typed = _type_hint(source, loc, got, kind)
            if typed and description:
                typed = f"{typed} ({description.rstrip('.')})"
            hint = typed or _hint(kind, ctx, description) or f"see {docs} for what this key takes"
            problems.append(Problem(source.where(loc), msg, hint))
    if len(problems) > MAX_PROBLEMS:
        more = len(problems) - MAX_PROBLEMS
        problems = [
            *problems[:MAX_PROBLEMS],
            Problem(source.name, f"{more} more problem(s) not shown", "fix the ones above first"),
        ]
    return problems


def validate_source(
    source: Source,
    model: type[M],
    check: Callable[[M], list[tuple[Loc, str, str]]] | None = None,
    error: type[InputError] = InventoryError,
) -> M:
    """Validate parsed YAML + run semantic checks; raise `error` with every problem at once."""
    try:
        obj = model.model_validate(source.data)
    except ValidationError as exc:
        raise error(validation_problems(source, model, exc)) from None
    if check is not None:
        found = check(obj)
        if found:
            raise error([Problem(source.where(loc), msg, hint) for loc, msg, hint in found][: MAX_PROBLEMS + 1])
    return obj


def load_model(
    text: str,
    name: str,
    model: type[M],
    check: Callable[[M], list[tuple[Loc, str, str]]] | None = None,
    error: type[InputError] = InventoryError,
) -> M:
    """Parse + validate + run semantic checks; raise `error` with every problem at once."""
    return validate_source(Source(text, name, error), model, check, error)


def read_text(path: str | Path, error: type[InputError] = InventoryError) -> str:
    """Read a small UTF-8 file (bounded: endless inputs like /dev/zero stop at the size limit) or raise naming it."""
    try:
        if Path(path).is_dir():
            raise error([Problem(str(path), "is a directory", "name a YAML file")])
        data = read_bytes(path)
    except OSError as exc:
        raise error(
            [Problem(str(path), f"cannot read: {exc.strerror or exc}", "check the path and its permissions")]
        ) from None
    try:
        return decode(data)
    except ReadError as exc:
        raise error([Problem(f"{path}:{exc.line}", exc.message, exc.hint)]) from None
