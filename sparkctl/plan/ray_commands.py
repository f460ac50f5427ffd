"""Pure builders of the shell lines that start, stop and check Ray on a host."""

from __future__ import annotations

import json
import shlex

from sparkctl import paths
from sparkctl.inventory.models import Host, Inventory
from sparkctl.plan.layout import fabric_ip
from sparkctl.plan.runtime import RAY_CONTAINER, container_flags, docker_run, env_prelude, mounted_dirs, ray_image

q = shlex.quote


def ray_start_argv(inv: Inventory, host: Host) -> list[str]:
    """`ray start` for a host: head or worker, every port pinned, bound to the fabric address."""
    ports = inv.ray.ports
    ip = fabric_ip(host)
    argv = [
        "ray",
        "start",
        f"--node-ip-address={ip}",
        "--disable-usage-stats",
        f"--node-manager-port={ports.node_manager}",
        f"--object-manager-port={ports.object_manager}",
        f"--min-worker-port={ports.min_worker}",
        f"--max-worker-port={ports.max_worker}",
        f"--dashboard-agent-listen-port={ports.dashboard_agent_listen}",
        f"--dashboard-agent-grpc-port={ports.dashboard_agent_grpc}",
        f"--runtime-env-agent-port={ports.runtime_env_agent}",
        f"--metrics-export-port={ports.metrics_export}",
        f"--num-gpus={host.gpus}",
    ]
    if host.name == inv.head.name:
        argv += ["--head", f"--port={inv.ray.port}", f"--ray-client-server-port={ports.client_server}"]
        if inv.ray.dashboard:
            argv += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={ports.dashboard}"]
        else:
            argv += ["--include-dashboard=false"]
    else:
        argv += [f"--address={fabric_ip(inv.head)}:{inv.ray.port}"]
    return argv


def build_ray_start(inv: Inventory, host: Host, home: str) -> str:
    """Shell line starting Ray on `host` detached from the SSH session, logging to the host's ray log."""
    log = paths.log_path(home, "ray")
    rt = inv.runtime
    if rt.venv:
        argv = ray_start_argv(inv, host)
        argv[0] = f"{rt.venv}/bin/ray"
        inner = env_prelude(home) + f"exec {shlex.join(argv)}"
        return f"mkdir -p {q(paths.state_dir(home))}/logs && setsid -w sh -c {q(inner)} >> {q(log)} 2>&1 < /dev/null"
    argv = [*ray_start_argv(inv, host), "--block"]
    docker = [
        "docker",
        "run",
        "-d",
        "--name",
        RAY_CONTAINER,
        *container_flags(inv, home),
        # The entrypoint is named, never inherited: the vllm-openai images' ENTRYPOINT is `vllm serve`, which would
        # turn the command into `vllm serve sh -c ...` (vLLM's examples/ray_serving/run_cluster.sh passes
        # `--entrypoint /bin/bash` for the same reason).
        "--entrypoint",
        "sh",
        ray_image(inv),
        "-c",
        shlex.join(argv),
    ]
    mounts = " ".join(q(d) for d in mounted_dirs(inv, home))
    return f"mkdir -p {mounts} && {docker_run(RAY_CONTAINER, docker, log)}"


def build_ray_stop(inv: Inventory, home: str) -> str:
    """Shell line stopping Ray on a host (safe when nothing runs)."""
    if inv.runtime.venv:
        return f"{q(inv.runtime.venv)}/bin/ray stop --force >/dev/null 2>&1; true"
    # Removing the container ends every process in it, the workloads started in it with `docker exec` included: their
    # pid records (pids of that container's namespace) go with it, so no later stop signals a process of its
    # successor by a stale pid.
    # Workloads in containers of their own (`own_container`) keep no pid file and are not touched.
    state = q(paths.state_dir(home))
    records = (
        f'for f in {state}/workload-*.pid; do [ -f "$f" ] || continue; n=${{f%.pid}}; '
        'rm -f "$n.pid" "$n.spec" "$n.health"; done'
    )
    return f"docker rm -f {RAY_CONTAINER} >/dev/null 2>&1; {records}; true"


