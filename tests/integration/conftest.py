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


@pytest.fixture(scope="session")
def testbed(request: pytest.FixtureRequest) -> Testbed:
    """The session's fake Sparks, up; removed at the end (also cleans a crashed earlier run)."""
    if os.geteuid() != 0:
        pytest.skip(NOT_ROOT_REASON)
    # One testbed per machine (fixed namespace and bridge names): concurrent test sessions take turns.
    lock = open("/var/tmp/sparkctl-testbed.lock", "w")  # noqa: SIM115 - held for the whole session
    fcntl.flock(lock, fcntl.LOCK_EX)
    request.addfinalizer(lock.close)
    tb = Testbed()
    tb.down()  # leftovers of a previous run that crashed or was killed
    if not request.config.getoption("--testbed-keep"):
        request.addfinalizer(tb.down)
    start = time.monotonic()
    tb.up(
        hosts=request.config.getoption("--testbed-hosts"),
        gid_index=parse_gid_option(request.config.getoption("--testbed-gid-index")),
    )
    _TIMINGS["up (fixture)"] = time.monotonic() - start
    _TIMINGS.update({f"up: {k}": v for k, v in tb.timings.items()})
    return tb


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _TIMINGS:
        terminalreporter.section("testbed timings")
        for name, seconds in _TIMINGS.items():
            terminalreporter.write_line(f"{name:<24} {seconds:6.2f}s")


@pytest.fixture
def fresh_testbed(testbed: Testbed) -> Testbed:
    """The shared testbed with every host reset to a fresh install before the test."""
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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that need no testbed run first, so the machine-wide testbed lock is held only while testbed tests run."""
    items.sort(key=lambda item: item.get_closest_marker("testbed") is not None)
