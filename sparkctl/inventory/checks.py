"""Semantic checks of an inventory that a schema cannot express; every problem found at once."""

from __future__ import annotations

import ipaddress
import re

from sparkctl.inventory.models import Inventory, Workload
from sparkctl.inventory.topology import RING_HOSTS, RING_TWINS, End, interface, links

Found = tuple[tuple[str | int, ...], str, str]


def check_inventory(inv: Inventory) -> list[Found]:
    """All cross-field problems of `inv` as (loc, problem, hint)."""
    found: list[Found] = []
    found += _check_hosts(inv)
    found += _check_fabric(inv)
    found += _check_ray_ports(inv)
    found += _check_ray_and_workloads(inv)
    found += _check_open_ports(inv)
    return found


def _check_hosts(inv: Inventory) -> list[Found]:
    found: list[Found] = []
    names: dict[str, int] = {}
    addrs: dict[str, int] = {}
    for i, h in enumerate(inv.hosts):
        if h.name in names:
            found.append(((("hosts", i, "name")), f"duplicate host name '{h.name}'", "give every host its own name"))
        names.setdefault(h.name, i)
        if h.address in addrs:
            other = inv.hosts[addrs[h.address]].name
            found.append(
                (("hosts", i, "address"), f"{h.address} is already the address of {other}", "each host has its own")
            )
        addrs.setdefault(h.address, i)
        seen_if: set[str] = set()
        for j, twin in enumerate(h.fabric):
            if twin.interface in seen_if:
                found.append(
                    (("hosts", i, "fabric", j, "interface"), f"{twin.interface} is listed twice", "list each twin once")
                )
            seen_if.add(twin.interface)
    found += _check_topology(inv)
    return found


_PORT_SUFFIX = re.compile(r"np(\d)$")


def _check_topology(inv: Inventory) -> list[Found]:
    """Host and interface counts each topology needs (topology.py says how links are derived)."""
    found: list[Found] = []
    n = len(inv.hosts)
    topo = inv.network.topology
    if topo == "direct" and n != 2:
        hint = "list exactly two hosts, or use topology: switch (2 or more hosts on a switch)"
        if n == 3:
            hint = "list exactly two hosts; three Sparks cabled in a ring are topology: ring"
        found.append((("network", "topology"), f"'direct' joins exactly 2 hosts, found {n}", hint))
    elif topo == "switch" and n < 2:
        found.append((("network", "topology"), f"'switch' joins 2 or more hosts, found {n}", "list every Spark"))
    elif topo == "ring":
        found += _check_ring(inv)
    counts = {len(h.fabric) for h in inv.hosts}
    if len(counts) > 1 and topo != "ring":
        found.append(
            (("hosts",), "hosts list different numbers of fabric interfaces", "list the same twins on every host")
        )
    return found


