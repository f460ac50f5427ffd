"""Where Ray and each workload run: fabric addresses, ranks and their hosts, endpoints, and whether Ray or a
container of its own is needed."""

from __future__ import annotations

from sparkctl.inventory.models import Host, Inventory, Workload


def fabric_ip(host: Host) -> str:
    """The address Ray and the collectives use on a host."""
    return str(host.fabric[0].address.ip)


def workload_ranks(w: Workload) -> int:
    """Ranks of a workload, one device each (`Workload.ranks`, the one definition)."""
    return w.ranks


def bind_address(inv: Inventory, w: Workload) -> str:
    """Where a workload's API listens on its head (the first host of its group)."""
    head = inv.workload_head(w)
    return {"fabric": fabric_ip(head), "management": head.address, "loopback": "127.0.0.1"}[w.bind]


def endpoint(inv: Inventory, w: Workload) -> str:
    """Base URL of a workload's API as the laptop reaches it (on the workload's head)."""
    head = inv.workload_head(w)
    host = head.address if w.bind != "fabric" else fabric_ip(head)
    return f"http://{host}:{w.port}"


def rank_hosts(inv: Inventory, w: Workload) -> list[Host]:
    """Hosts running a `vllm serve` of `w` under vLLM's multiprocessing executor, head first (index = node rank).

    With `hosts` listed: every host of the group (TP x PP equals the group's GPUs, checked when the inventory is
    read). Without: the Ray head, then the other hosts, one per rank. Empty for every other workload: those run
    one process, on the workload's head.
    """
    ranks = workload_ranks(w)
    if w.engine != "vllm" or w.executor != "mp" or ranks < 2:
        return []
    group = inv.group(w)
    return group if w.hosts is not None else group[:ranks]


def needs_ray(w: Workload) -> bool:
    """The workload runs on sparkctl's Ray cluster: the embed worker (Ray actors), or vLLM's Ray executor across
    ranks. vLLM with one rank ("uni") or with its multiprocessing executor never touches Ray."""
    return w.engine == "embed" or (w.executor == "ray" and workload_ranks(w) > 1)


def ray_wanted(inv: Inventory) -> bool:
    """Whether sparkctl forms Ray on this cluster: when a workload needs it, when there is no workload at all (the
    cluster is then a Ray cluster for the user's own jobs), or when the inventory asks for it (`ray.form: always`).

    The same rule for a venv and an image. Nothing else uses Ray: vLLM's multiprocessing executor (the default) and a
    one-rank vLLM run without it, NVIDIA's current vLLM image and the vllm-openai images ship without it
    (docs/compatibility.md), and a Ray node holds memory a Spark's vLLM wants: by default its object store is 30% of
    the memory available when it starts (`DEFAULT_OBJECT_STORE_MEMORY_PROPORTION`, ray/_private/ray_constants.py
    2.60.0), in the unified memory the GPU shares."""
    return inv.ray.form == "always" or not inv.workloads or any(needs_ray(w) for w in inv.workloads)


def own_container(inv: Inventory, w: Workload) -> bool:
    """Container mode, a workload that needs no Ray: it runs in a container of its own on each of its hosts
    (`sparkctl-<name>`), not inside the Ray container."""
    return bool(inv.runtime.image) and not needs_ray(w)


def workload_container(name: str) -> str:
    """The container of a workload that runs in one of its own."""
    return f"sparkctl-{name}"
