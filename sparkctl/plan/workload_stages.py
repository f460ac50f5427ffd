"""Planners of the workload stages: the page cache before weights load, the workloads' (re)start, the waits until
they answer and Ray placed their ranks, and their stop."""

from __future__ import annotations

from sparkctl import paths
from sparkctl.facts.models import HostFacts
from sparkctl.inventory.models import Host, Workload
from sparkctl.plan.context import PlanContext
from sparkctl.plan.layout import endpoint, fabric_ip, own_container, rank_hosts, workload_container, workload_ranks
from sparkctl.plan.live_state import workload_exit, workload_health, workload_state
from sparkctl.plan.models import Command, Step, Wait, sh
from sparkctl.plan.ray_commands import build_ray_python, placement_check_script
from sparkctl.plan.runtime import RAY_CONTAINER
from sparkctl.plan.workload_commands import (
    WORKER_FILE,
    build_workload_alive,
    build_workload_forget,
    build_workload_start,
    build_workload_stop,
    workload_spec,
)


def _selected(ctx: PlanContext) -> list[Workload]:
    names = ctx.params.get("workloads")
    ws = ctx.inventory.workloads
    return [w for w in ws if not names or w.name in names]


def workloads_to_start(ctx: PlanContext) -> list[Workload]:
    """Workloads that the workload stage would (re)start."""
    ray_restarts = "ray_node" in ctx.changed
    return [
        w
        for w in _selected(ctx)
        if (ray_restarts and not own_container(ctx.inventory, w)) or workload_state(ctx, w) != "ok"
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
    own = own_container(ctx.inventory, w)
    if workload_exit(ctx.facts[host.name].files, w.name) is not None:
        return [sh(build_workload_forget(ctx.home(host), w.name, container=own))]
    return [sh(build_workload_stop(ctx.inventory, w.name, ctx.home(host), own=own))]


def _plan_other_ranks(ctx: PlanContext, host: Host) -> list[Step]:
    """On a host other than a workload's head: (re)start its rank of each multiprocessing-executor workload being
    started."""
    inv = ctx.inventory
    steps = []
    for w in workloads_to_start(ctx):
        ranks = [h.name for h in rank_hosts(inv, w)]
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
    cmds.append(sh(build_workload_start(inv, w, home, host), stdin_secret=f"api_key:{w.name}"))
    return Step(
        host=host.name,
        kind="workload",
        target=w.name,
        description=description,
        commands=cmds,
        diff=[
            f"- {w.name}: {state}" + (f" ({workload_health(ctx, w, host)})" if state == "broken" else ""),
            f"+ {w.name}: {workload_spec(inv, w, home, host)}",
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
        have = facts.files.get(f"{WORKER_FILE}.sha256")
        want = ctx.digests.get("worker_code", "")
        if have != want:
            target = f"{paths.state_dir(home)}/{WORKER_FILE}"
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
            + f", {endpoint(inv, w)}"
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
            description=f"{w.name} answers at {endpoint(ctx.inventory, w)}",
            changes=False,
            wait=Wait(
                kind="http",
                deadline=w.ready_timeout,
                interval=1,
                url=endpoint(ctx.inventory, w),
                model=w.name,
                secret=f"api_key:{w.name}",
                log=paths.log_path(home, w.name),
                alive=sh(build_workload_alive(ctx.inventory, w.name, home)),
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
    multi = [w for w in _selected(ctx) if workload_ranks(w) > 1 and not rank_hosts(ctx.inventory, w)]
    if not multi:
        return []
    names = ",".join(w.name for w in multi)
    # a workload that lists its hosts must be placed on exactly those (the embed worker pins its bundles there)
    expected = [[fabric_ip(h) for h in ctx.inventory.group(w)] for w in multi if w.hosts is not None]
    return [
        Step(
            host=host.name,
            kind="verify_placement",
            target=names,
            description=f"Ray places the ranks of {names} one per host (placement groups read from Ray)",
            commands=[
                sh(
                    build_ray_python(ctx.inventory, ctx.home(host)),
                    stdin=placement_check_script(len(multi), expected),
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
        running = {c.removeprefix("sparkctl-") for c in facts.containers if c != RAY_CONTAINER}
        own = (specs | running) - with_pid
    wanted = ctx.params.get("workloads")
    for name in sorted(with_pid | own):
        if wanted and name not in wanted:
            continue
        was = (
            f"container {workload_container(name)}"
            if name in own
            else f"pid {facts.files[f'workload-{name}.pid'].strip()}"
        )
        steps.append(
            Step(
                host=host.name,
                kind="workload_stopped",
                target=name,
                description=f"stop workload {name}",
                commands=[sh(build_workload_stop(ctx.inventory, name, home, own=name in own))],
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
                commands=[sh(f"kill -TERM {pids} 2>/dev/null; sleep 2; kill -KILL {pids} 2>/dev/null; true")],
                diff=[f"- processes {pids}", "+ none"],
            )
        )
    return steps