def ray_check_script(expected_ips: list[str]) -> str:
    """Python run on the head: exit 0 when every expected node is alive with its resources, each address once.

    A raylet that died and was started again on the same address (a host rebooted, `up` restarting it at once) is a
    new node, while the GCS keeps the dead one's record alive until its health checks fail: they name the node id,
    so the new raylet does not answer them (ray-project/ray#30841), and they take seconds to give up (#40837). Until
    then Ray may place a placement group's bundle on the dead record; the check waits until each address has one
    alive node."""
    return (
        "import collections, json, sys, ray\n"
        'ray.init(address="auto", logging_level="ERROR", log_to_driver=False)\n'
        'nodes = [n for n in ray.nodes() if n["Alive"]]\n'
        'alive = {n["NodeManagerAddress"]: n["Resources"] for n in nodes}\n'
        'count = collections.Counter(n["NodeManagerAddress"] for n in nodes)\n'
        f"want = {json.dumps(expected_ips)}\n"
        "missing = [ip for ip in want if ip not in alive]\n"
        "stale = [ip for ip in want if count[ip] > 1]\n"
        'print(json.dumps({"alive": alive, "missing": missing, "twice": stale}))\n'
        "sys.exit(1 if missing or stale else 0)\n"
    )


def build_ray_python(inv: Inventory, home: str) -> str:
    """Shell line on the head running a Python script from stdin as a Ray driver (token auth, the head's address).

    In container mode it runs inside the head's Ray container (whose environment carries the token settings)."""
    head = f"{fabric_ip(inv.head)}:{inv.ray.port}"
    if inv.runtime.venv:
        return f"{env_prelude(home)}export RAY_ADDRESS={q(head)} && exec {q(inv.runtime.venv)}/bin/python -"
    return f"exec docker exec -i -e RAY_ADDRESS={q(head)} {RAY_CONTAINER} python3 -"


def build_ray_check(inv: Inventory, home: str) -> str:
    """Shell line on the head running the formation check (the script comes on stdin)."""
    return build_ray_python(inv, home)


def placement_check_script(min_groups: int, expected: list[list[str]] | None = None) -> str:
    """Python run on the head: exit 0 when every live placement group has its bundles on distinct hosts, at least
    `min_groups` groups of two or more bundles exist (one per multi-rank workload), and each host set in `expected`
    (the fabric addresses of a workload's group, when it lists `hosts`) is exactly the hosts of its own group.

    Reads Ray's own record: `ray.util.placement_group_table()` (bundles_to_node_id per group) and `ray.nodes()`
    (NodeID -> NodeManagerAddress)."""
    want = json.dumps([sorted(e) for e in expected or []])
    return (
        "import json, sys, ray\n"
        'ray.init(address="auto", logging_level="ERROR", log_to_driver=False)\n'
        'ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}\n'
        "groups = []\n"
        "for gid, pg in ray.util.placement_group_table().items():\n"
        '    if pg.get("state") != "CREATED":\n'
        "        continue\n"
        '    hosts = [ips.get(n, n) for _, n in sorted(pg.get("bundles_to_node_id", {}).items())]\n'
        '    groups.append({"group": gid[:12], "strategy": pg.get("strategy"), "hosts": hosts})\n'
        'crowded = [g for g in groups if len(set(g["hosts"])) < len(g["hosts"])]\n'
        'multi = [g for g in groups if len(g["hosts"]) > 1]\n'
        f"want = {want}\n"
        "left = [sorted(g['hosts']) for g in groups]\n"
        "misplaced = []\n"
        "for hosts in want:\n"
        "    if hosts in left:\n"
        "        left.remove(hosts)\n"
        "    else:\n"
        "        misplaced.append(hosts)\n"
        'print(json.dumps({"groups": groups, "crowded": crowded, "not_placed_on": misplaced}))\n'
        f"sys.exit(1 if crowded or misplaced or len(multi) < {int(min_groups)} else 0)\n"
    )
