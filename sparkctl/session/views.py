"""What `status` and `status --watch` show: pure data, built by session/status.py and session/watch.py.

`status --json` prints `ClusterStatus` as it dumps (`model_dump(mode="json")`): the field order here is the key
order of that output, which users and tests parse.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from sparkctl.doctor.rules import Finding
from sparkctl.facts.watch import GpuUse


class _View(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --- status ------------------------------------------------------------------------------------------------


class FabricTwin(_View):
    """One fabric interface of a host: the address the inventory wants, what the host has, and whether they agree."""

    interface: str
    want: str = Field(description="the inventory's address with prefix, e.g. 192.168.100.10/24")
    mtu: int | None = Field(description="the live MTU; None when the interface is missing")
    ipv4: list[str] = Field(description="the live addresses with prefix")
    ok: bool = Field(description="plan/fabric.twin_state's verdict")


RayStatus = Literal[
    "running", "not running", "not started (no workload needs it)", "left running (no workload needs it: up stops it)"
]


class HostStatus(_View):
    """One reachable host: its twins, its neighbours on the fabric, Ray, whether the env file is there."""

    fabric: list[FabricTwin]
    neighbours: list[str]
    ray: RayStatus
    env_file: bool


class WorkloadStatus(_View):
    """One workload: where it answers, its process as the facts show it, its endpoint's health."""

    engine: str
    endpoint: str = Field(description="the OpenAI-compatible base URL, ending in /v1")
    hosts: list[str] | None = Field(None, description="the inventory's host group; None when it runs on every host")
    head: str
    process: str = Field(description="'ok', 'stopped', 'broken', 'changed', or 'unknown' when a host was not read")
    health: str = Field(description="the HTTP probe's phase: 'down', 'loading', 'broken', 'listed' or 'ready'")
    detail: str = ""
    recorded: str = Field("", description="what the workload recorded about itself (plan/live_state.group_health)")


class UnreachableHost(_View):
    """A host the session could not reach: why, and what to check."""

    error: str
    hint: str


class ClusterStatus(_View):
    """`sparkctl status`: per reachable host, per workload, and the hosts that could not be reached."""

    cluster: str
    topology: str
    hosts: dict[str, HostStatus]
    workloads: dict[str, WorkloadStatus]
    unreachable: dict[str, UnreachableHost] = Field(default_factory=dict)


# --- status --watch ----------------------------------------------------------------------------------------


class WatchTwin(_View):
    """One fabric interface in the watch view (its link state too)."""

    interface: str
    up: bool
    mtu: int | None
    ipv4: list[str]
    want: str
    ok: bool


class Memory(_View):
    """The host's memory from /proc/meminfo, in MiB (GB10: CPU and GPU share it)."""

    total_mib: int
    available_mib: int
    page_cache_mib: int
    page_cache_fraction: float | None = Field(description="page cache over total; None when the total is unknown")


class HostWatch(_View):
    """One host that answered this refresh: GPU load, memory, twins, Ray, and the doctor rules' warnings."""

    reachable: Literal[True] = True
    gpus: list[GpuUse]
    gpu_simulated: bool
    memory: Memory
    fabric: list[WatchTwin]
    ray: str = Field(description="plan/live_state.ray_node_state: 'alive', 'not connected', 'not as specified', ...")
    warnings: list[Finding] = Field(default_factory=list, description="the watched rules' warn and fail findings")


class HostLost(_View):
    """One host that did not answer this refresh."""

    reachable: Literal[False] = False
    error: str


Health = Literal["ok", "loading", "broken", "down"]


class WorkloadWatch(_View):
    """One workload this refresh: /health, and /metrics turned into rates since the previous refresh."""

    engine: str
    endpoint: str
    process: str
    rates: dict[str, float | None] = Field(default_factory=dict, description="per second; None without a rate yet")
    totals: dict[str, float] = Field(default_factory=dict)
    gauges: dict[str, float] = Field(default_factory=dict)
    metrics_error: str = ""
    health: Health


class WatchView(_View):
    """One refresh of `status --watch`."""

    cluster: str
    time: str = Field(description="the laptop's clock, HH:MM:SS")
    hosts: dict[str, Annotated[HostWatch | HostLost, Field(discriminator="reachable")]]
    workloads: dict[str, WorkloadWatch]
