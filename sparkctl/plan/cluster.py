"""Planners for the cluster: fabric check, Ray, page cache, workloads, teardown."""

from __future__ import annotations

import shlex
from collections.abc import Mapping

from sparkctl import paths
from sparkctl.facts.models import HostFacts
from sparkctl.inventory.models import Host, Workload
from sparkctl.inventory.topology import check_pairs, interface
from sparkctl.plan import commands as lc
from sparkctl.plan.context import PlanContext
from sparkctl.plan.models import Command, Step, Wait

RAY_MARKERS = ("raylet", "gcs_server", "ray::", "ray/dashboard", "ray/_private", "default_worker.py")


def _sh(line: str, *, stdin: str | None = None, stdin_secret: str | None = None) -> Command:
    """A shell line (built from quoted, validated values) run by `sh -c`."""
    return Command(argv=["sh", "-c", line], stdin=stdin, stdin_secret=stdin_secret)


def plan_verify_fabric(ctx: PlanContext, host: Host) -> list[Step]:
    """Jumbo frames, unfragmented, from this host's interfaces to the peers the topology pairs them with.

    topology.check_pairs chooses the pairs: both ways on a cable, each host to the next on a switch lane (every
    switch port sends and receives once). The target names the peer and the interface expected at the other end,
    so a failed check says which cable or switch port is wrong.

    The reference check is `ping -M do -s 8972 -c 3`. Its three echoes go 10 ms apart (`-i 0.01`), not at ping's
    default of one second: iputils lets any user go down to 2 ms for a single host (`MIN_USER_INTERVAL_MS` in
    iputils ping/ping.h; ping(8) of iputils 20221126: "Only super-user may set interval to values less than
    2 ms"), so the check costs one round trip instead of 0.4 s.
    """
    inv = ctx.inventory
    mtu = inv.network.mtu
    me = next(i for i, h in enumerate(inv.hosts) if h.name == host.name)
    steps = []
    for src, dst in check_pairs(inv):
        if src.host != me:
            continue
        twin = interface(inv, src)
        peer = inv.hosts[dst.host]
        far = interface(inv, dst)
        ip = str(far.address.ip)
        steps.append(
            Step(
                host=host.name,
                kind="verify_jumbo",
                target=f"{twin.interface}->{peer.name}",
                description=f"unfragmented {mtu}-byte frames: {host.name} {twin.interface} -> "
                f"{peer.name} {far.interface} {ip}",
                commands=[
                    Command(
                        argv=[
                            "ping",
                            "-M",
                            "do",
                            "-s",
                            str(mtu - 28),
                            "-c",
                            "3",
                            "-i",
                            "0.01",
                            "-W",
                            "2",
                            "-I",
                            twin.interface,
                            ip,
                        ]
                    )
                ],
                changes=False,
                wait=Wait(kind="remote", deadline=20, interval=1),
            )
        )
    return steps


def _raylet_ips(facts: HostFacts) -> set[str]:
    ips = set()
    for p in facts.processes:
        if "raylet" in p.args.split(" ", 1)[0]:
            for arg in p.args.split():
                if arg.startswith("--node_ip_address="):
                    ips.add(arg.split("=", 1)[1])
    return ips


def ray_running_ok(ctx: PlanContext, host: Host) -> bool:
    """Ray runs on this host, on its fabric address, with the cluster's token."""
    facts = ctx.facts[host.name]
    token_ok = facts.files.get("ray-token.sha256") == ctx.digests.get("ray_token")
    if ctx.inventory.runtime.image:  # in its container, from the inventory's image
        return token_ok and facts.containers.get(lc.RAY_CONTAINER) == lc.ray_image(ctx.inventory)
    return token_ok and _raylet_ips(facts) == {lc.fabric_ip(host)}