def _check_ring(inv: Inventory) -> list[Found]:
    """A ring: three hosts, four logical interfaces each in port order, one prefix length for every address."""
    found: list[Found] = []
    n = len(inv.hosts)
    if n != RING_HOSTS:
        found.append(
            (
                ("network", "topology"),
                f"'ring' joins exactly {RING_HOSTS} hosts (NVIDIA's three-Spark ring), found {n}",
                "two Sparks: topology: direct; four or more: topology: switch",
            )
        )
    for i, h in enumerate(inv.hosts):
        if len(h.fabric) != RING_TWINS:
            found.append(
                (
                    ("hosts", i, "fabric"),
                    f"a ring host lists its {RING_TWINS} logical interfaces (two per cable), found {len(h.fabric)}",
                    "list Port0's two interfaces, then Port1's, e.g. enp1s0f0np0, enP2p1s0f0np0, "
                    "enp1s0f1np1, enP2p1s0f1np1",
                )
            )
            continue
        # Spark netdev names end in np<port> (ibdev2netdev: enp1s0f0np0 and enP2p1s0f0np0 are Port0).
        ports = [_PORT_SUFFIX.search(t.interface) for t in h.fabric]
        if all(ports):
            want = ["0", "0", "1", "1"]
            for j, (m, w) in enumerate(zip(ports, want, strict=True)):
                if m is not None and m.group(1) != w:
                    found.append(
                        (
                            ("hosts", i, "fabric", j, "interface"),
                            f"{h.fabric[j].interface} is a Port{m.group(1)} interface at fabric[{j}], "
                            f"where the ring expects Port{w}",
                            "list Port0's two interfaces (…np0) first, then Port1's (…np1): cable c joins "
                            "hosts[c] Port0 to the next host's Port1",
                        )
                    )
    # NCCL matches a peer's subnet with one prefix length for every HCA (NCCL_IB_SUBNET_PREFIX_LEN, which
    # sparkctl writes in a ring: plan/env.py), so every fabric address of a ring carries the same one.
    prefixes = sorted({t.address.network.prefixlen for h in inv.hosts for t in h.fabric})
    if len(prefixes) > 1:
        found.append(
            (
                ("hosts",),
                f"a ring's fabric addresses mix prefix lengths ({', '.join(f'/{p}' for p in prefixes)})",
                "give every fabric address of the ring the same prefix length, e.g. /24: NCCL matches subnets "
                "with one length (NCCL_IB_SUBNET_PREFIX_LEN)",
            )
        )
    return found


def _check_fabric(inv: Inventory) -> list[Found]:
    found = _check_twin_addresses(inv)
    on_links, link_of_end = _check_link_subnets(inv)
    return found + on_links + _check_host_subnets(inv, link_of_end)


def _check_twin_addresses(inv: Inventory) -> list[Found]:
    """Every twin's own address: a host address of a real subnet, used once, off the management network."""
    found: list[Found] = []
    used: dict[ipaddress.IPv4Address, str] = {}
    for i, h in enumerate(inv.hosts):
        for j, twin in enumerate(h.fabric):
            loc = ("hosts", i, "fabric", j, "address")
            addr, net = twin.address.ip, twin.address.network
            if net.prefixlen == 32:
                found.append(
                    (
                        loc,
                        f"{twin.address} is a /32 (as is an address written without a prefix): "
                        "no other host can be on this link",
                        f"use a prefix that holds every host of the link, e.g. {addr}/24",
                    )
                )
                continue
            if net.prefixlen < 31 and addr in (net.network_address, net.broadcast_address):
                found.append(
                    (loc, f"{twin.address} is the network or broadcast address of {net}", "pick a host address")
                )
            if addr in used:
                found.append(
                    (
                        loc,
                        f"{twin.address} is already used by {used[addr]}",
                        "give every twin on every host its own address",
                    )
                )
            used.setdefault(addr, f"{h.name} {twin.interface}")
            try:
                mgmt = ipaddress.ip_address(h.address)
            except ValueError:
                mgmt = None
            if mgmt is not None and mgmt in net:
                found.append(
                    (
                        loc,
                        f"the management address {h.address} is inside fabric subnet {net}",
                        "fabric subnets must not overlap the management network",
                    )
                )
    return found


def _check_link_subnets(inv: Inventory) -> tuple[list[Found], dict[End, int]]:
    """Links (derived from the topology): the ends of one link in one subnet, every link its own subnet; and the link
    of each end (of the links with an end whose address is not a /32)."""
    found: list[Found] = []
    link_of_end: dict[End, int] = {}
    net_owner: dict[ipaddress.IPv4Network, int] = {}
    for link in links(inv):
        ends = [e for e in link.ends if interface(inv, e).address.network.prefixlen != 32]
        if not ends:
            continue
        first = interface(inv, ends[0]).address
        for e in link.ends:
            link_of_end[e] = link.index
        if first.network in net_owner:
            found.append(
                (
                    ("hosts", ends[0].host, "fabric", ends[0].twin, "address"),
                    f"{_what(inv, link.index)} reuses subnet {first.network} of {_what(inv, net_owner[first.network])}",
                    f"give every {_what(inv, 0).split()[0]} its own subnet",
                )
            )
        net_owner.setdefault(first.network, link.index)
        for e in ends[1:]:
            twin = interface(inv, e)
            if twin.address.network != first.network:
                found.append(
                    (
                        ("hosts", e.host, "fabric", e.twin, "address"),
                        f"{twin.address} is not in {first.network}, the subnet of {_what(inv, link.index)}",
                        _link_hint(inv, link.index),
                    )
                )
    return found, link_of_end


