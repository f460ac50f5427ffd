"""Read-only answers about hosts: the doctor's findings for an inventory's hosts, and an inventory proposed for
hosts that have none yet (`discover`)."""

from __future__ import annotations

from collections.abc import Mapping

from sparkctl.doctor.evaluate import evaluate
from sparkctl.doctor.evaluators import CheckContext
from sparkctl.doctor.rules import Finding
from sparkctl.facts.discover import DISCOVER_PROBE, parse_discovery, propose_inventory
from sparkctl.inventory.models import Inventory, SshSettings
from sparkctl.session.door import open_discovery, open_session
from sparkctl.session.reads import measure_jumbo


def doctor_findings(inv: Inventory, accept_new_host_keys: bool) -> list[Finding]:
    """Every rule judged over what the hosts report, jumbo pings included.

    A host that does not answer is a failed `host-reachable` finding; the others are judged all the same."""
    session = open_session(inv, accept_new_host_keys, partial=True)
    try:
        return evaluate(CheckContext(inv, session.facts, measure_jumbo(session), session.unreachable))
    finally:
        session.close()


def discover_inventory(
    addresses: list[str],
    settings: SshSettings,
    accept_new_host_keys: bool,
    cluster: str,
    used: Mapping[str, object],
) -> tuple[str, list[str]]:
    """Probe hosts that have no inventory yet; the proposed inventory's YAML text, and what could not be told.

    `used`: the connection options given on the command line, written into the proposal."""
    outputs = open_discovery(addresses, settings, accept_new_host_keys).probe(DISCOVER_PROBE)
    found = [parse_discovery(addr, outputs[addr]) for addr in addresses]
    return propose_inventory(found, cluster, used)
