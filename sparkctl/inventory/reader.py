"""A bounded YAML reader: one pass over the parser's events, every value located, nothing surprising accepted.

Inventories and runbooks are a few kilobytes of plain YAML. The reader enforces that, so that no input (an alias
bomb, a huge or endless file, binary data, deep nesting) can cost more than a bounded time and memory:

- input: at most MAX_BYTES, UTF-8, no NUL bytes; one document;
- anchors, aliases (`&name`, `*name`) and merge keys (`<<: *name`) as `yaml.safe_load` reads them, each alias
  counted as the values it expands to: a nine-line "billion laughs" would expand to 10**9 values, and is refused
  at the alias that crosses MAX_VALUES;
- at most MAX_VALUES values and MAX_DEPTH levels of nesting, aliases expanded; built without recursion;
- no tags other than the core schema's (`!!python/...` and friends are refused, not constructed);
- keys are plain text and unique (YAML's "the last one wins" hides mistakes).

It reads the events of libyaml's parser (PyYAML's C extension, `yaml.CSafeLoader`) when available, else of the
pure-Python parser, and resolves plain scalars with PyYAML's own YAML 1.1 resolver and safe constructors, so a
value means what `yaml.safe_load` makes of it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import ScalarNode
from yaml.resolver import Resolver

Loc = tuple[str | int, ...]

MAX_BYTES = 1024 * 1024
MAX_VALUES = 10_000  # an inventory holds ~50 values, a runbook a few hundred
MAX_DEPTH = 32

_CORE = "tag:yaml.org,2002:"
_SCALAR_TAGS = {f"{_CORE}{t}" for t in ("str", "int", "float", "bool", "null", "timestamp")}
_COLLECTION_TAGS = {f"{_CORE}map", f"{_CORE}seq"}
_CONSTRUCTOR = SafeConstructor()
_RESOLVERS: dict[str | None, list[tuple[str, Any]]] = Resolver.yaml_implicit_resolvers

try:  # libyaml's parser, ~10x faster than the pure-Python one; line numbers are the same
    _PARSER: Any = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - PyYAML built without libyaml
    _PARSER = yaml.SafeLoader


class ReadError(Exception):
    """Why the input cannot be read: at `line` (1-based) and `loc` (key path), `message`, fixed by `hint`."""

    def __init__(self, line: int, loc: Loc, message: str, hint: str) -> None:
        super().__init__(message)
        self.line = line
        self.loc = loc
        self.message = message
        self.hint = hint


@dataclass
class Document:
    """The data read, and where each key path came from."""

    data: Any
    lines: dict[Loc, int] = field(default_factory=dict)
    raw: dict[Loc, str] = field(default_factory=dict)
    """The source text of plain scalars YAML did not read as a string (`no`, `1e3`, `~`), for hints."""


def read_bytes(path: str | Path) -> bytes:
    """At most MAX_BYTES + 1 bytes of a file: enough to tell it is too large, bounded for /dev/zero and pipes."""
    with open(path, "rb") as f:
        return f.read(MAX_BYTES + 1)


def decode(data: bytes) -> str:
    """UTF-8 text of `data`, or ReadError at the line of the first byte that is not text."""
    if len(data) > MAX_BYTES:
        raise ReadError(
            data.count(b"\n", 0, MAX_BYTES) + 1,
            (),
            f"larger than {MAX_BYTES // 1024} KiB: not an inventory or runbook",
            "check the file name; sparkctl reads small YAML files only",
        )
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise ReadError(1, (), "UTF-16 text", "save the file as UTF-8")
    nul = data.find(b"\0")
    if nul >= 0:
        raise ReadError(
            data.count(b"\n", 0, nul) + 1, (), "binary data (a NUL byte)", "check the file name: expected YAML text"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ReadError(
            data.count(b"\n", 0, exc.start) + 1,
            (),
            f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})",
            "save the file as UTF-8",
        ) from None


def _scalar(value: str, tag: str) -> Any:
    if tag == f"{_CORE}str":
        return value
    return _CONSTRUCTOR.yaml_constructors[tag](_CONSTRUCTOR, ScalarNode(tag, value))


def _resolve(value: str) -> str:
    """PyYAML's implicit tag of a plain scalar (YAML 1.1: `yes` is a bool, `1_000` an int, `~` null)."""
    for tag, regexp in _RESOLVERS.get(value[0] if value else "", []):
        if regexp.match(value):
            return tag
    return f"{_CORE}str"