def plan_ray_firewall(ctx: PlanContext, host: Host) -> list[Step]:
    """Keep Ray's listeners off the management network; (re)loaded whenever Ray is not running as specified."""
    facts = ctx.facts[host.name]
    rules = lc.render_firewall(ctx.inventory, host, facts.ssh_server_port)
    have = facts.files.get("firewall.nft")
    if have == rules and (ray_running_ok(ctx, host) or not lc.ray_wanted(ctx.inventory)):
        return []
    return [
        Step(
            host=host.name,
            kind="ray_firewall",
            target=paths.FIREWALL_FILE,
            description="allow Ray only on the fabric and loopback (nftables table inet sparkctl)",
            commands=[
                Command(
                    argv=["install", "-D", "-m", "0644", "/dev/stdin", paths.FIREWALL_FILE], sudo=True, stdin=rules
                ),
                Command(argv=["nft", "-f", paths.FIREWALL_FILE], sudo=True),
            ],
            diff=[f"- {paths.FIREWALL_FILE}: {'present' if have else 'absent'}"]
            + [f"+ {line}" for line in rules.splitlines() if "dport" in line or "iifname" in line],
        )
    ]


def plan_ray_token(ctx: PlanContext, host: Host) -> list[Step]:
    """The cluster's Ray token on the host, 0600."""
    facts = ctx.facts[host.name]
    have = facts.files.get("ray-token.sha256")
    want = ctx.digests.get("ray_token", "")
    if have == want or not lc.ray_wanted(ctx.inventory):
        return []
    target = paths.token_path(ctx.home(host))
    return [
        Step(
            host=host.name,
            kind="ray_token",
            target=target,
            description="install the cluster's Ray auth token (0600)",
            commands=[Command(argv=["install", "-D", "-m", "0600", "/dev/stdin", target], stdin_secret="ray_token")],
            diff=[f"- sha256 {have or '(absent)'}", f"+ sha256 {want}"],
        )
    ]


def plan_ray_node(ctx: PlanContext, host: Host) -> list[Step]:
    """Ray on this host: the head on the head host, a worker elsewhere; restarted when wrong."""
    facts = ctx.facts[host.name]
    if not lc.ray_wanted(ctx.inventory):
        return _ray_not_wanted(ctx, host)
    is_head = host.name == ctx.inventory.head.name
    role = "head" if is_head else "worker"
    depends = bool(ctx.changed & {"ray_token", "worker_env", "fabric_active"})
    if ray_running_ok(ctx, host) and not depends and not (not is_head and "ray_node" in ctx.changed):
        return []
    home = ctx.home(host)
    cmds = []
    running = (
        _raylet_ips(facts)
        or any(m in p.args for p in facts.processes for m in RAY_MARKERS[:2])
        or lc.RAY_CONTAINER in facts.containers
    )
    if running:
        cmds.append(_sh(lc.build_ray_stop(ctx.inventory, home)))
    cmds.append(_sh(lc.build_ray_start(ctx.inventory, host, home)))
    return [
        Step(
            host=host.name,
            kind="ray_node",
            target=role,
            description=f"start the Ray {role} on {lc.fabric_ip(host)} (token auth, ports pinned)",
            commands=cmds,
            diff=[
                f"- ray: {'running on ' + ','.join(sorted(_raylet_ips(facts))) if running else 'stopped'}",
                f"+ ray {role}: {lc.fabric_ip(host)}",
            ],
            depends_on_earlier=depends,
        )
    ]


RAY_NOT_WANTED = "no workload needs Ray (vLLM's multiprocessing executor and single-rank vLLM run without it)"


def _ray_not_wanted(ctx: PlanContext, host: Host) -> list[Step]:
    """Container mode with no workload needing Ray: Ray is not started (the image may have none), and a Ray
    container left from an earlier layout is removed; the plan says so either way."""
    facts = ctx.facts[host.name]
    if lc.RAY_CONTAINER in facts.containers:
        return [
            Step(
                host=host.name,
                kind="ray_stopped",  # not ray_node: nothing that runs without Ray restarts for it
                target="ray",
                description=f"remove the Ray container: {RAY_NOT_WANTED}",
                commands=[_sh(lc.build_ray_stop(ctx.inventory, ctx.home(host)))],
                diff=[f"- ray: container {lc.RAY_CONTAINER}", "+ ray: not started"],
            )
        ]
    return [
        Step(
            host=host.name,
            kind="ray_node",
            target="not started",
            description=f"Ray is not started: {RAY_NOT_WANTED}",
            changes=False,
        )
    ]


