"""The session's fact probe: the probe script on every host in parallel, one round trip each (read-only)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

from sparkctl.errors import HostError
from sparkctl.execute.base import Result, Transport
from sparkctl.facts.models import HostFacts
from sparkctl.facts.parse import parse_probe
from sparkctl.facts.probe import MARK, build_probe
from sparkctl.inventory.models import Host, Inventory

PROBE_TIMEOUT = 60


def gather_host(inv: Inventory, name: str, transport: Transport) -> HostFacts:
    """Run the probe on one host and parse it."""
    result = transport.run("sh -s", stdin=build_probe(inv, inv.host(name)), timeout=PROBE_TIMEOUT)
    return facts_from(name, result)


def facts_from(name: str, result: Result) -> HostFacts:
    """The facts in a probe's output (run alone, or right after taking the cluster lock)."""
    if f"{MARK} end" not in result.stdout:
        raise HostError(f"{name}: the fact probe did not complete (exit {result.exit_code}): {result.stderr[-300:]}")
    return parse_probe(name, result.stdout)


def gather_facts(
    inv: Inventory, transports: Mapping[str, Transport], probed: Mapping[str, Result] | None = None
) -> dict[str, HostFacts | HostError]:
    """Facts per host, or the error that kept us from them. A host in `probed` already ran the probe (its output
    is parsed, not asked for again)."""
    given = probed or {}

    def one(name: str) -> HostFacts | HostError:
        try:
            return facts_from(name, given[name]) if name in given else gather_host(inv, name, transports[name])
        except HostError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=max(1, len(transports))) as pool:
        return dict(zip(transports, pool.map(one, transports), strict=True))


def gather_outputs(
    inv: Inventory, transports: Mapping[str, Transport], build: Callable[[Inventory, Host], str], timeout: float
) -> dict[str, str | HostError]:
    """A read-only probe script (built per host, printing MARK sections) on every host in parallel: its output,
    or the error that kept us from it."""

    def one(name: str) -> str | HostError:
        try:
            result = transports[name].run("sh -s", stdin=build(inv, inv.host(name)), timeout=timeout)
        except HostError as exc:
            return exc
        if f"{MARK} end" not in result.stdout:
            return HostError(f"{name}: the probe did not complete (exit {result.exit_code}): {result.stderr[-300:]}")
        return result.stdout

    with ThreadPoolExecutor(max_workers=max(1, len(transports))) as pool:
        return dict(zip(transports, pool.map(one, transports), strict=True))