def _short(tag: str) -> str:
    return "!!" + tag.removeprefix(_CORE) if tag.startswith(_CORE) else tag


_MERGE = "<<"  # YAML 1.1's merge key, when plain: its value's keys join the mapping (explicit keys win)


class _Frame:
    __slots__ = ("anchor", "container", "height", "key", "keys", "loc", "merges", "start")

    def __init__(self, container: dict[str, Any] | list[Any], loc: Loc, anchor: str | None, start: int) -> None:
        self.container = container
        self.loc = loc
        self.key: str | None = None
        self.keys: dict[str, int] = {}
        self.anchor = anchor
        self.start = start  # values counted before this one: its size is what is counted until it ends
        self.height = 1  # levels of nesting, this one included
        self.merges: list[tuple[Any, int]] = []  # values of merge keys, with their lines


@dataclass(frozen=True)
class _Anchored:
    value: Any
    size: int  # values, aliases expanded
    height: int  # levels of nesting (0 for a scalar)


def read_yaml(text: str) -> Document:
    """Parse one YAML document within the limits above; ReadError (located) for anything else."""
    if len(text) > MAX_BYTES:
        raise ReadError(text.count("\n", 0, MAX_BYTES) + 1, (), f"larger than {MAX_BYTES // 1024} KiB", "keep it small")
    reader = _Reader(text)
    try:
        loader = _PARSER(str(text))  # libyaml wants exactly a str, not a subclass
    except yaml.reader.ReaderError as exc:  # the pure-Python reader checks every character up front
        raise _not_allowed(text, exc, ()) from None
    try:
        while (event := reader.next_event(loader)) is not None:
            reader.feed(event)
    finally:
        loader.dispose()
    return reader.doc