def ray_formed(ctx: PlanContext) -> bool:
    """The facts already show the cluster formed, and nothing earlier in this run changes anything: every host runs
    Ray as specified (fabric address, the cluster's token) and every host's raylet holds its connection to the head's
    GCS from one of its fabric addresses. A raylet whose GCS drops it exits, so the connection is the node's
    membership."""
    if ctx.changed:
        return False
    return all(ray_running_ok(ctx, h) and _gcs_connected(ctx, h) for h in ctx.inventory.hosts)


def _gcs_connected(ctx: PlanContext, host: Host) -> bool:
    """The host's raylet holds its connection to the head's GCS from one of its own fabric addresses (the kernel
    picks the source by route: on a ring, the interface on the head's cable, which is not always fabric[0])."""
    inv = ctx.inventory
    mine = {str(t.address.ip) for t in host.fabric}
    want = (lc.fabric_ip(inv.head), inv.ray.port)
    return any(link.local in mine and (link.peer, link.peer_port) == want for link in ctx.facts[host.name].gcs_links)


def ray_node_state(ctx: PlanContext, host: Host) -> str:
    """One host's Ray node as the facts show it: 'alive' (running as specified and connected to the head's GCS),
    'not connected' (running, but no GCS connection), 'not as specified' (another address or token), or
    'not running'."""
    facts = ctx.facts[host.name]
    if ray_running_ok(ctx, host):
        return "alive" if _gcs_connected(ctx, host) else "not connected"
    running = any(m in p.args for p in facts.processes for m in RAY_MARKERS[:2]) or lc.RAY_CONTAINER in facts.containers
    return "not as specified" if running else "not running"


def plan_ray_ready(ctx: PlanContext, host: Host) -> list[Step]:
    """Wait until Ray shows this host's node alive (on the head: every node), so a timeout names the missing host
    and shows that host's own Ray log. Nothing to wait for when the facts show the cluster already formed."""
    inv = ctx.inventory
    if ray_formed(ctx) or not lc.ray_wanted(inv):
        return []
    is_head = host.name == inv.head.name
    expected = [lc.fabric_ip(h) for h in inv.hosts] if is_head else [lc.fabric_ip(host)]
    return [
        Step(
            host=host.name,
            kind="verify_ray",
            target="formation" if is_head else "node",
            description=f"Ray shows all {len(inv.hosts)} nodes alive"
            if is_head
            else f"Ray shows {host.name} ({expected[0]}) alive",
            commands=[_sh(lc.build_ray_check(inv, ctx.home(host)), stdin=lc.ray_check_script(expected))],
            changes=False,
            wait=Wait(kind="remote", deadline=120, interval=2, log=paths.log_path(ctx.home(host), "ray")),
        )
    ]


def _selected(ctx: PlanContext) -> list[Workload]:
    names = ctx.params.get("workloads")
    ws = ctx.inventory.workloads
    return [w for w in ws if not names or w.name in names]


def workload_health(ctx: PlanContext, w: Workload, host: Host | None = None) -> str:
    """What the workload recorded about itself on `host` (default its head; '' if nothing): e.g. 'failed <why>'.

    A workload whose process exited by itself (venv mode: its pid is recorded, the process gone) is
    'failed exited by itself: <why>', the why from its log (see facts.probe.EXITED_WORKLOADS)."""
    files = ctx.facts[(host or ctx.inventory.workload_head(w)).name].files
    exited = workload_exit(files, w.name)
    if exited is not None:
        return f"failed exited by itself: {exited}"
    return files.get(f"workload-{w.name}.health", "").strip()


