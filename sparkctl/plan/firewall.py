"""The nftables rules that keep Ray and the workloads' internal listeners on the fabric and loopback."""

from __future__ import annotations

from sparkctl.inventory.models import Host, Inventory
from sparkctl.plan.layout import rank_hosts

EPHEMERAL = "32768-60999"
"""Linux's default net.ipv4.ip_local_port_range: where every listener bound to port 0 lands (docs/workers.md,
"Ports")."""


VLLM_MASTER_PORT = 29501
"""Where vLLM's multiprocessing executor's ranks meet (torch.distributed's TCPStore on the head): `--master-port`,
default 29501 (ParallelConfig.master_port, vllm/config/parallel.py, vLLM 0.32.0); `Workload.master_port` reads it."""


VLLM_PORT_SPAN = 10
"""Ports from VLLM_PORT on that the firewall drops when a workload sets it. vLLM's `get_open_port()` then takes the
first free port from VLLM_PORT upwards instead of port 0 (`_get_open_port`, vllm/utils/network_utils.py, vLLM 0.32.0)
and one process asks for at most five at once (`get_open_ports_list(5)`, vllm/config/parallel.py)."""


def workload_listen_ports(inv: Inventory) -> list[str]:
    """Ports and ranges outside the ephemeral range where sparkctl's workloads listen besides their API port.

    The multiprocessing executor's rendezvous (torch's TCPStore binds every interface, whatever --master-addr
    says), and, when a workload sets VLLM_PORT, the ports vLLM's `get_open_port()` hands out from there (the V1
    Ray executor's TCPStore, vllm/v1/executor/ray_executor.py). Everything else the workloads open binds port 0
    and lands in the ephemeral range (docs/workers.md, "Ports").
    """
    ports: set[str] = {str(w.master_port) for w in inv.workloads if rank_hosts(inv, w)}
    for w in inv.workloads:
        base = w.env.get("VLLM_PORT", "")
        if base.isdigit() and 0 < int(base) <= 65535:
            ports.add(f"{base}-{min(int(base) + VLLM_PORT_SPAN - 1, 65535)}")
    return sorted(ports, key=lambda r: int(r.split("-")[0]))


def render_firewall(inv: Inventory, host: Host, ssh_port: int = 22) -> str:
    """nftables rules keeping Ray and the workloads' internal listeners off every interface but the fabric and
    loopback.

    Ray 2.x binds its GCS, raylet and agents on all interfaces even with --node-ip-address, and torch's TCPStore
    binds all interfaces whatever host it is given, so binding alone cannot keep them off the management network.
    New inbound TCP to Ray's pinned ports, its worker range, the workloads' fixed ports (`workload_listen_ports`)
    and the ephemeral range (Linux's default ip_local_port_range: vLLM's Ray-executor TCPStore, its message queues,
    gloo and NCCL, the embed worker's rendezvous all bind port 0, and none can be told another port) is dropped unless
    it arrives on a twin or loopback. Established traffic, the SSH port this session uses, the workload API ports
    and `network.open_ports` are accepted first, so even an SSH port inside a dropped range stays reachable.
    """
    p = inv.ray.ports
    ports = sorted(
        {
            inv.ray.port,
            p.node_manager,
            p.object_manager,
            p.dashboard,
            p.dashboard_agent_listen,
            p.dashboard_agent_grpc,
            p.runtime_env_agent,
            p.metrics_export,
            p.client_server,
        }
    )
    drop = ", ".join([*map(str, ports), *workload_listen_ports(inv), f"{p.min_worker}-{p.max_worker}", EPHEMERAL])
    ifaces = ", ".join(f'"{i}"' for i in ["lo", *(t.interface for t in host.fabric)])
    keep = ", ".join(str(p) for p in sorted({ssh_port, *(w.port for w in inv.workloads), *inv.network.open_ports}))
    return (
        "# Managed by sparkctl: Ray is reachable only over the fabric and loopback.\n"
        "table inet sparkctl\n"
        "delete table inet sparkctl\n"
        "table inet sparkctl {\n"
        "  chain input {\n"
        "    type filter hook input priority 0; policy accept;\n"
        f"    iifname {{ {ifaces} }} accept\n"
        "    ct state established,related accept\n"
        f"    tcp dport {{ {keep} }} accept\n"
        f"    tcp dport {{ {drop} }} drop\n"
        "  }\n"
        "}\n"
    )
