"""Everything a planner may look at. Planners take this and return data; they hold nothing else."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from sparkctl.facts.models import HostFacts, Interface, NmCheckpoints
from sparkctl.inventory.models import Host, Inventory


@dataclass(frozen=True)
class PlanContext:
    """Inventory + facts + runbook parameters + digests of laptop-side files, and what earlier stages change."""

    inventory: Inventory
    facts: Mapping[str, HostFacts]
    params: Mapping[str, Any] = field(default_factory=dict)
    digests: Mapping[str, str] = field(default_factory=dict)
    changed: frozenset[str] = frozenset()
    offline: bool = False
    """Facts are assumed (a fresh host), not read: checks that judge facts cannot give a verdict."""

    def after(self, kinds: set[str]) -> PlanContext:
        """The context for later stages, knowing that steps of these kinds will have run."""
        return replace(self, changed=self.changed | kinds)

    def home(self, host: Host) -> str:
        """The login user's home on a host (as the probe saw it)."""
        return self.facts[host.name].home or f"/home/{self.inventory.ssh.user or 'user'}"


def fresh_facts(inv: Inventory, host: Host) -> HostFacts:
    """Facts of a host as sparkctl expects a fresh install to look (for `plan --offline`)."""
    interfaces = {t.interface: Interface(name=t.interface, mtu=1500, operstate="UP", up=True) for t in host.fabric}
    user = host.ssh.user or inv.ssh.user or "user"
    # NetworkManager numbers its device objects in the order it finds them (loopback first); assumed, like the rest
    devices = {t.interface: f"/org/freedesktop/NetworkManager/Devices/{i + 3}" for i, t in enumerate(host.fabric)}
    return HostFacts(
        host=host.name,
        user=user,
        home=f"/home/{user}",
        hostname=host.name,
        interfaces=interfaces,
        nm_running=True,
        nm_checkpoints=NmCheckpoints(devices=devices),
    )