def group_health(ctx: PlanContext, w: Workload) -> str:
    """What the workload recorded about itself: its head's record, else (vLLM's multiprocessing executor across
    Sparks) the first rank host's that recorded something, named: e.g. 'spark-b: failed exited by itself: ...'."""
    head = ctx.inventory.workload_head(w)
    said = workload_health(ctx, w, head) if head.name in ctx.facts else ""
    if said:
        return said
    for h in lc.rank_hosts(ctx.inventory, w):
        if h.name != head.name and h.name in ctx.facts and (rank := workload_health(ctx, w, h)):
            return f"{h.name}: {rank}"
    return ""


def workload_exit(files: Mapping[str, str], name: str) -> str | None:
    """Why the workload's recorded process exited without sparkctl stopping it; None while it runs (or no record)."""
    if f"workload-{name}.exit" not in files:
        return None
    return files[f"workload-{name}.exit"].strip() or "its log shows no error"


def _ray_container_replaced(ctx: PlanContext, host: Host) -> bool:
    """Container mode: an earlier stage of this run replaces this host's Ray container (`docker rm -f` ends every
    process in it, its workloads included, and forgets their pid records: commands.build_ray_stop)."""
    facts = ctx.facts[host.name]
    if not ctx.inventory.runtime.image or "ray_node" not in ctx.changed or lc.RAY_CONTAINER not in facts.containers:
        return False
    head = ctx.inventory.head
    depends = bool(ctx.changed & {"ray_token", "worker_env", "fabric_active"})  # as plan_ray_node decides
    return depends or not ray_running_ok(ctx, host) or not ray_running_ok(ctx, head)


def workload_state(ctx: PlanContext, w: Workload, host: Host | None = None) -> str:
    """'ok', 'stopped', 'broken' (running, but it reports a failed backend) or 'changed' for a workload on `host`;
    without one, on every host running it ('unknown' when one of those was not read).

    A workload of vLLM's multiprocessing executor runs on several hosts: it is 'ok' only when all are, and is
    otherwise restarted everywhere (its ranks meet only at start).
    """
    if "workload_stopped" in ctx.changed:  # an earlier step of this run stops the selected workloads
        return "stopped"
    own = lc.own_container(ctx.inventory, w)
    if host is not None and not own and _ray_container_replaced(ctx, host):
        return "stopped"
    if host is None:
        ranks = lc.rank_hosts(ctx.inventory, w)
        if any(h.name not in ctx.facts for h in ranks):  # a rank's host was not read (unreachable)
            return "unknown"
        states = [workload_state(ctx, w, h) for h in ranks] if ranks else []
        if not states:
            return workload_state(ctx, w, ctx.inventory.workload_head(w))
        if set(states) == {"ok"}:
            return "ok"
        # a rank that died (on any host) makes the group broken; else the head's state, or 'changed'
        return "broken" if "broken" in states else (states[0] if states[0] != "ok" else "changed")
    facts = ctx.facts[host.name]
    pid = facts.files.get(f"workload-{w.name}.pid", "").strip()
    if own:  # a container of its own on each of its hosts
        alive = lc.workload_container(w.name) in facts.containers
    elif ctx.inventory.runtime.image:  # a process in the head's Ray container (`docker exec`)
        alive = lc.RAY_CONTAINER in facts.containers and w.name in facts.container_workloads
    else:
        # the recorded pid, running a workload (after a reboot the number may belong to another process)
        alive = pid.isdigit() and any(
            p.pid == int(pid) and any(m in p.args for m in paths.WORKLOAD_MARKERS) for p in facts.processes
        )
    if not alive:
        # venv mode: recorded but gone, and sparkctl never stopped it (e.g. vLLM's API server ends once a Ray
        # worker of its engine died): broken, restarted like a group that lost a rank
        return "broken" if workload_exit(facts.files, w.name) is not None else "stopped"
    if workload_health(ctx, w, host).startswith("failed"):  # e.g. a tensor-parallel rank died: restart the group
        return "broken"
    spec = facts.files.get(f"workload-{w.name}.spec", "")
    return "ok" if spec == lc.workload_spec(ctx.inventory, w, ctx.home(host), host) else "changed"