class _Reader:
    """One pass of read_yaml: the document so far, the collections still open, the anchors, the values counted."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.doc = Document(None)
        self.stack: list[_Frame] = []
        self.anchors: dict[str, _Anchored] = {}
        self.anchored_on: dict[str, int] = {}  # the line of each anchor (&name) so far
        self.values = 0
        self.documents = 0

    def _open_loc(self) -> Loc:
        return self.stack[-1].loc if self.stack else ()

    def next_event(self, loader: Any) -> Any:
        """The parser's next event, None at the end of the stream; a parse error as a located ReadError."""
        try:
            event = loader.get_event()
        except yaml.MarkedYAMLError as exc:
            raise self._invalid(exc) from None
        except yaml.reader.ReaderError as exc:  # a control character: located by its offset, not a mark
            raise _not_allowed(self.text, exc, self._open_loc()) from None
        if event is None or isinstance(event, yaml.StreamEndEvent):
            return None
        return event

    def _invalid(self, exc: yaml.MarkedYAMLError) -> ReadError:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        lines = self.text.split("\n", line)
        source_line = lines[line - 1] if 0 < line <= len(lines) else ""
        tab = "\t" in source_line[: len(source_line) - len(source_line.lstrip())]
        return ReadError(
            line,
            self._open_loc(),
            f"not valid YAML: {exc.problem or exc}",
            "indent with spaces: YAML does not allow tabs there"
            if tab
            else "check indentation and quoting on that line or just above it",
        )

    def feed(self, event: Any) -> None:
        """Take one event: a document boundary, the end of a collection, an alias, a scalar or a collection's start."""
        if isinstance(event, yaml.DocumentStartEvent):
            self.documents += 1
            if self.documents > 1:
                raise ReadError(
                    line_of(event),
                    (),
                    "a second YAML document (after '---')",
                    "keep one document per file",
                )
            return
        if isinstance(event, yaml.StreamStartEvent | yaml.DocumentEndEvent):
            return
        line = line_of(event)
        if isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent):
            self._close()
            return
        top = self.stack[-1] if self.stack else None
        # Where this event goes: a mapping key, a mapping value, a list item, or the document itself.
        is_key = top is not None and isinstance(top.container, dict) and top.key is None
        if top is None:
            loc: Loc = ()
        elif isinstance(top.container, list):
            loc = (*top.loc, len(top.container))
        else:
            loc = (*top.loc, top.key if top.key is not None else "")
        if isinstance(event, yaml.AliasEvent):
            self._alias(str(event.anchor), line, top, loc, is_key)
            return
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            self._note_anchor(anchor, line, top.loc if is_key and top else loc)
        self.values += 1
        if self.values > MAX_VALUES:
            raise ReadError(
                line, loc, f"more than {MAX_VALUES} values: not an inventory or runbook", "check the file name"
            )
        if isinstance(event, yaml.ScalarEvent):
            self._scalar(event, line, top, loc, is_key, anchor)
        else:
            self._start(event, line, top, loc, is_key, anchor)

    def _place(self, top: _Frame | None, value: Any, line: int) -> None:
        """A value into the open collection, or as the document itself."""
        if top is None:
            self.doc.data = value
        else:
            _store(top, value, line)

    def _close(self) -> None:
        """A mapping or a sequence ends: merge keys applied, its anchor recorded, its height passed up."""
        frame = self.stack.pop()
        if frame.merges:
            _merge(frame)
        if frame.anchor is not None:
            self.anchors[frame.anchor] = _Anchored(frame.container, self.values - frame.start, frame.height)
        if self.stack:
            self.stack[-1].height = max(self.stack[-1].height, frame.height + 1)
        else:
            self.doc.data = frame.container

    def _alias(self, name: str, line: int, top: _Frame | None, loc: Loc, is_key: bool) -> None:
        """`*name`: a copy of the anchored value, counted as the values it expands to."""
        if is_key and top is not None:
            raise ReadError(line, top.loc, "keys must be plain text, not an alias", f"write the key out, not *{name}")
        target = self.anchors.get(name)
        if target is None:
            if any(f.anchor == name for f in self.stack):
                raise ReadError(
                    line, loc, f"alias '*{name}' is inside the value it names", "a value cannot contain itself"
                )
            raise ReadError(
                line,
                loc,
                f"alias '*{name}' names no anchor before it",
                f"define the anchor (&{name}) on the value before using it, or write the value out",
            )
        if self.values + target.size > MAX_VALUES:
            raise ReadError(
                line,
                loc,
                f"alias '*{name}' expands to {target.size} values: more than {MAX_VALUES} in all",
                "share smaller blocks, or write the values out: an inventory holds ~50 values",
            )
        if len(self.stack) + target.height > MAX_DEPTH:
            raise ReadError(
                line, loc, f"alias '*{name}' nests more than {MAX_DEPTH} levels deep", "flatten the structure"
            )
        self.values += target.size
        value = copy.deepcopy(target.value)  # at most MAX_VALUES values in all, counted above
        self.doc.lines.setdefault(loc, line)
        if top is not None:
            top.height = max(top.height, target.height + 1)
        self._place(top, value, line)

    def _note_anchor(self, anchor: str, line: int, loc: Loc) -> None:
        if anchor in self.anchored_on:
            raise ReadError(
                line,
                loc,
                f"anchor '&{anchor}' is defined twice (first on line {self.anchored_on[anchor]})",
                "give each anchor its own name",
            )
        self.anchored_on[anchor] = line

    def _scalar(self, event: Any, line: int, top: _Frame | None, loc: Loc, is_key: bool, anchor: str | None) -> None:
        """A scalar: a mapping's key, or a value read as `yaml.safe_load` reads it (core-schema tags only)."""
        tag = event.tag
        explicit = tag not in (None, "!")
        if explicit and tag not in _SCALAR_TAGS:
            raise ReadError(
                line, loc, f"YAML tag {_short(tag or '')} is not allowed", "remove the tag: plain values only"
            )
        if is_key:
            assert top is not None
            self._key(event, line, top, explicit, anchor)
            return
        plain = not event.style and event.implicit[0]
        resolved = tag if explicit and tag else (_resolve(event.value) if plain else f"{_CORE}str")
        try:
            value = _scalar(event.value, resolved)
        except (yaml.YAMLError, ValueError, OverflowError) as exc:
            raise ReadError(
                line, loc, f"cannot read {event.value!r} as {_short(resolved)}: {exc}", "quote it as a string"
            ) from None
        if resolved != f"{_CORE}str":
            self.doc.raw[loc] = event.value
        self.doc.lines.setdefault(loc, line)
        if anchor is not None:
            self.anchors[anchor] = _Anchored(value, 1, 0)
        self._place(top, value, line)

    def _key(self, event: Any, line: int, top: _Frame, explicit: bool, anchor: str | None) -> None:
        """A mapping's key: plain text, once per mapping; a plain `<<` is a merge key."""
        if explicit and event.tag != f"{_CORE}str":
            raise ReadError(line, top.loc, "keys must be plain text", "remove the tag from the key")
        key = event.value
        if key in top.keys:
            raise ReadError(
                line,
                (*top.loc, key),
                f"key {key!r} appears twice (first on line {top.keys[key]})",
                "keep one of them: YAML would silently use the last",
            )
        top.keys[key] = line
        top.key = key
        self.doc.lines[(*top.loc, key)] = line
        if key == _MERGE and not explicit and not event.style:
            top.key = _MERGE_KEY
        if anchor is not None:
            self.anchors[anchor] = _Anchored(key, 1, 0)

    def _start(self, event: Any, line: int, top: _Frame | None, loc: Loc, is_key: bool, anchor: str | None) -> None:
        """A mapping or a sequence starts: an open frame, stored into its parent now and filled as events come."""
        tag = getattr(event, "tag", None)
        if tag not in (None, "!") and tag not in _COLLECTION_TAGS:
            raise ReadError(
                line, loc, f"YAML tag {_short(tag or '')} is not allowed", "remove the tag: plain values only"
            )
        if is_key:
            assert top is not None
            raise ReadError(line, top.loc, "keys must be plain text, not a list or a mapping", "use a plain key")
        if len(self.stack) >= MAX_DEPTH:
            raise ReadError(line, loc[:2], f"nested more than {MAX_DEPTH} levels deep", "flatten the structure")
        container: dict[str, Any] | list[Any] = {} if isinstance(event, yaml.MappingStartEvent) else []
        self.doc.lines.setdefault(loc, line)
        if top is not None:
            _store(top, container, line)
        self.stack.append(_Frame(container, loc, anchor, self.values - 1))


