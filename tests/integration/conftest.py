"""Fixtures for the integration tests: one testbed of fake Sparks shared by the whole session."""

from __future__ import annotations

import fcntl
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    from tests.testbed import Testbed
except ImportError:  # plain `pytest` without the checkout on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.testbed import Testbed

from tests.testbed.layout import parse_gid_option

_TIMINGS: dict[str, float] = {}

NOT_ROOT_REASON = (
    "testbed tests need root (network namespaces, overlay mounts, veth links); "
    "this run is not root, so they are skipped. Run as root, e.g. sudo python3 -m pytest "
    "(CI runs as root)."
)


Shape = tuple[int, str | None]
"""(hosts, topology) of a testbed; topology None: the default for that many hosts."""


class _Shaper:
    """The session's one testbed, rebuilt when a test needs another shape (a ring, a 4-host switch).

    Tests are ordered so that each shape is built once (pytest_collection_modifyitems): the default shape's tests
    first, then those of each `testbed_shape` marker, grouped.
    """

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self.request = request
        self.tb = Testbed()
        self.shape: Shape | None = None
        self.default: Shape = (int(request.config.getoption("--testbed-hosts")), None)

    def ensure(self, shape: Shape) -> Testbed:
        if shape == self.shape:
            return self.tb
        gid = parse_gid_option(self.request.config.getoption("--testbed-gid-index")) if shape == self.default else {}
        self.tb.down()  # leftovers of a previous run that crashed or was killed, or the previous shape
        start = time.monotonic()
        self.tb.up(hosts=shape[0], gid_index=gid, topology=shape[1])
        label = f"{shape[0]} hosts{' ' + shape[1] if shape[1] else ''}"
        _TIMINGS[f"up ({label})"] = time.monotonic() - start
        if shape == self.default:
            _TIMINGS.update({f"up: {k}": v for k, v in self.tb.timings.items()})
        self.shape = shape
        return self.tb


@pytest.fixture(scope="session")
def _shaper(request: pytest.FixtureRequest) -> _Shaper:
    if os.geteuid() != 0:
        pytest.skip(NOT_ROOT_REASON)
    # One testbed per machine (fixed namespace and bridge names): concurrent test sessions take turns.
    lock = open("/var/tmp/sparkctl-testbed.lock", "w")  # noqa: SIM115 - held for the whole session
    fcntl.flock(lock, fcntl.LOCK_EX)
    request.addfinalizer(lock.close)
    shaper = _Shaper(request)
    if not request.config.getoption("--testbed-keep"):
        request.addfinalizer(shaper.tb.down)
    return shaper


@pytest.fixture(scope="session")
def testbed(_shaper: _Shaper) -> Testbed:
    """The session's fake Sparks, up; removed at the end (also cleans a crashed earlier run)."""
    return _shaper.ensure(_shaper.default)


@pytest.fixture
def shaped_testbed(request: pytest.FixtureRequest, _shaper: _Shaper) -> Testbed:
    """The testbed in the shape of the test's `testbed_shape(hosts=..., topology=...)` marker, hosts fresh."""
    marker = request.node.get_closest_marker("testbed_shape")
    assert marker is not None, "shaped_testbed needs @pytest.mark.testbed_shape(hosts=..., topology=...)"
    tb = _shaper.ensure((int(marker.kwargs["hosts"]), marker.kwargs.get("topology")))
    tb.reset_hosts()
    return tb


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _TIMINGS:
        terminalreporter.section("testbed timings")
        for name, seconds in _TIMINGS.items():
            terminalreporter.write_line(f"{name:<24} {seconds:6.2f}s")


@pytest.fixture
def fresh_testbed(testbed: Testbed, _shaper: _Shaper) -> Testbed:
    """The shared testbed with every host reset to a fresh install before the test."""
    _shaper.ensure(_shaper.default)  # back to the session's shape if a shaped test ran before
    start = time.monotonic()
    testbed.reset_hosts()
    _TIMINGS["reset_hosts (last)"] = time.monotonic() - start
    return testbed


@pytest.fixture
def inventory(fresh_testbed: Testbed) -> Path:
    """Path of a sparkctl inventory for the fresh hosts (no workloads)."""
    return fresh_testbed.inventory_path()


@pytest.fixture
def gid_index_mismatch(fresh_testbed: Testbed) -> Iterator[Testbed]:
    """Host spark-b's RoCE v2 IPv4 GID entry at index 5 while spark-a's stays at 3."""
    fresh_testbed.set_gid_index("spark-b", 5)
    yield fresh_testbed
    fresh_testbed.set_gid_index("spark-b", fresh_testbed.spec("spark-b").gid_index, wait=False)


@pytest.fixture
def sudo_env(testbed: Testbed) -> dict[str, str]:
    """Environment for running sparkctl: the sudo password of the hosts that ask for one."""
    return {**os.environ, "SPARKCTL_SUDO_PASSWORD": testbed.sudo_password}


def _shape_key(item: pytest.Item) -> tuple[bool, int, str]:
    marker = item.get_closest_marker("testbed_shape")
    if marker is None:
        return (False, 0, "")
    return (True, int(marker.kwargs["hosts"]), str(marker.kwargs.get("topology") or ""))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that need no testbed run first, so the machine-wide testbed lock is held only while testbed tests run;
    tests of another testbed shape run last, grouped by shape, so each shape is built once."""
    items.sort(key=lambda item: (item.get_closest_marker("testbed") is not None, _shape_key(item)))