def workloads_to_start(ctx: PlanContext) -> list[Workload]:
    """Workloads that the workload stage would (re)start."""
    ray_restarts = "ray_node" in ctx.changed
    return [
        w
        for w in _selected(ctx)
        if (ray_restarts and not lc.own_container(ctx.inventory, w)) or workload_state(ctx, w) != "ok"
    ]


def plan_drop_caches(ctx: PlanContext, host: Host) -> list[Step]:
    """sync + drop the page cache, only when workloads are about to load weights."""
    if not workloads_to_start(ctx):
        return []
    cached = ctx.facts[host.name].meminfo_kb.get("Cached", 0) // 1024
    return [
        Step(
            host=host.name,
            kind="page_cache",
            target="drop",
            description=f"drop the page cache before weights load (now {cached} MiB cached)",
            commands=[Command(argv=["sync"]), Command(argv=["sysctl", "-w", "vm.drop_caches=3"], sudo=True)],
            diff=[f"- page cache {cached} MiB", "+ page cache dropped"],
            depends_on_earlier="ray_node" in ctx.changed,
        )
    ]


def _before_start(ctx: PlanContext, w: Workload, host: Host, state: str) -> list[Command]:
    """What precedes a workload's start on `host`: nothing when it is not running, forgetting its records when its
    process exited by itself (no signal to a pid that may name another process by now), else its stop."""
    if state == "stopped":
        return []
    own = lc.own_container(ctx.inventory, w)
    if workload_exit(ctx.facts[host.name].files, w.name) is not None:
        return [_sh(lc.build_workload_forget(ctx.home(host), w.name, container=own))]
    return [_sh(lc.build_workload_stop(ctx.inventory, w.name, ctx.home(host), own=own))]


def _plan_other_ranks(ctx: PlanContext, host: Host) -> list[Step]:
    """On a host other than a workload's head: (re)start its rank of each multiprocessing-executor workload being
    started."""
    inv = ctx.inventory
    steps = []
    for w in workloads_to_start(ctx):
        ranks = [h.name for h in lc.rank_hosts(inv, w)]
        if host.name not in ranks or host.name == ranks[0]:
            continue
        steps.append(
            _start_step(
                ctx,
                w,
                host,
                f"start {w.name}: node rank {ranks.index(host.name)} of {len(ranks)} (headless), vllm {w.model}",
            )
        )
    return steps


def _start_step(ctx: PlanContext, w: Workload, host: Host, description: str) -> Step:
    """(Re)start workload `w`'s process on `host`: whatever must go first (`_before_start`), then the start."""
    inv = ctx.inventory
    home = ctx.home(host)
    state = workload_state(ctx, w, host)
    cmds = _before_start(ctx, w, host, state)
    cmds.append(_sh(lc.build_workload_start(inv, w, home, host), stdin_secret=f"api_key:{w.name}"))
    return Step(
        host=host.name,
        kind="workload",
        target=w.name,
        description=description,
        commands=cmds,
        diff=[
            f"- {w.name}: {state}" + (f" ({workload_health(ctx, w, host)})" if state == "broken" else ""),
            f"+ {w.name}: {lc.workload_spec(inv, w, home, host)}",
        ],
        depends_on_earlier="ray_node" in ctx.changed,
    )


def _headed(ctx: PlanContext, host: Host) -> list[Workload]:
    """The selected workloads whose head (first host of the group) is `host`."""
    return [w for w in _selected(ctx) if ctx.inventory.workload_head(w).name == host.name]


