"""Fuzzing the offline commands with generated inventories and runbooks (hypothesis).

Whatever the input, `plan --offline`, `run --dry-run --offline` and `runbook validate` answer 0 or 2: never a
traceback, never "unexpected". Each example must finish within hypothesis' deadline, 10 s: a guard against a hang
or a runaway loop, not a speed measurement (an offline plan takes milliseconds; the 2 s promise for inputs up to
5 MB is measured in benchmarks/bench_input.py, where a loaded machine cannot fail a test), and what the examples
allocate may peak at 200 MB at most (tracemalloc) over the whole run. The examples are derandomized (the same
ones on every run, so CI cannot flake) and bounded in number.
"""

from __future__ import annotations

import tracemalloc
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from sparkctl.cli.app import app

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_TEXT = (REPO / "inventories" / "example-pair.yaml").read_text()
EXAMPLE = yaml.safe_load(EXAMPLE_TEXT)
PLAYBOOKS = sorted((REPO / "playbooks").glob("*.yaml"))
RUNBOOK_TEXTS = [p.read_text() for p in PLAYBOOKS]

BOUNDED = settings(
    max_examples=80,
    deadline=timedelta(seconds=10),
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
MAX_GROWTH_MB = 200

# Fragments that have broken YAML loaders and CLIs: anchors and aliases, tags, flow openers, control and bidi
# characters, YAML 1.1 booleans, special floats, templates, shell metacharacters, huge numbers.
NASTY = [
    "&a",
    "*a",
    "<<: *a",
    "!!python/object/apply:os.system [id]",
    "!!binary aGk=",
    "!foo",
    "[",
    "{",
    "]",
    "}",
    "\t",
    "\x00",
    "\x1b[2J",
    "\u202e",
    "\x85",
    "\ufeff",
    "yes",
    "no",
    "on",
    "~",
    "null",
    ".inf",
    "-.inf",
    ".nan",
    "0x1F",
    "0o17",
    "1_000",
    "1:30",
    "2020-13-45",
    "${x}",
    "${",
    "$(reboot)",
    "; rm -rf /",
    "'",
    '"',
    "\\",
    "10.0.0.300",
    "192.168.100.10/32",
    "999999999999999999999999",
    "-1",
    "0",
    "---",
    "...",
    "? a",
    "- ",
    ":",
    "#",
    "%YAML 1.2",
    "| \n",
    "> \n",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(NASTY),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8) | st.sampled_from(NASTY), inner, max_size=4)
    ),
    max_leaves=12,
)


def _paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(data, dict):
        for k, v in data.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out += _paths(v, (*prefix, i))
    return out


def _set(data: Any, path: tuple[Any, ...], value: Any, delete: bool) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(data, dict):
        copy = dict(data)
        if delete and not rest:
            copy.pop(head, None)
        else:
            copy[head] = _set(data[head], rest, value, delete)
        return copy
    copy_list = list(data)
    if delete and not rest:
        copy_list.pop(head)
    else:
        copy_list[head] = _set(data[head], rest, value, delete)
    return copy_list


@st.composite
def mutated_documents(draw: st.DrawFn, base: Any) -> str:
    """A document built from `base` with a few values replaced, deleted or added, as YAML text."""
    data = base
    for _ in range(draw(st.integers(1, 4))):
        paths = _paths(data)
        path = draw(st.sampled_from(paths))
        data = _set(data, path, draw(values), delete=bool(path) and draw(st.booleans()))
    try:
        return yaml.safe_dump(data, allow_unicode=draw(st.booleans()), sort_keys=False)
    except yaml.YAMLError:
        return yaml.safe_dump(str(data))


@st.composite
def spliced_texts(draw: st.DrawFn, base: str) -> bytes:
    """`base` with fragments spliced in, lines dropped or duplicated, or bytes that are not UTF-8."""
    lines = base.splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines)))
        op = draw(st.sampled_from(["insert", "drop", "dup", "splice"]))
        if op == "insert":
            lines.insert(i, draw(st.sampled_from(NASTY) | st.text(max_size=30)) + "\n")
        elif op == "drop" and i < len(lines):
            lines.pop(i)
        elif op == "dup" and i < len(lines):
            lines.insert(i, lines[i])
        elif i < len(lines):
            at = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:at] + draw(st.sampled_from(NASTY)) + lines[i][at:]
    data = "".join(lines).encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        data += draw(st.binary(max_size=8))
    return data


