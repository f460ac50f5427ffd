"""What `status --watch` reads on every refresh: the light probe's output as HostFacts plus the GPU's load."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from sparkctl.facts.models import HostFacts
from sparkctl.facts.parse import parse_probe, parse_sections

NOT_REPORTED = ("[n/a]", "n/a", "[not supported]", "not supported", "")
"""How nvidia-smi's CSV output says a field has no value on this GPU (GB10 reports its memory so)."""


class GpuUse(BaseModel):
    """One GPU's load as `nvidia-smi --query-gpu=temperature.gpu,utilization.gpu,memory.used,memory.total
    --format=csv,noheader,nounits` reports it; None where nvidia-smi reports no value."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: int | None = None
    utilization: int | None = None
    memory_used_mib: int | None = None
    memory_total_mib: int | None = None


def _number(text: str) -> int | None:
    value = text.strip()
    if value.lower() in NOT_REPORTED:
        return None
    try:
        return round(float(value.split()[0]))
    except (ValueError, IndexError):
        return None


def parse_gpu_use(text: str) -> list[GpuUse]:
    """The query's CSV lines (no header, no units) -> one GpuUse per GPU; error lines are skipped."""
    gpus = []
    for line in text.splitlines():
        parts = line.split(",")
        if len(parts) != 4 or _number(parts[0]) is None:
            continue
        temp, util, used, total = (_number(p) for p in parts)
        gpus.append(GpuUse(temperature=temp, utilization=util, memory_used_mib=used, memory_total_mib=total))
    return gpus


class WatchSample(BaseModel):
    """One refresh of one host."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    facts: HostFacts
    gpus: list[GpuUse]
    gpu_simulated: bool = False


def parse_watch(host: str, output: str) -> WatchSample:
    """The watch probe's output -> facts (the sections it re-reads) and the GPUs' load."""
    sections = parse_sections(output)
    return WatchSample(
        facts=parse_probe(host, output),
        gpus=parse_gpu_use(sections.get("gpu_use", "")),
        gpu_simulated="simulated" in sections.get("gpu_tool", "").lower(),
    )