def plan_workloads(ctx: PlanContext, host: Host) -> list[Step]:
    """On a workload's head: ship the embed worker if needed, then (re)start each workload headed here that is not
    running as specified; on the other hosts of a multiprocessing-executor workload, their ranks."""
    others = _plan_other_ranks(ctx, host)
    headed = _headed(ctx, host)
    if not headed:
        return others
    inv = ctx.inventory
    home = ctx.home(host)
    facts = ctx.facts[host.name]
    steps: list[Step] = []
    starting = [w for w in workloads_to_start(ctx) if w in headed]
    if any(w.engine == "embed" for w in headed):  # the state dir is mounted into containers too
        have = facts.files.get(f"{lc.WORKER_FILE}.sha256")
        want = ctx.digests.get("worker_code", "")
        if have != want:
            target = f"{paths.state_dir(home)}/{lc.WORKER_FILE}"
            steps.append(
                Step(
                    host=host.name,
                    kind="worker_code",
                    target=target,
                    description="install sparkctl's embedding worker",
                    commands=[
                        Command(argv=["install", "-D", "-m", "0644", "/dev/stdin", target], stdin_blob="worker_code")
                    ],
                    diff=[f"- sha256 {have or '(absent)'}", f"+ sha256 {want}"],
                )
            )
            starting = [w for w in headed if w.engine == "embed" and w not in starting] + starting
    for w in headed:
        if w not in starting:
            continue
        description = (
            f"start {w.name}: {w.engine} {w.model}, TP={w.tensor_parallel_size}"
            + (f", PP={w.pipeline_parallel_size}" if w.pipeline_parallel_size > 1 else "")
            + (f", replicas={w.replicas}" if w.replicas > 1 else "")
            + (f", on {','.join(w.hosts)}" if w.hosts is not None else "")
            + f", {lc.endpoint(inv, w)}"
        )
        steps.append(_start_step(ctx, w, host, description))
    return steps + others


def plan_workload_ready(ctx: PlanContext, host: Host) -> list[Step]:
    """From the laptop, for each workload headed by `host`: /health 200, the model listed, one minimal request
    answered."""
    home = ctx.home(host)
    return [
        Step(
            host=host.name,
            kind="verify_workload",
            target=w.name,
            description=f"{w.name} answers at {lc.endpoint(ctx.inventory, w)}",
            changes=False,
            wait=Wait(
                kind="http",
                deadline=w.ready_timeout,
                interval=1,
                url=lc.endpoint(ctx.inventory, w),
                model=w.name,
                secret=f"api_key:{w.name}",
                log=paths.log_path(home, w.name),
                alive=_sh(lc.build_workload_alive(ctx.inventory, w.name, home)),
            ),
            notes=[w.engine],
        )
        for w in _headed(ctx, host)
    ]


def plan_verify_placement(ctx: PlanContext, host: Host) -> list[Step]:
    """On the head, after the endpoints answer: Ray's placement groups put each workload's ranks on distinct hosts."""
    if host.name != ctx.inventory.head.name:
        return []
    # vLLM's multiprocessing executor makes no Ray placement group: sparkctl starts one rank per host itself
    # (`rank_hosts`), so only Ray-placed workloads are read back from Ray.
    multi = [w for w in _selected(ctx) if lc.workload_ranks(w) > 1 and not lc.rank_hosts(ctx.inventory, w)]
    if not multi:
        return []
    names = ",".join(w.name for w in multi)
    # a workload that lists its hosts must be placed on exactly those (the embed worker pins its bundles there)
    expected = [[lc.fabric_ip(h) for h in ctx.inventory.group(w)] for w in multi if w.hosts is not None]
    return [
        Step(
            host=host.name,
            kind="verify_placement",
            target=names,
            description=f"Ray places the ranks of {names} one per host (placement groups read from Ray)",
            commands=[
                _sh(
                    lc.build_ray_python(ctx.inventory, ctx.home(host)),
                    stdin=lc.placement_check_script(len(multi), expected),
                )
            ],
            changes=False,
            wait=Wait(kind="remote", deadline=60, interval=2),
        )
    ]


