"""Read-only measurements as steps: RoCE bandwidth (perftest, nccl-tests) and the TCP fallback."""

from __future__ import annotations

import re
import shlex

from sparkctl import paths
from sparkctl.inventory.models import Host, Inventory
from sparkctl.inventory.topology import End, links
from sparkctl.plan.context import PlanContext
from sparkctl.plan.env import detect_gid_index
from sparkctl.plan.models import Command, Step
from sparkctl.plan.runtime import runtime_python

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


RDMA_PORT = 18515
"""perftest's default port; the second twin uses the next one."""
RDMA_QPS = 4
"""Queue pairs per ib_write_bw run: one QP underestimates a 200G link (NVIDIA's guide shows ~92 Gb/s per link
with one); several approach line rate."""
RDMA_SECONDS = 5


def parse_ib_write_bw(text: str) -> float | None:
    """perftest `ib_write_bw --report_gbits` output -> the average bandwidth in Gb/s of its last result row.

    The table follows the header ` #bytes  #iterations  BW peak[Gb/sec]  BW average[Gb/sec]  MsgRate[Mpps]`
    (perftest `perftest_resources.c`, `print_report_bw`)."""
    rows = [ln.split() for ln in text.splitlines() if re.match(r"^\s*\d+\s+\d+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s*$", ln)]
    if "BW average[Gb/sec]" not in text or not rows:
        return None
    return float(rows[-1][3])


def parse_all_reduce_perf(text: str) -> dict[str, float | None]:
    """nccl-tests `all_reduce_perf` output -> its `# Avg bus bandwidth` (GB/s) and the peak busbw of its rows
    (out-of-place and in-place columns; nccl-tests `src/common.cu`)."""
    avg = re.search(r"^# Avg bus bandwidth\s*:\s*([\d.]+)", text, re.M)
    peak = None
    for ln in text.splitlines():
        cols = ln.split()
        if len(cols) >= 13 and cols[0].isdigit() and cols[2] in ("float", "half", "bfloat16", "double", "int8"):
            for value in (cols[7], cols[11]):
                try:
                    peak = max(peak or 0.0, float(value))
                except ValueError:
                    continue
    return {"avg_busbw_gbytes": float(avg.group(1)) if avg else None, "peak_busbw_gbytes": peak}


def _rdma_ready(ctx: PlanContext, a: Host, ja: int, b: Host, jb: int) -> bool:
    fa, fb = ctx.facts.get(a.name), ctx.facts.get(b.name)
    return bool(
        fa
        and fb
        and "ib_write_bw" in fa.tools
        and "ib_write_bw" in fb.tools
        and a.fabric[ja].rdma_device
        and b.fabric[jb].rdma_device
    )


def _ib_write_bw(ctx: PlanContext, host: Host, j: int, server: str | None, port_j: int) -> list[str]:
    twin = host.fabric[j]
    facts = ctx.facts[host.name]
    argv = [facts.tools["ib_write_bw"], "-d", twin.rdma_device or "", "-q", str(RDMA_QPS), "-F", "--report_gbits"]
    argv += ["-D", str(RDMA_SECONDS), "-p", str(RDMA_PORT + port_j)]
    gid, _ = detect_gid_index(facts, twin)
    if gid is not None:
        argv += ["-x", str(gid)]
    return [*argv, server] if server else argv


def bench_pairs(inv: Inventory) -> list[tuple[End, End]]:
    """(sender, receiver) of each measured link. A ring: every lane of every cable, from its Port0 end. Otherwise:
    the first host to every other host, twin by twin (on a switch, each host's port once)."""
    if inv.network.topology == "ring":
        return [(lane[0], lane[1]) for link in links(inv) for lane in link.lanes if len(lane) == 2]
    return [
        (End(0, j), End(i, j))
        for i in range(1, len(inv.hosts))
        for j in range(len(inv.hosts[0].fabric))
        if len(inv.hosts[i].fabric) > j
    ]


def _nccl_ready(ctx: PlanContext) -> bool:
    return all(
        "all_reduce_perf" in f.tools and "mpirun" in f.tools
        for f in (ctx.facts.get(h.name) for h in ctx.inventory.hosts)
        if f is not None
    ) and len(ctx.facts) == len(ctx.inventory.hosts)


