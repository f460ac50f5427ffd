"""The fabric throughput fallback as steps: one TCP stream per link, peers listen, the first host sends."""

from __future__ import annotations

from sparkctl.inventory.models import Host
from sparkctl.plan.commands import runtime_python
from sparkctl.plan.context import PlanContext
from sparkctl.plan.models import Command, Step

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


def plan_bench_fabric(ctx: PlanContext, host: Host) -> list[Step]:
    """The bench as runbook steps: peers listen, the first host sends, link by link (hosts run in parallel).

    `ctx.params` carries the action's arguments: `mb` sent per link and the `port` the peers listen on.
    """
    inv = ctx.inventory
    mb, port = int(ctx.params["mb"]), int(ctx.params["port"])
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