def _check_host_subnets(inv: Inventory, link_of_end: dict[End, int]) -> list[Found]:
    """One host's interfaces on different links never share a subnet (the kernel could not tell them apart)."""
    found: list[Found] = []
    for i, h in enumerate(inv.hosts):
        host_nets: dict[ipaddress.IPv4Network, tuple[str, int | None]] = {}
        for j, twin in enumerate(h.fabric):
            net = twin.address.network
            mine = link_of_end.get(End(i, j))
            if net in host_nets and host_nets[net][1] != mine and net.prefixlen != 32:
                found.append(
                    (
                        ("hosts", i, "fabric", j, "address"),
                        f"{twin.interface} shares subnet {net} with {host_nets[net][0]}",
                        "each twin needs its own subnet, e.g. 192.168.100.0/24 and 192.168.101.0/24"
                        if inv.network.topology != "ring"
                        else "each cable needs its own subnet: Port0's interfaces on one, Port1's on another",
                    )
                )
            host_nets.setdefault(net, (twin.interface, mine))
    return found


def _what(inv: Inventory, index: int) -> str:
    return f"cable {index}" if inv.network.topology == "ring" else f"link {index}"


def _link_hint(inv: Inventory, j: int) -> str:
    """A fix that can work: a free address of link j's subnet, or a wider prefix when the subnet is full."""
    link = links(inv)[j]
    first = interface(inv, link.ends[0]).address
    taken = {h.fabric[k].address.ip for h in inv.hosts for k in range(len(h.fabric))}
    free = next((a for a in first.network.hosts() if a not in taken), None)  # hosts() is lazy: any prefix is cheap
    what = _what(inv, j)
    if free is None:
        return f"{first.network} has no free address: widen the prefix on every host of {what}, e.g. {first.ip}/24"
    net = first.network
    return f"addresses of one {what.split()[0]} share a subnet: use an address in {net}, e.g. {free}/{net.prefixlen}"


def _check_ray_ports(inv: Inventory) -> list[Found]:
    """Ray's pinned ports: distinct, and none inside the worker port range (which must not be inverted)."""
    found: list[Found] = []
    p = inv.ray.ports
    if p.min_worker > p.max_worker:
        found.append(
            (
                ("ray", "ports", "min_worker"),
                f"the worker port range {p.min_worker}-{p.max_worker} is inverted",
                f"set min_worker <= max_worker, e.g. min_worker: {p.max_worker} and max_worker: {p.min_worker}",
            )
        )
    named: list[tuple[tuple[str | int, ...], int]] = [(("ray", "port"), inv.ray.port)]
    named += [(("ray", "ports", k), v) for k, v in p.model_dump().items() if k not in ("min_worker", "max_worker")]
    seen: dict[int, str] = {}
    for loc, port in named:
        if port in seen:
            found.append((loc, f"port {port} is also {seen[port]}", "give every Ray port its own number"))
        seen.setdefault(port, ".".join(map(str, loc)))
        if p.min_worker <= port <= p.max_worker:
            found.append(
                (
                    loc,
                    f"port {port} is inside the worker port range {p.min_worker}-{p.max_worker}",
                    "move it out of the range, or move ray.ports.min_worker/max_worker",
                )
            )
    return found