@st.composite
def hostile_documents(draw: st.DrawFn) -> str:
    """Shapes built to explode: alias fans, deep nesting (flow and block), many values."""
    kind = draw(st.sampled_from(["aliases", "flow", "block", "wide"]))
    n = draw(st.integers(2, 60))
    if kind == "aliases":
        width = draw(st.integers(2, 12))
        lines = ["a: &a [x, x]"] + [
            f"a{k}: &a{k} [{', '.join(['*a' if k == 0 else f'*a{k - 1}'] * width)}]" for k in range(n)
        ]
        return "\n".join(lines) + "\n"
    if kind == "flow":
        return "cluster: " + "[" * n * 5 + "]" * n * 5 + "\n"
    if kind == "block":
        return "".join("  " * d + f"k{d}:\n" for d in range(n)) + "  " * n + "v\n"
    return "hosts:\n" + "  - {}\n" * (n * 1000)


inventories = st.one_of(
    mutated_documents(EXAMPLE).map(str.encode),
    spliced_texts(EXAMPLE_TEXT),
    hostile_documents().map(str.encode),
)
runbooks = st.one_of(
    st.sampled_from([yaml.safe_load(t) for t in RUNBOOK_TEXTS]).flatmap(mutated_documents).map(str.encode),
    st.sampled_from(RUNBOOK_TEXTS).flatmap(spliced_texts),
    hostile_documents().map(str.encode),
)
set_values = st.lists(
    st.tuples(
        st.sampled_from(["workloads", "model", "workload", "mb", "x", "token"]),
        st.sampled_from(NASTY) | st.text(max_size=12),
    ),
    max_size=2,
)


@pytest.fixture(scope="module")
def memory_budget():
    """What the examples allocate may peak at MAX_GROWTH_MB at most: no input made sparkctl hold more than that.

    Measured with tracemalloc (Python's own allocations, from the first example on), not the process' peak RSS,
    which also counts whatever earlier tests in the same pytest process left behind. The commands run once on
    valid input first, so the first import of the CLI's modules is not counted either."""
    runner = CliRunner()
    example = str(REPO / "inventories" / "example-pair.yaml")
    runner.invoke(app, ["plan", "--offline", "-i", example])
    runner.invoke(app, ["runbook", "validate", str(PLAYBOOKS[0])])
    runner.invoke(app, ["run", str(PLAYBOOKS[0]), "--dry-run", "--offline", "-i", example, "--set", "model=m"])
    tracemalloc.start()
    try:
        yield
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak / 2**20 < MAX_GROWTH_MB, f"the examples' allocations peaked at {peak / 2**20:.0f} MB"


def _check(result: Any, *files: Path) -> None:
    out = result.output
    event(f"exit {result.exit_code}")  # --hypothesis-show-statistics shows how many examples were valid
    assert result.exit_code in (0, 2), out
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in out and "error: unexpected " not in out, out
    if result.exit_code == 2:
        lines = out.splitlines()
        errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
        assert errors, out
        for i in errors:  # every problem: located (a file:line, or the option), then a hint that says something
            assert lines[i].startswith((*(f"error: {f}:" for f in files), "error: --")), lines[i]
            assert i + 1 < len(lines) and lines[i + 1].startswith("hint: ") and lines[i + 1] != "hint: ", out


@BOUNDED
@given(text=inventories)
def test_plan_offline_answers_0_or_2(text: bytes, cli, tmp_path: Path, memory_budget) -> None:
    path = tmp_path / "inv.yaml"
    path.write_bytes(text)
    _check(cli("plan", "--offline", "-i", str(path)), path)


@BOUNDED
@given(text=runbooks, sets=set_values)
def test_run_dry_run_offline_answers_0_or_2(
    text: bytes, sets: list[tuple[str, str]], cli, tmp_path: Path, memory_budget
) -> None:
    path = tmp_path / "rb.yaml"
    path.write_bytes(text)
    _check(cli("runbook", "validate", str(path)), path)
    args = [a for k, v in sets for a in ("--set", f"{k}={v}")]
    _check(
        cli("run", str(path), "--dry-run", "--offline", "-i", str(REPO / "inventories" / "example-pair.yaml"), *args),
        path,
    )


@BOUNDED
@given(inventory=inventories, runbook=st.sampled_from(PLAYBOOKS))
def test_a_generated_inventory_under_every_playbook(
    inventory: bytes, runbook: Path, cli, tmp_path: Path, memory_budget
) -> None:
    path = tmp_path / "inv.yaml"
    path.write_bytes(inventory)
    _check(
        cli("run", str(runbook), "--dry-run", "--offline", "-i", str(path), "--set", "model=Qwen/Qwen3-8B"),
        path,
        runbook,
    )
