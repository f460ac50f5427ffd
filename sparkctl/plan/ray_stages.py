"""Planners of the stages that form and remove the Ray cluster: the fabric's jumbo-frame check that precedes it,
Ray's firewall and token, the nodes and the wait until Ray shows them, and the teardown (Ray's stop, then the check
that no Ray or worker process is left)."""

from __future__ import annotations

import shlex

from sparkctl import paths
from sparkctl.inventory.models import Host
from sparkctl.inventory.topology import check_pairs, interface
from sparkctl.plan.context import PlanContext
from sparkctl.plan.firewall import render_firewall
from sparkctl.plan.layout import fabric_ip, needs_ray, ray_wanted
from sparkctl.plan.live_state import RAY_MARKERS, ray_formed, ray_present, ray_running_ok, raylet_ips, workload_exit
from sparkctl.plan.models import Command, Step, Wait, sh
from sparkctl.plan.ray_commands import build_ray_check, build_ray_start, build_ray_stop, ray_check_script
from sparkctl.plan.runtime import RAY_CONTAINER
from sparkctl.plan.workload_commands import build_workload_stop


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


def plan_ray_firewall(ctx: PlanContext, host: Host) -> list[Step]:
    """Keep Ray's and the workloads' listeners off the management network; (re)loaded whenever Ray is not running as
    specified."""
    facts = ctx.facts[host.name]
    rules = render_firewall(ctx.inventory, host, facts.ssh_server_port)
    have = facts.files.get("firewall.nft")
    if have == rules and (ray_running_ok(ctx, host) or not ray_wanted(ctx.inventory)):
        return []
    return [
        Step(
            host=host.name,
            kind="ray_firewall",
            target=paths.FIREWALL_FILE,
            description=f"allow {'Ray and ' if ray_wanted(ctx.inventory) else ''}the workloads' ports only on the "
            "fabric and loopback (nftables table inet sparkctl)",
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
    if have == want or not ray_wanted(ctx.inventory):
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
    if not ray_wanted(ctx.inventory):
        return _ray_not_wanted(ctx, host)
    is_head = host.name == ctx.inventory.head.name
    role = "head" if is_head else "worker"
    depends = bool(ctx.changed & {"ray_token", "worker_env", "fabric_active"})
    lost = lost_ray_nodes(ctx) if is_head else []
    if ray_running_ok(ctx, host) and not depends and not lost and not (not is_head and "ray_node" in ctx.changed):
        return []
    home = ctx.home(host)
    cmds = []
    running = (
        raylet_ips(facts)
        or any(m in p.args for p in facts.processes for m in RAY_MARKERS[:2])
        or RAY_CONTAINER in facts.containers
    )
    if running:
        cmds += [sh(build_workload_stop(ctx.inventory, name, home)) for name in _ray_drivers(ctx, host)]
        cmds.append(sh(build_ray_stop(ctx.inventory, home)))
    cmds.append(sh(build_ray_start(ctx.inventory, host, home)))
    return [
        Step(
            host=host.name,
            kind="ray_node",
            target=role,
            description=f"start the Ray {role} on {fabric_ip(host)} (token auth, ports pinned)"
            + (f": the cluster lost {', '.join(lost)} under a placement group, so it starts anew" if lost else ""),
            commands=cmds,
            diff=[
                f"- ray: {'running on ' + ','.join(sorted(raylet_ips(facts))) if running else 'stopped'}",
                f"+ ray {role}: {fabric_ip(host)}",
            ],
            depends_on_earlier=depends,
        )
    ]


RAY_LAUNCH_MARKERS = (paths.WORKER_FILE, "--distributed-executor-backend ray")
"""What a recorded launch spec of a workload on Ray holds: sparkctl's embed worker, or vLLM's Ray executor."""


def _ray_drivers(ctx: PlanContext, host: Host) -> list[str]:
    """The workloads whose driver process is recorded on this host (a venv's; in an image `ray stop` removes the
    container and every process in it) and was launched on Ray, as its recorded spec shows: in the inventory or
    not (a workload removed from it keeps running, unless its Ray goes).

    They are stopped before their Ray is. On the testbed's reboot case the embed worker, stopped once its GCS was
    gone, did not end on SIGTERM and waited out the stop's 30 s grace until SIGKILL. A workload of the inventory
    is started again by the workload stage (it restarts whatever ran on a restarted Ray)."""
    if ctx.inventory.runtime.image:
        return []
    files = ctx.facts[host.name].files
    names = sorted(k.removeprefix("workload-").removesuffix(".pid") for k in files if k.endswith(".pid"))
    return [
        name
        for name in names
        if any(m in files.get(f"workload-{name}.spec", "") for m in RAY_LAUNCH_MARKERS)
        and workload_exit(files, name) is None  # gone by itself: nothing to signal (the workload stage forgets it)
    ]


def lost_ray_nodes(ctx: PlanContext) -> list[str]:
    """Hosts whose Ray node is gone (the host rebooted, its raylet died) or not as specified (it is replaced), while
    the head's kept running and a workload on Ray is recorded on its head: that workload's placement group had a
    bundle on the node lost or replaced.

    The whole cluster is then restarted, head included, not only the lost node. A placement group that is removed
    while Ray reschedules its lost bundle can keep its reservation on the surviving nodes and stall every later
    group (ray-project/ray#64693, open; seen on the testbed: the removed group still held the head's GPU bundle
    and the restarted workload's group stayed PENDING, NO_RESOURCES). A new GCS holds no such state."""
    inv = ctx.inventory
    if not ray_running_ok(ctx, inv.head):
        return []  # the head restarts anyway
    heads = {w.name: ctx.facts.get(inv.workload_head(w).name) for w in inv.workloads if needs_ray(w)}
    recorded = [
        name
        for name, f in heads.items()
        if f is not None and (f"workload-{name}.spec" in f.files or name in f.container_workloads)
    ]
    if not recorded:
        return []
    return [h.name for h in inv.hosts if h.name in ctx.facts and not ray_running_ok(ctx, h)]


RAY_NOT_WANTED = (
    "no workload needs Ray (vLLM's multiprocessing executor and single-rank vLLM run without it; "
    "`ray.form: always` forms it anyway)"
)


def _ray_not_wanted(ctx: PlanContext, host: Host) -> list[Step]:
    """No workload needs Ray (and the inventory does not ask for it): Ray is not started (an image may have none),
    and a Ray left running from an earlier layout, its processes or its container, is stopped; the plan says so
    either way."""
    running = ray_present(ctx.facts[host.name])
    if running:
        return [
            Step(
                host=host.name,
                kind="ray_stopped",  # not ray_node: nothing that runs without Ray restarts for it
                target="ray",
                description=f"stop Ray: {RAY_NOT_WANTED}",
                commands=[
                    *(sh(build_workload_stop(ctx.inventory, n, ctx.home(host))) for n in _ray_drivers(ctx, host)),
                    sh(build_ray_stop(ctx.inventory, ctx.home(host))),
                ],
                diff=[f"- ray: {running}", "+ ray: not started"],
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


def plan_ray_ready(ctx: PlanContext, host: Host) -> list[Step]:
    """Wait until Ray shows this host's node alive (on the head: every node), so a timeout names the missing host
    and shows that host's own Ray log. Nothing to wait for when the facts show the cluster already formed."""
    inv = ctx.inventory
    if ray_formed(ctx) or not ray_wanted(inv):
        return []
    is_head = host.name == inv.head.name
    expected = [fabric_ip(h) for h in inv.hosts] if is_head else [fabric_ip(host)]
    return [
        Step(
            host=host.name,
            kind="verify_ray",
            target="formation" if is_head else "node",
            description=f"Ray shows all {len(inv.hosts)} nodes alive"
            if is_head
            else f"Ray shows {host.name} ({expected[0]}) alive",
            commands=[sh(build_ray_check(inv, ctx.home(host)), stdin=ray_check_script(expected))],
            changes=False,
            wait=Wait(kind="remote", deadline=120, interval=2, log=paths.log_path(ctx.home(host), "ray")),
        )
    ]


def plan_ray_stop(ctx: PlanContext, host: Host) -> list[Step]:
    """Stop Ray on a host if any of it runs."""
    running = ray_present(ctx.facts[host.name])
    if not running:
        return []
    return [
        Step(
            host=host.name,
            kind="ray_stopped",
            target="ray",
            description="stop Ray",
            commands=[sh(build_ray_stop(ctx.inventory, ctx.home(host)))],
            diff=[f"- ray: {running}", "+ ray: stopped"],
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
            commands=[sh(line)],
            changes=False,
            wait=Wait(kind="remote", deadline=30, interval=1),
        )
    ]