def _not_allowed(text: str, exc: yaml.reader.ReaderError, loc: Loc) -> ReadError:
    """A character YAML forbids, at its line: libyaml counts the offset in UTF-8 bytes, PyYAML in characters."""
    if _PARSER is yaml.SafeLoader:
        line = text.count("\n", 0, exc.position) + 1
    else:
        line = text.encode()[: exc.position].count(b"\n") + 1
    char = exc.character if isinstance(exc.character, int) else ord(exc.character)
    return ReadError(
        line,
        loc,
        f"character {char:#06x} is not allowed in YAML",
        "remove control characters from the file",
    )


def line_of(event: Any) -> int:
    """1-based line of an event (every event of a parsed stream has a start mark)."""
    mark = event.start_mark
    return int(mark.line) + 1 if mark is not None else 1


class _MergeKey(str):
    """The plain `<<` key of a mapping: its value is merged, not stored."""

    __slots__ = ()


_MERGE_KEY = _MergeKey(_MERGE)


def _store(frame: _Frame, value: Any, line: int) -> None:
    if isinstance(frame.container, list):
        frame.container.append(value)
    else:
        assert frame.key is not None
        if isinstance(frame.key, _MergeKey):
            frame.merges.append((value, line))  # complete only at the end of this mapping
        else:
            frame.container[frame.key] = value
        frame.key = None


def _merge(frame: _Frame) -> None:
    """Apply the mapping's merge keys as `yaml.safe_load` does: the merged keys first, its own keys win, and of
    several merged mappings (`<<: [*a, *b]`) the first that has a key gives its value."""
    assert isinstance(frame.container, dict)
    merged: dict[str, Any] = {}
    for value, line in frame.merges:
        sources = value if isinstance(value, list) else [value]
        if not all(isinstance(m, dict) for m in sources):
            raise ReadError(
                line,
                (*frame.loc, _MERGE),
                "'<<' merges mappings only",
                "give '<<' a mapping, an alias of one (<<: *name), or a list of those",
            )
        for source in reversed(sources):
            merged.update(source)
    own = dict(frame.container)
    frame.container.clear()
    frame.container.update({k: v for k, v in merged.items() if k not in own})
    frame.container.update(own)