def plan_bench_fabric(ctx: PlanContext, host: Host) -> list[Step]:
    """The bench as runbook steps, link by link (hosts run in parallel): per twin, `ib_write_bw` with several queue
    pairs where both ends have perftest, else one TCP stream (the fallback, labelled so); then nccl-tests'
    `all_reduce_perf` across the pair when every host has it (each rank loads its own host's env file).

    `ctx.params` carries the action's arguments: `mb` sent per link and the `port` the peers listen on.
    """
    inv = ctx.inventory
    steps = []
    for a, b in bench_pairs(inv):
        if _rdma_ready(ctx, inv.hosts[a.host], a.twin, inv.hosts[b.host], b.twin):
            steps += _rdma_link_steps(ctx, host, a, b)
        else:
            steps += _tcp_link_steps(ctx, host, a, b)
    src = inv.hosts[0]
    if host.name == src.name and len(inv.hosts) > 1 and _nccl_ready(ctx):
        steps.append(_nccl_step(ctx, src))
    return steps


def _rdma_link_steps(ctx: PlanContext, host: Host, a: End, b: End) -> list[Step]:
    """`host`'s part of one link's `ib_write_bw`: the server on the far end, the client (retried until the server
    listens) on the near end, nothing elsewhere."""
    inv = ctx.inventory
    src, peer, j, k = inv.hosts[a.host], inv.hosts[b.host], a.twin, b.twin
    twin, far = src.fabric[j], peer.fabric[k]
    dst = str(far.address.ip)
    if host.name == peer.name:
        argv = _ib_write_bw(ctx, peer, k, None, k)
        return [
            Step(
                host=host.name,
                kind="bench_rdma_listen",
                target=far.interface,
                description=f"ib_write_bw server on {far.rdma_device} ({RDMA_QPS} QPs)",
                changes=False,
                commands=[Command(argv=argv, timeout=120)],
            )
        ]
    if host.name == src.name:
        client = shlex.join(_ib_write_bw(ctx, src, j, dst, k))
        retry = f"for i in $(seq 50); do {client} && exit 0; sleep 0.2; done; exit 1"
        return [
            Step(
                host=host.name,
                kind="bench_rdma_send",
                target=f"{twin.interface}->{peer.name}",
                description=f"ib_write_bw {twin.rdma_device} -> {peer.name} {dst}, {RDMA_QPS} QPs, {RDMA_SECONDS} s",
                changes=False,
                commands=[Command(argv=["sh", "-c", retry], timeout=120)],
            )
        ]
    return []


def _tcp_link_steps(ctx: PlanContext, host: Host, a: End, b: End) -> list[Step]:
    """`host`'s part of one link's TCP fallback: the receiver on the far end, the sender on the near end."""
    inv = ctx.inventory
    mb, port = int(ctx.params["mb"]), int(ctx.params["port"])
    python = runtime_python(inv)
    src, peer = inv.hosts[a.host], inv.hosts[b.host]
    twin, far = src.fabric[a.twin], peer.fabric[b.twin]
    dst = str(far.address.ip)
    if host.name == peer.name:
        return [
            Step(
                host=host.name,
                kind="bench_listen",
                target=f"{far.interface}",
                description=f"receive {mb} MB on {dst}:{port} (TCP fallback: no ib_write_bw on both ends)",
                changes=False,
                commands=[Command(argv=[python, "-c", _SERVER, dst, str(port)], timeout=120)],
            )
        ]
    if host.name == src.name:
        return [
            Step(
                host=host.name,
                kind="bench_send",
                target=f"{twin.interface}->{peer.name}",
                description=f"send {mb} MB over {twin.interface} to {peer.name} {dst} (TCP fallback)",
                changes=False,
                commands=[Command(argv=[python, "-c", _CLIENT, dst, str(port), str(mb)], timeout=120)],
            )
        ]
    return []


def _nccl_step(ctx: PlanContext, src: Host) -> Step:
    """nccl-tests' `all_reduce_perf` across every host, started by mpirun on `src` (the first host)."""
    inv = ctx.inventory
    facts = ctx.facts[src.name]
    hosts = ",".join(f"{h.fabric[0].address.ip}:1" for h in inv.hosts)
    rank = f"set -a; . {shlex.quote(paths.ENV_FILE)}; set +a; exec {shlex.quote(facts.tools['all_reduce_perf'])}"
    argv = [
        facts.tools["mpirun"],
        "-np",
        str(len(inv.hosts)),
        "-H",
        hosts,
        "--mca",
        "btl_tcp_if_include",
        src.fabric[0].interface,
        "sh",
        "-c",
        rank + ' -b 16M -e 1G -f 2 "$@"',
        "all_reduce_perf",
    ]
    return Step(
        host=src.name,
        kind="bench_nccl",
        target="all_reduce_perf",
        description=f"nccl-tests all_reduce_perf across {len(inv.hosts)} hosts (each rank with its env file)",
        changes=False,
        commands=[Command(argv=argv, timeout=600)],
    )
