"""Shared fixtures of the unit tests: the example inventory as editable text, problems, laptop state."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sparkctl.errors import InputError, Problem
from sparkctl.inventory import parse_inventory

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "inventories" / "example-pair.yaml"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


class Text(str):
    """Inventory text that can be edited in place of one exact fragment and asked for line numbers."""

    __slots__ = ()

    def edit(self, old: str, new: str) -> Text:
        """Replace the one occurrence of `old` (fails loudly if the example changed under the test)."""
        count = self.count(old)
        assert count == 1, f"expected exactly one {old!r} in the inventory text, found {count}"
        return Text(self.replace(old, new))

    def line_of(self, fragment: str) -> int:
        """1-based line number of the one line containing `fragment`."""
        hits = [n for n, line in enumerate(self.splitlines(), 1) if fragment in line]
        assert len(hits) == 1, f"{fragment!r} is on lines {hits}, expected exactly one"
        return hits[0]


@pytest.fixture
def example() -> Text:
    """The bundled inventories/example-pair.yaml as editable text."""
    return Text(EXAMPLE.read_text())


@pytest.fixture
def problems() -> Callable[[str], list[Problem]]:
    """Parse inventory text named `inv.yaml`; the problems it reports (fails if it is valid)."""

    def run(text: str) -> list[Problem]:
        with pytest.raises(InputError) as info:
            parse_inventory(text, "inv.yaml")
        return info.value.problems

    return run


@pytest.fixture
def fixture_text() -> Callable[[str], str]:
    """Content of a captured tool output under tests/unit/fixtures/."""

    def read(name: str) -> str:
        return (FIXTURES / name).read_text()

    return read


@pytest.fixture
def isolated_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the laptop state (journal, tokens, keys) at an empty temp dir."""
    state = tmp_path / "state"
    monkeypatch.setenv("XDG_STATE_HOME", str(state))
    monkeypatch.delenv("SPARKCTL_INVENTORY", raising=False)
    return state


@pytest.fixture
def connector(mocker: Any) -> Callable[..., Any]:
    """Replace the one door's connector (`sparkctl.session.door.CONNECTOR`, called with --accept-new-host-keys and
    returning a `Connect`) for this test: `connector(return_value=fake_connect)` or `connector(side_effect=...)`.
    Returns the mock, to assert on how the door was called."""
    from sparkctl.session import door

    return lambda **kwargs: mocker.patch.object(door, "CONNECTOR", **kwargs)


@pytest.fixture
def no_connection(connector: Callable[..., Any]) -> Any:
    """Any attempt to connect to a host fails the test."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the CLI tried to connect")

    return connector(side_effect=refuse)


@pytest.fixture
def cli(isolated_state: Path, no_connection: Any) -> Callable[..., Any]:
    """Invoke the app in-process (laptop state isolated); any attempt to connect fails the test."""
    from typer.testing import CliRunner

    from sparkctl.cli.app import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args))
