"""Options and markers shared by every test directory (pytest reads hooks like these only from top conftests)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "testbed: end-to-end tests against fake Sparks in network namespaces (root only)"
    )
    config.addinivalue_line(
        "markers",
        "testbed_shape(hosts, topology): the test runs on a testbed of this shape (fixture shaped_testbed); "
        "the session rebuilds the testbed once per shape",
    )


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("testbed")
    group.addoption("--testbed-hosts", type=int, default=2, help="number of fake Sparks (default 2)")
    group.addoption(
        "--testbed-gid-index",
        action="append",
        default=[],
        metavar="HOST=INDEX",
        help="RoCE v2 IPv4 GID index of a host for the whole session, e.g. spark-b=5",
    )
    group.addoption(
        "--testbed-keep",
        action="store_true",
        help="leave the testbed up after the session (python -m tests.testbed down removes it)",
    )
