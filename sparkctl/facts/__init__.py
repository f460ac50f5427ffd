"""Facts: one read-only probe per host, parsed by pure functions into frozen HostFacts."""

from sparkctl.facts.models import HostFacts
from sparkctl.facts.parse import parse_probe
from sparkctl.facts.probe import build_probe

__all__ = ["HostFacts", "build_probe", "parse_probe"]
