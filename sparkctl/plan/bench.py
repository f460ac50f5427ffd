"""Read-only measurements that facts alone cannot give: jumbo pings and the fabric throughput fallback."""

from __future__ import annotations

import shlex
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

from sparkctl.execute.base import Transport
from sparkctl.facts.models import HostFacts
from sparkctl.inventory.models import Host, Inventory
from sparkctl.plan.cluster import plan_verify_fabric
from sparkctl.plan.commands import runtime_python
from sparkctl.plan.context import PlanContext
from sparkctl.plan.models import Command, Step

Link = tuple[str, str, str]


def measure_jumbo(
    inv: Inventory, facts: Mapping[str, HostFacts], transports: Mapping[str, Transport]
) -> dict[Link, tuple[bool, str]]:
    """Run the same unfragmented pings `up` verifies with, once, on every host in parallel."""
    ctx = PlanContext(inv, facts)
    results: dict[Link, tuple[bool, str]] = {}
    lock = threading.Lock()

    def host(name: str) -> None:
        for step in plan_verify_fabric(ctx, inv.host(name)):
            argv = step.commands[0].argv
            r = transports[name].run(shlex.join(argv), timeout=20)
            summary = next((ln for ln in r.stdout.splitlines() if "packet loss" in ln), "")
            err = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
            with lock:
                results[(name, argv[-2], argv[-1])] = (r.ok, summary or err or f"exit {r.exit_code}")

    with ThreadPoolExecutor(max_workers=len(inv.hosts)) as pool:
        list(pool.map(host, [h.name for h in inv.hosts]))
    return results


_SERVER = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); s.settimeout(20)
c, _ = s.accept(); n = 0; t = time.monotonic()
while True:
    b = c.recv(1 << 20)
    if not b: break
    n += len(b)
print(n, time.monotonic() - t)
"""
_CLIENT = """
import socket, sys, time
for i in range(50):
    try:
        c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5); break
    except OSError: time.sleep(0.1)
buf = b"\\0" * (1 << 20); total = int(sys.argv[3]) << 20; t = time.monotonic(); sent = 0
while sent < total:
    c.sendall(buf); sent += len(buf)
c.shutdown(socket.SHUT_WR); c.recv(1); print(sent, time.monotonic() - t)
"""


def bench_commands(ctx: PlanContext, host: Host, mb: int, port: int) -> list[Step]:
    """The bench as runbook steps: peers listen, the first host sends, link by link (hosts run in parallel)."""
    inv = ctx.inventory
    python = runtime_python(inv)
    src = inv.hosts[0]
    steps = []
    for peer in inv.hosts[1:]:
        for j, twin in enumerate(src.fabric):
            dst = str(peer.fabric[j].address.ip)
            if host.name == peer.name:
                steps.append(
                    Step(
                        host=host.name,
                        kind="bench_listen",
                        target=f"{peer.fabric[j].interface}",
                        description=f"receive {mb} MB on {dst}:{port}",
                        changes=False,
                        commands=[Command(argv=[python, "-c", _SERVER, dst, str(port)], timeout=120)],
                    )
                )
            elif host.name == src.name:
                steps.append(
                    Step(
                        host=host.name,
                        kind="bench_send",
                        target=f"{twin.interface}->{peer.name}",
                        description=f"send {mb} MB over {twin.interface} to {peer.name} {dst}",
                        changes=False,
                        commands=[Command(argv=[python, "-c", _CLIENT, dst, str(port), str(mb)], timeout=120)],
                    )
                )
    return steps