def _stray_workload_pids(facts: HostFacts) -> list[int]:
    """Worker processes of the login user that no pid file accounts for (left by a failed or interrupted run)."""
    recorded = {int(v.strip()) for k, v in facts.files.items() if k.endswith(".pid") and v.strip().isdigit()}
    return [
        p.pid
        for p in facts.processes
        if p.user == facts.user
        and p.pid not in recorded
        and any(m in p.args for m in paths.WORKLOAD_MARKERS)
        and "sh -c" not in p.args
    ]


def plan_workload_stop(ctx: PlanContext, host: Host) -> list[Step]:
    """Stop workloads: those sparkctl recorded, and any worker process it left behind."""
    facts = ctx.facts[host.name]
    home = ctx.home(host)
    steps = []
    with_pid = {k.removeprefix("workload-").removesuffix(".pid") for k in facts.files if k.endswith(".pid")}
    # container mode: workloads in containers of their own, recorded by a spec alone, or found running
    own: set[str] = set()
    if ctx.inventory.runtime.image:
        specs = {k.removeprefix("workload-").removesuffix(".spec") for k in facts.files if k.endswith(".spec")}
        running = {c.removeprefix("sparkctl-") for c in facts.containers if c != lc.RAY_CONTAINER}
        own = (specs | running) - with_pid
    wanted = ctx.params.get("workloads")
    for name in sorted(with_pid | own):
        if wanted and name not in wanted:
            continue
        was = (
            f"container {lc.workload_container(name)}"
            if name in own
            else f"pid {facts.files[f'workload-{name}.pid'].strip()}"
        )
        steps.append(
            Step(
                host=host.name,
                kind="workload_stopped",
                target=name,
                description=f"stop workload {name}",
                commands=[_sh(lc.build_workload_stop(ctx.inventory, name, home, own=name in own))],
                diff=[f"- {name}: {was}", f"+ {name}: stopped"],
            )
        )
    strays = _stray_workload_pids(facts)
    if strays and not wanted:
        pids = " ".join(str(p) for p in strays)
        steps.append(
            Step(
                host=host.name,
                kind="workload_stopped",
                target="strays",
                description=f"stop worker processes left behind (pids {pids})",
                commands=[_sh(f"kill -TERM {pids} 2>/dev/null; sleep 2; kill -KILL {pids} 2>/dev/null; true")],
                diff=[f"- processes {pids}", "+ none"],
            )
        )
    return steps


def plan_ray_stop(ctx: PlanContext, host: Host) -> list[Step]:
    """Stop Ray on a host if any of it runs."""
    facts = ctx.facts[host.name]
    procs = [p for p in facts.processes if p.user == facts.user and any(m in p.args for m in RAY_MARKERS)]
    container = lc.RAY_CONTAINER in facts.containers  # its processes belong to root, not to the login user
    if not procs and not container:
        return []
    return [
        Step(
            host=host.name,
            kind="ray_stopped",
            target="ray",
            description="stop Ray",
            commands=[_sh(lc.build_ray_stop(ctx.inventory, ctx.home(host)))],
            diff=[
                f"- ray: {f'container {lc.RAY_CONTAINER}' if container else f'{len(procs)} processes'}",
                "+ ray: stopped",
            ],
        )
    ]


def plan_verify_clean(ctx: PlanContext, host: Host) -> list[Step]:
    """Check that no Ray or worker process of the login user is left."""
    # "[r]aylet" matches "raylet" but not this check's own command line.
    pattern = "[r]aylet|[g]cs_server|[r]ay/dashboard|[r]ay/_private|[r]ay::|[e]mbed_worker[.]py|[v]llm serve"
    line = f'! pgrep -u "$(id -un)" -f -a -- {shlex.quote(pattern)}'
    if ctx.inventory.runtime.image:  # containers run as root: ask docker
        line += " && ! docker ps -q --filter name=sparkctl- | grep -q ."
    return [
        Step(
            host=host.name,
            kind="verify_clean",
            target="processes",
            description="no Ray or worker process is left",
            commands=[_sh(line)],
            changes=False,
            wait=Wait(kind="remote", deadline=30, interval=1),
        )
    ]
