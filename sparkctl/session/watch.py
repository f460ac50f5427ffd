"""`status --watch`: the cluster re-read every few seconds over the session's open connections (reads only).

Per host, one light probe per refresh (facts/probe.py `build_watch_probe`): the GPU's load as nvidia-smi reports
it, memory and page cache, the twins, Ray. Per workload, `/health` and `/metrics` from the laptop (both without the
API key, as vLLM serves them), turned into rates between two refreshes. The warnings are doctor's own rules
(`gpu-temperature`, `page-cache` in sparkctl/data/rules.yaml), run on the fresh facts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from sparkctl.doctor.evaluators import EVALUATORS, CheckContext
from sparkctl.doctor.rules import Finding, load_rules
from sparkctl.errors import HostError
from sparkctl.facts.metrics import EMBED_COUNTERS, EMBED_GAUGES, VLLM_COUNTERS, VLLM_GAUGES, Counters, parse_metrics
from sparkctl.facts.metrics import rates as counter_rates
from sparkctl.facts.models import Gpu, HostFacts
from sparkctl.facts.probe import build_watch_probe
from sparkctl.facts.watch import WatchSample, parse_watch
from sparkctl.inventory.models import Inventory, Workload
from sparkctl.plan import layout as lc
from sparkctl.plan.context import PlanContext
from sparkctl.plan.fabric import twin_state
from sparkctl.plan.live_state import ray_node_state, workload_state
from sparkctl.session.session import Session
from sparkctl.session.views import Health, HostLost, HostWatch, Memory, WatchTwin, WatchView, WorkloadWatch

WATCH_RULES = ("gpu-temperature", "page-cache")
"""Doctor rules whose thresholds the view colours by (their levels and limits live in the rule table only)."""


def host_view(inv: Inventory, name: str, sample: WatchSample, ray: str, warnings: list[Finding]) -> HostWatch:
    """One host's row: GPU load, memory, twins, Ray and the watched rules' warnings (pure)."""
    f = sample.facts
    host = inv.host(name)
    kb = f.meminfo_kb
    total, cached = kb.get("MemTotal", 0), kb.get("Cached", 0)
    fabric = []
    for t in host.fabric:
        live = f.interfaces.get(t.interface)
        fabric.append(
            WatchTwin(
                interface=t.interface,
                up=bool(live and live.up),
                mtu=live.mtu if live else None,
                ipv4=live.ipv4 if live else [],
                want=str(t.address),
                ok=twin_state(t, live, inv.network.mtu).ok,
            )
        )
    memory = Memory(
        total_mib=total // 1024,
        available_mib=kb.get("MemAvailable", 0) // 1024,
        page_cache_mib=cached // 1024,
        page_cache_fraction=cached / total if total else None,
    )
    return HostWatch(
        gpus=sample.gpus,
        gpu_simulated=sample.gpu_simulated,
        memory=memory,
        fabric=fabric,
        ray=ray,
        warnings=warnings,
    )


def health_of(status: int | None, body: str) -> Health:
    """/health's answer -> 'ok', 'loading', 'broken' (the embed worker's failed backend) or 'down' (pure)."""
    if status is None:
        return "down"
    if status == 200:
        return "ok"
    return "broken" if '"failed"' in body else "loading"


@dataclass
class Watch:
    """Refreshes of one cluster over one open session; keeps the last counters to turn them into rates."""

    session: Session
    secrets: Mapping[str, str]
    clock: Callable[[], float] = time.monotonic
    timeout: float = 5.0
    last: dict[str, tuple[float, Counters]] = field(default_factory=dict)
    gpus: dict[str, list[Gpu]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # nvidia-smi's name and driver come from the session's full probe; each refresh updates the temperature
        self.gpus = {n: list(f.gpus) for n, f in self.session.facts.items()}

    def sample(self) -> WatchView:
        """One refresh: every host in parallel over its open connection, then every workload's endpoint."""
        inv = self.session.inventory
        outputs = self.session.sample(build_watch_probe, timeout=self.timeout * 4)
        samples: dict[str, WatchSample] = {}
        lost: dict[str, HostLost] = {}
        for h in inv.hosts:
            out = outputs.get(h.name)
            if isinstance(out, str):
                samples[h.name] = parse_watch(h.name, out)
            else:
                why = "; ".join(p.message for p in out.problems) if isinstance(out, HostError) else "not connected"
                lost[h.name] = HostLost(error=why)
        facts = {name: self._merged(name, sample) for name, sample in samples.items()}
        ctx = PlanContext(inv, facts, {}, self.session.digests(self.secrets))
        warnings: dict[str, list[Finding]] = {name: [] for name in facts}
        for finding in self._findings(inv, facts):
            if finding.subject in warnings and finding.level != "pass":
                warnings[finding.subject].append(finding)
        hosts: dict[str, HostWatch | HostLost] = {
            h.name: host_view(inv, h.name, samples[h.name], ray_node_state(ctx, h), warnings[h.name])
            if h.name in samples
            else lost[h.name]
            for h in inv.hosts
        }
        workloads = {w.name: self._workload(ctx, w, inv.workload_head(w).name in facts) for w in inv.workloads}
        return WatchView(cluster=inv.cluster, time=time.strftime("%H:%M:%S"), hosts=hosts, workloads=workloads)

    def _merged(self, name: str, sample: WatchSample) -> HostFacts:
        """This refresh's facts, with what the light probe does not re-read (who the login user is, the GPU's
        name) from the session's full probe, and the fresh GPU temperature."""
        known = self.gpus.get(name) or [Gpu(name="GPU", compute_cap="", driver="")]
        gpus = [
            g.model_copy(update={"temperature": use.temperature}) for g, use in zip(known, sample.gpus, strict=False)
        ]
        first = self.session.facts.get(name)
        same = {"user": first.user, "home": first.home, "hostname": first.hostname} if first else {}
        return sample.facts.model_copy(update={"gpus": gpus, **same})

    def _findings(self, inv: Inventory, facts: Mapping[str, HostFacts]) -> list[Finding]:
        """Doctor's own evaluators for the watched rules, on this refresh's facts."""
        check = CheckContext(inv, facts)
        out: list[Finding] = []
        for rule in load_rules().rules:
            if rule.id in WATCH_RULES:
                out += EVALUATORS[rule.check](check, rule)
        return out

    def _workload(self, ctx: PlanContext, w: Workload, head_seen: bool) -> WorkloadWatch:
        """/health, then (when it answers) /metrics: its counters and gauges, and rates since the last refresh."""
        base = lc.endpoint(self.session.inventory, w)
        try:
            status, body = self.session.get_text(base + "/health", timeout=self.timeout)
        except Exception:  # refused, timed out, cut off mid-answer: the view goes on, the workload shows down
            status, body = None, ""
        rates: dict[str, float | None] = {}
        counters, error = Counters(), ""
        if status is not None:
            try:
                now, counters = self._metrics(base, w)
            except Exception as exc:  # not reachable, or not the Prometheus text format: said in the view
                error = f"/metrics: {exc}"[:200]
            else:
                before = self.last.get(w.name)
                rates = counter_rates(before[1] if before else None, counters, now - before[0] if before else 0.0)
                self.last[w.name] = (now, counters)
        return WorkloadWatch(
            engine=w.engine,
            endpoint=base + "/v1",
            process=workload_state(ctx, w) if head_seen else "unknown",
            rates=rates,
            totals=dict(counters.totals),
            gauges=dict(counters.gauges),
            metrics_error=error,
            health=health_of(status, body),
        )

    def _metrics(self, base: str, w: Workload) -> tuple[float, Counters]:
        """The workload's /metrics page, read now, as counters (raises when it cannot be read or parsed)."""
        status, text = self.session.get_text(base + "/metrics", timeout=self.timeout)
        if status != 200:
            raise ValueError(f"/metrics answered {status}")
        names, gauges = (EMBED_COUNTERS, EMBED_GAUGES) if w.engine == "embed" else (VLLM_COUNTERS, VLLM_GAUGES)
        return self.clock(), parse_metrics(text, names, gauges)
