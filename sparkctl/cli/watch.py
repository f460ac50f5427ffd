"""`status --watch`: the view (rich tables) and the refresh loop. rich is imported here, when the view is drawn."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from sparkctl.cli.render import escape_controls
from sparkctl.inventory.models import Inventory
from sparkctl.session.interrupts import INTERRUPTS

if TYPE_CHECKING:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from sparkctl.session.views import HostWatch, WatchView

GB10_MEMORY_NOTE = (
    "GPU memory: nvidia-smi reports none on GB10 ([N/A]: CPU and GPU share one unified memory), so the host's "
    "memory is shown; `page cache` competes with CUDA allocations"
)
LEVEL_STYLE = {"warn": "yellow", "fail": "bold red"}


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _gpu_cell(h: HostWatch) -> str:
    if not h.gpus:
        return "no GPU found"
    parts = []
    for g in h.gpus:
        temp = "?" if g.temperature is None else f"{g.temperature} C"
        util = "?" if g.utilization is None else f"{g.utilization} %"
        if g.memory_used_mib is not None and g.memory_total_mib is not None:
            mem = f"{g.memory_used_mib}/{g.memory_total_mib} MiB"
        else:
            mem = "memory n/a"
        parts.append(f"{temp}, {util}, {mem}")
    text = "\n".join(parts)
    return text + "\n(simulated)" if h.gpu_simulated else text


def _text(value: object, style: str = "") -> Text:
    """A table cell: the value as text, control characters escaped."""
    from rich.text import Text

    return Text(escape_controls(str(value)), style=style)


def _memory_cell(h: HostWatch) -> str:
    m = h.memory
    frac = m.page_cache_fraction
    mem = f"{m.available_mib} of {m.total_mib} MiB / {m.page_cache_mib} MiB"
    return mem + (f" ({frac:.0%})" if frac is not None else "")


def _fabric_cell(h: HostWatch) -> Text:
    from rich.text import Text

    fabric = Text()
    for i, link in enumerate(h.fabric):
        line = f"{link.interface} {'up' if link.up else 'DOWN'} {link.mtu or '-'} "
        line += ",".join(link.ipv4) or "no IPv4"
        fabric.append(("\n" if i else "") + escape_controls(line), style="" if link.ok else "red")
    return fabric


def _host_table(view: WatchView) -> Table:
    """One row per host: GPU, memory, twins, Ray; coloured by the doctor rules' warnings."""
    from rich.table import Table

    t = _text
    hosts = Table(title=t(f"{view.cluster}  {view.time}  (Ctrl-C leaves)"), title_justify="left", expand=False)
    for col in ("host", "GPU temp, util, memory", "memory avail / page cache", "fabric (state MTU address)", "Ray"):
        hosts.add_column(col)
    for name, h in view.hosts.items():
        if not h.reachable:
            hosts.add_row(t(name), t(f"unreachable: {h.error}", "bold red"), "", "", "")
            continue
        levels = {w.rule: w.level for w in h.warnings}
        hosts.add_row(
            t(name),
            t(_gpu_cell(h), LEVEL_STYLE.get(levels.get("gpu-temperature", ""), "")),
            t(_memory_cell(h), LEVEL_STYLE.get(levels.get("page-cache", ""), "")),
            _fabric_cell(h),
            t(h.ray, {"alive": "green", "not needed": "dim"}.get(h.ray, "red")),
        )
    return hosts


def _warnings(view: WatchView) -> list[Text]:
    """The doctor rules' warnings, one line each, in their level's colour."""
    lines = []
    for name, h in view.hosts.items():
        for w in h.warnings if h.reachable else []:
            fix = f"; fix: {w.fix}" if w.fix else ""
            lines.append(_text(f"{w.level}: {w.rule} {name}: {w.evidence}{fix}", LEVEL_STYLE[w.level]))
    return lines


def _workload_table(view: WatchView) -> Table:
    """One row per workload: endpoint, process, health, rates, then totals and gauges (or why /metrics failed)."""
    from rich.table import Table

    t = _text
    loads = Table(expand=False)
    for col in ("workload", "endpoint", "process", "health", "req/s", "prompt tok/s", "gen tok/s", "totals"):
        loads.add_column(col)
    for name, w in view.workloads.items():
        r = w.rates
        totals = ", ".join(f"{k} {v:.0f}" for k, v in w.totals.items())
        gauges = ", ".join(f"{k} {v:.0f}" for k, v in w.gauges.items())
        detail = w.metrics_error or ("; ".join(x for x in (totals, gauges) if x))
        health = w.health
        loads.add_row(
            t(f"{name} ({w.engine})"),
            t(w.endpoint),
            t(w.process, "" if w.process == "ok" else "yellow"),
            t(health, "green" if health == "ok" else ("bold red" if health in ("broken", "down") else "yellow")),
            t(_rate(r.get("requests"))),
            t(_rate(r.get("prompt_tokens"))),
            t(_rate(r.get("generation_tokens")) if w.engine != "embed" else "n/a"),
            t(detail, "yellow" if w.metrics_error else "dim"),
        )
    return loads


def render_watch(view: WatchView) -> Group:
    """The watch screen: hosts, workloads, then the doctor rules' warnings in colour (pure: view -> renderables)."""
    from rich.console import Group

    notes = [_text(GB10_MEMORY_NOTE, "dim")]
    if any(h.reachable and h.gpu_simulated for h in view.hosts.values()):
        notes.append(_text("simulated: the GPU values come from a simulated nvidia-smi (it says so itself)", "magenta"))
    return Group(_host_table(view), _workload_table(view), *_warnings(view), *notes)


def watch(inv: Inventory, *, interval: float, accept_new_host_keys: bool) -> None:
    """Refresh until Ctrl-C (then exit 0); one SSH connection per host, opened once and reused."""
    from rich.console import Console
    from rich.live import Live

    from sparkctl.session.door import open_session
    from sparkctl.session.watch import Watch

    console = Console()
    session = open_session(inv, accept_new_host_keys)
    try:
        watcher = Watch(session, session.secrets_for_plan())
        if not console.is_terminal:  # piped: one screen per refresh, appended (like `kubectl get -w`)
            while True:
                console.print(render_watch(watcher.sample()))
                time.sleep(interval)
        with Live(render_watch(watcher.sample()), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(render_watch(watcher.sample()), refresh=True)
    except KeyboardInterrupt:
        pass
    finally:
        with INTERRUPTS.shielded("closing the connections"):
            session.close()