def _check_open_ports(inv: Inventory) -> list[Found]:
    """`network.open_ports`: distinct, and none of the ports the firewall keeps Ray and the ranks behind."""
    found: list[Found] = []
    p = inv.ray.ports
    own = {inv.ray.port: "ray.port"} | {v: f"ray.ports.{k}" for k, v in p.model_dump().items()}
    for w in inv.workloads:
        if w.engine == "vllm" and w.executor == "mp" and w.ranks > 1:
            own.setdefault(w.master_port, f"the rendezvous of workload '{w.name}' (vLLM's --master-port)")
    seen: set[int] = set()
    for k, port in enumerate(inv.network.open_ports):
        loc: tuple[str | int, ...] = ("network", "open_ports", k)
        if port in seen:
            found.append((loc, f"port {port} is listed twice", "list every port once"))
        seen.add(port)
        if port in own or p.min_worker <= port <= p.max_worker:
            what = own.get(port, f"in Ray's worker port range {p.min_worker}-{p.max_worker}")
            found.append(
                (
                    loc,
                    f"port {port} is {what}: opening it would let the management network reach Ray or the ranks",
                    "give your service another port, or move that Ray port",
                )
            )
    return found


def _check_ray_and_workloads(inv: Inventory) -> list[Found]:
    found: list[Found] = []
    names = {h.name for h in inv.hosts}
    if inv.ray.head is not None and inv.ray.head not in names:
        found.append((("ray", "head"), f"'{inv.ray.head}' is not a host", f"use one of: {', '.join(sorted(names))}"))
    seen_names: set[str] = set()
    for k, w in enumerate(inv.workloads):
        if w.name in seen_names:
            found.append(
                (("workloads", k, "name"), f"duplicate workload name '{w.name}'", "give every workload its own name")
            )
        seen_names.add(w.name)
        if w.name == "ray":  # Ray's own log (logs/ray.log) and container (sparkctl-ray) carry that name
            found.append((("workloads", k, "name"), "'ray' is reserved for Ray's log and container", "rename it"))
        found += _check_workload(inv, k, w)
    found += check_placement(inv)
    return found


def _check_workload(inv: Inventory, k: int, w: Workload) -> list[Found]:
    """One workload against the cluster: its port off Ray's, its ranks within the GPUs or hosts there are, and only
    the fields of its engine."""
    found: list[Found] = []
    ray_ports = {inv.ray.port, *inv.ray.ports.model_dump().values()}
    gpus = sum(h.gpus for h in inv.hosts)
    if w.port in ray_ports or inv.ray.ports.min_worker <= w.port <= inv.ray.ports.max_worker:
        found.append((("workloads", k, "port"), f"port {w.port} is one of Ray's ports", "pick another port"))
    if w.engine == "vllm" and w.hosts is None and w.ranks > gpus:
        found.append(
            (
                ("workloads", k, "tensor_parallel_size"),
                f"{w.ranks} ranks but the cluster has {gpus} GPU(s)",
                f"use tensor_parallel_size <= {gpus}"
                if w.pipeline_parallel_size == 1
                else f"use tensor_parallel_size x pipeline_parallel_size <= {gpus}",
            )
        )
    if w.engine == "embed" and w.hosts is None and w.ranks > len(inv.hosts) and w.replicas > 1:
        found.append(
            (
                ("workloads", k, "replicas"),
                f"{w.replicas} replicas need {w.replicas} hosts",
                f"use replicas <= {len(inv.hosts)}",
            )
        )
    if w.engine == "embed" and w.hosts is None and w.tensor_parallel_size > len(inv.hosts):
        found.append(
            (
                ("workloads", k, "tensor_parallel_size"),
                f"{w.tensor_parallel_size} ranks but the cluster has {len(inv.hosts)} host(s)",
                "the embed worker places one rank per host",
            )
        )
    if w.engine == "vllm" and w.replicas != 1:
        found.append((("workloads", k, "replicas"), "replicas is for engine 'embed'", "remove it"))
    if w.executor == "ray" and w.engine != "vllm":  # the default, mp, is the absence of vLLM's Ray executor
        found.append((("workloads", k, "executor"), "executor is for engine 'vllm'", "remove it"))
    elif w.executor == "mp" and w.hosts is None and len(inv.hosts) < w.ranks <= gpus:
        found.append(
            (
                ("workloads", k, "tensor_parallel_size"),
                f"executor mp runs one rank per host: {w.ranks} ranks but {len(inv.hosts)} host(s)",
                f"use tensor_parallel_size <= {len(inv.hosts)}"
                if w.pipeline_parallel_size == 1
                else f"use tensor_parallel_size x pipeline_parallel_size <= {len(inv.hosts)}",
            )
        )
    if w.engine == "embed" and w.pipeline_parallel_size != 1:
        found.append((("workloads", k, "pipeline_parallel_size"), "pipeline stages are for engine 'vllm'", "remove it"))
    return found


def _split_hint(gpus: int) -> str:
    """Valid TP x PP pairs for `gpus` ranks, e.g. 'tensor_parallel_size: 4 (pipeline_parallel_size: 1), or 2 x 2'."""
    pairs = [(t, gpus // t) for t in range(gpus, 0, -1) if gpus % t == 0]
    return ", ".join(f"{t} x {pp}" for t, pp in pairs)


def check_placement(inv: Inventory) -> list[Found]:
    """Workloads on host groups (`workloads[].hosts`): known hosts, a rank per GPU of the group, groups that fit
    next to each other, and one port per workload head."""
    found: list[Found] = []
    names = [h.name for h in inv.hosts]
    claimed: dict[str, str] = {}  # host -> the workload whose listed group took its GPUs
    placed: dict[tuple[str, int], str] = {}  # (head, port) -> workload
    explicit = False
    for k, w in enumerate(inv.workloads):
        if w.hosts is not None:
            explicit = True
            listed = _check_group_listing(k, w.hosts, names)
            if listed:  # a group that is not one: nothing more to judge of this workload
                found += listed
                continue
            found += _check_group(inv, k, w, claimed)
        if w.hosts is not None:
            head = w.hosts[0] if w.hosts[0] in names else ""
        else:
            head = inv.ray.head if inv.ray.head in names else inv.hosts[0].name if inv.ray.head is None else ""
        if head and (head, w.port) in placed:
            found.append(
                (
                    ("workloads", k, "port"),
                    f"port {w.port} on {head} is already used by workload {placed[head, w.port]} "
                    "(both are headed there)",
                    "give workloads with the same head host their own ports",
                )
            )
        placed.setdefault((head, w.port), w.name)
    found += _check_ray_placed_next_to_unseen(inv)
    if explicit and not found:  # each group fits on its own: do they fit together?
        found += _check_overcommit(inv)
    return found


def _check_group_listing(k: int, hosts: list[str], names: list[str]) -> list[Found]:
    """A workload's `hosts`: each a host of the inventory, each once."""
    found: list[Found] = []
    seen: set[str] = set()
    for i, name in enumerate(hosts):
        if name not in names:
            found.append((("workloads", k, "hosts", i), f"'{name}' is not a host", f"use one of: {', '.join(names)}"))
        elif name in seen:
            found.append((("workloads", k, "hosts", i), f"'{name}' is listed twice", "list each host once"))
        seen.add(name)
    return found


def _check_group(inv: Inventory, k: int, w: Workload, claimed: dict[str, str]) -> list[Found]:
    """A workload's listed group: its ranks fit the group, and no other group took its hosts (`claimed`, host ->
    workload, is updated with this group's)."""
    found = _check_group_ranks(inv, k, w)
    for i, h in enumerate(inv.group(w)):
        if h.name in claimed:
            found.append(
                (
                    ("workloads", k, "hosts", i),
                    f"{h.name}'s GPU(s) are already taken by workload {claimed[h.name]}: the groups overlap "
                    "and would not fit",
                    "give each workload its own hosts (disjoint groups)",
                )
            )
        else:
            claimed[h.name] = w.name
    return found


def _check_group_ranks(inv: Inventory, k: int, w: Workload) -> list[Found]:
    """A rank per GPU (vLLM) or per host (embed) of the group, and an executor that can keep the ranks on it."""
    found: list[Found] = []
    group = inv.group(w)
    gpus = sum(h.gpus for h in group)
    ranks = w.ranks
    where = f"{', '.join(w.hosts or [])}"
    if w.engine == "vllm" and ranks != gpus:
        found.append(
            (
                (
                    "workloads",
                    k,
                    "pipeline_parallel_size" if w.pipeline_parallel_size > 1 else "tensor_parallel_size",
                ),
                f"tensor_parallel_size x pipeline_parallel_size = {w.tensor_parallel_size} x "
                f"{w.pipeline_parallel_size} = {ranks} rank(s), but the group {where} has {gpus} GPU(s)",
                f"one rank per GPU of the group: use TP x PP of {_split_hint(gpus)}"
                if gpus
                else "list hosts that have GPUs",
            )
        )
    if w.engine == "embed" and ranks != len(group):
        found.append(
            (
                ("workloads", k, "replicas" if w.replicas > 1 else "tensor_parallel_size"),
                f"tensor_parallel_size x replicas = {ranks} rank(s), but the group {where} has "
                f"{len(group)} host(s): the embed worker runs one rank per host",
                f"use tensor_parallel_size x replicas = {len(group)}, or list {ranks} host(s)",
            )
        )
    if w.engine == "vllm" and w.executor == "ray" and ranks > 1 and len(group) < len(inv.hosts):
        found.append(
            (
                ("workloads", k, "hosts"),
                f"vLLM's Ray executor places its {ranks} ranks anywhere in the Ray cluster (one PACK "
                "placement group of {GPU: 1} bundles over all nodes, none pinned with vLLM 0.32's default "
                "V2 executor: vllm/v1/executor/ray_utils.py, ray_executor_v2.py), not on the group "
                f"{where}",
                "use executor: mp (one `vllm serve` per host of the group), or list every host",
            )
        )
    if w.engine == "vllm" and w.executor == "mp" and len({h.gpus for h in group}) > 1:
        found.append(
            (
                ("workloads", k, "hosts"),
                f"the hosts of {where} have different GPU counts ({', '.join(f'{h.name}: {h.gpus}' for h in group)})",
                "vLLM's multiprocessing executor runs the same number of ranks on every node: "
                "group hosts with equal gpus",
            )
        )
    return found


def _check_overcommit(inv: Inventory) -> list[Found]:
    """Groups that each fit may still not fit together: the first workload past the cluster's GPUs."""
    total = sum(h.gpus for h in inv.hosts)
    need = 0
    for k, w in enumerate(inv.workloads):
        need += w.ranks
        if need > total:
            return [
                (
                    ("workloads", k),
                    f"with {w.name} the workloads need {need} rank(s) but the cluster has {total} GPU(s): "
                    "over-committed",
                    "give each workload its own hosts; a workload without `hosts` shares every host's GPUs",
                )
            ]
    return []


def _check_ray_placed_next_to_unseen(inv: Inventory) -> list[Found]:
    """A vLLM Ray-executor workload next to a vLLM workload that uses GPUs without Ray (the multiprocessing
    executor, or one rank): Ray does not know those GPUs are taken, and vLLM 0.32's placement group cannot be kept
    off their Sparks (PACK over `{GPU: 1}` bundles, no node pin with its default V2 executor; nothing in `vllm
    serve` adds a resource to the bundles: docs/workers.md, "What places the ranks")."""

    def ray_placed(w: Workload) -> bool:
        return w.engine == "vllm" and w.executor == "ray" and w.ranks > 1

    unseen = [w.name for w in inv.workloads if w.engine == "vllm" and not ray_placed(w)]
    if not unseen:
        return []
    return [
        (
            ("workloads", k, "executor"),
            f"vLLM's Ray executor may place a rank of {w.name} on a Spark whose GPU {', '.join(unseen)} already uses "
            "outside Ray (its placement group asks Ray for any free GPU, and Ray does not see theirs)",
            "use executor: mp with hosts for every vLLM workload on a shared cluster, or run only Ray-placed "
            "workloads next to it",
        )
        for k, w in enumerate(inv.workloads)
        if ray_placed(w)
    ]
