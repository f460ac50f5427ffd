"""Pure builders of the shell lines that start and stop Ray and workloads on a host."""

from __future__ import annotations

import json
import shlex

from sparkctl import paths
from sparkctl.facts.probe import SYSTEM_NCCL
from sparkctl.inventory.models import Host, Inventory, Workload

q = shlex.quote

WORKER_FILE = paths.WORKER_FILE
RAY_CONTAINER = paths.RAY_CONTAINER


def runtime_python(inv: Inventory) -> str:
    """The Python that runs sparkctl's helpers on the hosts: the runtime venv's, else the image's/system's."""
    return f"{inv.runtime.venv}/bin/python" if inv.runtime.venv else "python3"


def fabric_ip(host: Host) -> str:
    """The address Ray and the collectives use on a host."""
    return str(host.fabric[0].address.ip)


def peer_ssh(source_home: str) -> list[str]:
    """ssh from a Spark to another with the cluster's peer key (plan/images.py), without the destination: host keys
    are checked against peer-known-hosts only.

    ssh options (ssh_config(5), OpenSSH): IdentitiesOnly (the peer key alone, no agent keys), BatchMode (never a
    prompt), StrictHostKeyChecking=yes with UserKnownHostsFile/GlobalKnownHostsFile (only the keys sparkctl wrote),
    ConnectTimeout."""
    return [
        "ssh",
        "-i",
        paths.peer_file(source_home, "peer-key"),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        f"UserKnownHostsFile={paths.peer_file(source_home, 'peer-known-hosts')}",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "ConnectTimeout=10",
    ]


def _env_prelude(home: str) -> str:
    """Load the env file and turn on Ray token auth (the token is a file, never a value on a command line)."""
    return (
        f"set -a && . {q(paths.ENV_FILE)} && set +a && "
        f"export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={q(paths.token_path(home))} && "
    )


def ray_image(inv: Inventory) -> str:
    """The image the Ray container runs (and the workloads `docker exec`ed into it): Runtime.ray_image."""
    return inv.runtime.ray_image


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
        inner = _env_prelude(home) + f"exec {shlex.join(argv)}"
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
    mounts = " ".join(q(d) for d in _mounted_dirs(inv, home))
    return f"mkdir -p {mounts} && {_docker_run(RAY_CONTAINER, docker, log)}"


def _mounted_dirs(inv: Inventory, home: str) -> list[str]:
    """Host directories a container of the image mounts (made first, so that docker does not make them root's)."""
    hf = inv.runtime.hf_cache.replace("~", home, 1)
    return [f"{paths.state_dir(home)}/logs", hf, f"{home}/{VLLM_CONFIG_DIR}"]


def _docker_run(name: str, docker: list[str], log: str) -> str:
    """Replace a container of that name (a stopped one keeps the name) and follow its output into `log`."""
    return (
        f"{{ docker rm -f {q(name)} >/dev/null 2>&1; true; }} && {shlex.join(docker)} > /dev/null && "
        f"{{ setsid docker logs -f {q(name)} >> {q(log)} 2>&1 < /dev/null & }}"
    )


VLLM_CONFIG_DIR = ".config/vllm"
"""Where the host keeps vLLM's config (its non-carry-over list), relative to $HOME; mounted into the container."""
CONTAINER_STATE = paths.CONTAINER_STATE
CONTAINER_VLLM_CONFIG = "/sparkctl-config/vllm"


def container_flags(inv: Inventory, home: str) -> list[str]:
    """docker run flags of the Ray container on a Spark (the one container per host; workloads run in the head's).

    As NVIDIA's multi-Spark flow (dgx-spark-playbooks nvidia/vllm, vLLM's examples/ray_serving/run_cluster.sh):
    GPUs, host network, shared memory, the HF cache; RDMA devices and ulimits from the inventory; the worker env
    file, Ray token auth from the mounted state dir, `--init` (a PID 1 that reaps the workloads started with
    `docker exec`), and VLLM_CONFIG_ROOT pointing at the host's ~/.config/vllm, where vLLM reads the non-carry-over
    list (`vllm/envs.py`, `vllm/ray/ray_env.py`): in the container vLLM runs as root with another $HOME.
    """
    rt = inv.runtime
    hf = rt.hf_cache.replace("~", home, 1)
    # no `--ipc host`: the container gets its own /dev/shm of --shm-size, as vLLM's run_cluster.sh does (podman
    # refuses --shm-size together with --ipc host)
    flags = ["--init", "--gpus", "all", "--network", "host", f"--shm-size={rt.shm_size_gb}g"]
    for limit in rt.ulimits:
        flags += ["--ulimit", limit]
    for device in rt.devices:
        flags += ["--device", device]
    return [
        *flags,
        "--env-file",
        paths.ENV_FILE,
        "-e",
        "RAY_AUTH_MODE=token",
        "-e",
        f"RAY_AUTH_TOKEN_PATH={CONTAINER_STATE}/ray-token",
        "-e",
        f"VLLM_CONFIG_ROOT={CONTAINER_VLLM_CONFIG}",
        "-v",
        f"{paths.state_dir(home)}:{CONTAINER_STATE}",
        "-v",
        f"{home}/{VLLM_CONFIG_DIR}:{CONTAINER_VLLM_CONFIG}",
        "-v",
        f"{hf}:/root/.cache/huggingface",
    ]


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
    """Python run on the head: exit 0 when every expected node is alive with its resources."""
    return (
        "import json, sys, ray\n"
        'ray.init(address="auto", logging_level="ERROR", log_to_driver=False)\n'
        'alive = {n["NodeManagerAddress"]: n["Resources"] for n in ray.nodes() if n["Alive"]}\n'
        f"want = {json.dumps(expected_ips)}\n"
        "missing = [ip for ip in want if ip not in alive]\n"
        'print(json.dumps({"alive": alive, "missing": missing}))\n'
        "sys.exit(1 if missing else 0)\n"
    )


def build_ray_python(inv: Inventory, home: str) -> str:
    """Shell line on the head running a Python script from stdin as a Ray driver (token auth, the head's address).

    In container mode it runs inside the head's Ray container (whose environment carries the token settings)."""
    head = f"{fabric_ip(inv.head)}:{inv.ray.port}"
    if inv.runtime.venv:
        return f"{_env_prelude(home)}export RAY_ADDRESS={q(head)} && exec {q(inv.runtime.venv)}/bin/python -"
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
    """Whether sparkctl forms Ray on this cluster.

    A venv runtime always (it carries Ray, which the runtime check requires); an image only when a workload needs
    Ray, or when there is no workload at all (the cluster is then a Ray cluster for the user's own jobs): NVIDIA's
    current vLLM image and the vllm-openai images ship without Ray (docs/compatibility.md)."""
    return inv.runtime.venv is not None or not inv.workloads or any(needs_ray(w) for w in inv.workloads)


def own_container(inv: Inventory, w: Workload) -> bool:
    """Container mode, a workload that needs no Ray: it runs in a container of its own on each of its hosts
    (`sparkctl-<name>`), not inside the Ray container."""
    return bool(inv.runtime.image) and not needs_ray(w)


def workload_container(name: str) -> str:
    """The container of a workload that runs in one of its own."""
    return f"sparkctl-{name}"


def workload_argv(inv: Inventory, w: Workload, home: str, host: Host | None = None) -> list[str]:
    """The program and arguments a workload runs on `host` (default: the head)."""
    if w.engine == "embed":
        py = runtime_python(inv)
        worker = f"{paths.state_dir(home)}/{WORKER_FILE}" if inv.runtime.venv else f"{CONTAINER_STATE}/{WORKER_FILE}"
        bundle = embed_bundle(inv, w)
        # With `hosts` listed, rank i's bundle is pinned to the i-th host of the group (`--nodes`): Ray gives
        # every node a `node:<ip>` resource, the pin vLLM's V1 Ray executor used for its first bundle.
        nodes = ["--nodes", ",".join(fabric_ip(h) for h in inv.group(w))] if w.hosts is not None else []
        return [
            py,
            worker,
            "--model",
            w.model,
            "--tp",
            str(w.tensor_parallel_size),
            "--replicas",
            str(w.replicas),
            "--host",
            bind_address(inv, w),
            "--port",
            str(w.port),
            "--served-name",
            w.name,
            "--ray-address",
            f"{fabric_ip(inv.head)}:{inv.ray.port}",
            "--bundle-resources",
            json.dumps(bundle, separators=(",", ":")),
            *nodes,
            "--health-file",
            health_file(home, w.name) if inv.runtime.venv else f"/sparkctl/workload-{w.name}.health",
            *w.extra_args,
        ]
    vllm = f"{inv.runtime.venv}/bin/vllm" if inv.runtime.venv else "vllm"
    # Ranks on several Sparks need the Ray executor, which vLLM only uses when asked: with the backend unset and
    # more ranks than local GPUs it refuses ("World size ... is larger than the number of available GPUs ...
    # set '--distributed-executor-backend ray'"). One rank needs no executor backend: vLLM picks "uni" and never
    # touches Ray (vllm/config/parallel.py, ParallelConfig.__post_init__, vLLM 0.32.0), which is also what runs
    # on a platform without a Ray device key (vLLM's CPU build: vllm/platforms/cpu.py).
    executor = ["--distributed-executor-backend", "ray"] if workload_ranks(w) > 1 else []
    # Pipeline stages: `--pipeline-parallel-size` (vllm/engine/arg_utils.py, vLLM 0.32.0); vLLM lays the ranks
    # out PP-major, TP-minor (vllm/distributed/parallel_state.py, initialize_model_parallel: "ExternalDP x DP x PP
    # x PCP x TP"), and the multiprocessing executor numbers them node by node (global rank = node_rank x
    # local_world_size + local rank, vllm/v1/executor/multiproc_executor.py): with one GPU per Spark, the group's
    # first TP hosts are stage 0, the next TP hosts stage 1, and so on.
    pipeline = ["--pipeline-parallel-size", str(w.pipeline_parallel_size)] if w.pipeline_parallel_size > 1 else []
    api = ["--host", bind_address(inv, w), "--port", str(w.port)]
    ranks = [h.name for h in rank_hosts(inv, w)]
    if ranks:
        # vLLM's multiprocessing executor across nodes: every node runs `vllm serve` with the same model arguments
        # plus --nnodes/--node-rank/--master-addr (torch.distributed meets at master-addr:master-port, default
        # 29501: vllm/config/parallel.py, vllm/distributed/parallel_state.py); the nodes but the first run
        # --headless, no API server (vllm/entrypoints/cli/serve.py, run_headless). vLLM 0.32.0.
        rank = ranks.index(host.name) if host is not None and host.name in ranks else 0
        executor = ["--distributed-executor-backend", "mp", "--nnodes", str(len(ranks)), "--node-rank", str(rank)]
        executor += ["--master-addr", fabric_ip(inv.workload_head(w))]
        if rank:
            api = ["--headless"]
    return [
        vllm,
        "serve",
        w.model,
        "--served-model-name",
        w.name,
        "--tensor-parallel-size",
        str(w.tensor_parallel_size),
        # the branch, tag or commit of a hub model (EngineArgs.revision, vllm/engine/arg_utils.py, vLLM 0.32.0)
        *(["--revision", w.revision] if w.revision else []),
        *pipeline,
        *executor,
        "--gpu-memory-utilization",
        f"{w.gpu_memory_utilization:g}",
        *api,
        *w.extra_args,
    ]


def embed_bundle(inv: Inventory, w: Workload | None = None) -> dict[str, int]:
    """Resources of one embed-worker rank: a GPU when every host of its group gives Ray one, else a CPU.

    A CPU bundle does not reserve the Spark's GPU for the rank, and how Ray treats CUDA_VISIBLE_DEVICES for an actor
    granted no GPU depends on the version and on RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO (`set_visible_accelerator_ids`
    in `python/ray/_private/utils.py`). When it is on, the variable is set to "" and torch in the rank sees no GPU
    and silently runs on the CPU. Its default was on from its introduction (ray-project/ray#54928, 2025) until
    ray-project/ray#62492 (merged 2026-04) turned it off; Ray 2.60.0 reads it with `env_bool(..., False)`, so there
    the variable is left alone unless RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1 is set, while Ray 2.52 (the minimum)
    still blanks it. A `{GPU: 1}` bundle gets the GPU on every version.
    """
    hosts = inv.group(w) if w is not None else inv.hosts
    return {"GPU": 1} if all(h.gpus >= 1 for h in hosts) else {"CPU": 1}


def workload_env(inv: Inventory, w: Workload) -> dict[str, str]:
    """Extra environment of a workload process (besides the env file and the API key): where Ray's head is.

    Nothing here chooses where the ranks go, and nothing can: vLLM's Ray executor (`initialize_ray_cluster` in
    `vllm/v1/executor/ray_utils.py`, vLLM 0.32.0) reserves one `{GPU: 1}` bundle per rank with strategy PACK and
    nothing else. Its default V2 executor calls it with `require_gpu_on_driver=False`
    (`vllm/v1/executor/ray_executor_v2.py`), so not even the first bundle is pinned to `node:$VLLM_HOST_IP` (the V1
    executor did that). With one GPU per Ray node (`ray start --num-gpus=1`) PACK cannot fit two ranks on one Spark:
    the ranks are on distinct Sparks, whichever have a free GPU. `verify_placement` checks that; the inventory
    checks refuse the layouts where "whichever" could be wrong (`check_placement`).
    """
    # vLLM's multiprocessing executor and a single rank never join Ray.
    env = {"RAY_ADDRESS": f"{fabric_ip(inv.head)}:{inv.ray.port}"} if needs_ray(w) else {}
    if inv.runtime.nccl == "system" and w.engine == "vllm" and workload_ranks(w) > 1:
        # vLLM's pynccl communicator (its all-reduce, all-gather, reduce-scatter, send/recv between ranks) loads
        # this file instead of "libnccl.so.2", which resolves to the NCCL torch already loaded: the nvidia-nccl
        # wheel's (vllm/utils/nccl.py find_nccl_library, vllm/distributed/device_communicators/pynccl_wrapper.py,
        # vllm/envs.py VLLM_NCCL_SO_PATH; vLLM 0.32.0). vLLM copies VLLM_* variables to its Ray workers
        # (vllm/ray/ray_env.py), and the path is the same on every Spark.
        env["VLLM_NCCL_SO_PATH"] = SYSTEM_NCCL
    if w in inv.synced_weights():
        # `up` put the weights on every host (plan/weights.py): vLLM reads the cache only and never downloads
        # on its own (HF_HUB_OFFLINE, huggingface_hub constants.py); the inventory's env may say otherwise.
        env["HF_HUB_OFFLINE"] = "1"
    return env | dict(w.env)


def workload_spec(inv: Inventory, w: Workload, home: str, host: Host | None = None) -> str:
    """One line identifying what a workload runs on `host` (and in which image); a change of it means a restart."""
    env = " ".join(f"{k}={v}" for k, v in sorted(workload_env(inv, w).items()))
    image = f"image={ray_image(inv) if needs_ray(w) else inv.runtime.image} " if inv.runtime.image else ""
    return f"{image}{env} {shlex.join(workload_argv(inv, w, home, host))}".strip()


def pid_file(home: str, name: str) -> str:
    return f"{paths.state_dir(home)}/workload-{name}.pid"


def spec_file(home: str, name: str) -> str:
    return f"{paths.state_dir(home)}/workload-{name}.spec"


def _stop_script(pidf: str, specf: str, grace: int, extra: str = "") -> str:
    """TERM the process group recorded in `pidf`, wait up to `grace` s, KILL, forget it and `extra` files (safe
    when absent)."""
    tail = f" {extra}" if extra else ""
    return (
        f"if [ -f {pidf} ]; then pid=$(cat {pidf}); "
        f'kill -TERM -"$pid" 2>/dev/null; i=0; '
        f'while kill -0 -"$pid" 2>/dev/null && [ $i -lt {grace * 5} ]; do sleep 0.2; i=$((i+1)); done; '
        f'kill -KILL -"$pid" 2>/dev/null; rm -f {pidf} {specf}{tail}; fi; true'
    )


def health_file(home: str, name: str) -> str:
    """Where the embed worker keeps its health (`loading`, `ok`, `failed <why>`), read by the facts probe."""
    return f"{paths.state_dir(home)}/workload-{name}.health"


def build_workload_start(inv: Inventory, w: Workload, home: str, host: Host | None = None) -> str:
    """Start a workload on `host` (default the head) detached (own session), API key read from stdin, pid and spec
    recorded.

    venv: a process of the login user on that host. Container: a process in the head's Ray container, started with
    `docker exec` as NVIDIA's multi-Spark flow starts `vllm serve` (so it shares that container's Ray session and
    process namespace); its output goes to the same log file (the state dir is mounted), its pid (in the
    container's namespace) to the same pid file.
    """
    log = paths.log_path(home, w.name)
    argv = workload_argv(inv, w, home, host)
    env = " ".join(f"{k}={q(v)}" for k, v in workload_env(inv, w).items())
    key_var = "VLLM_API_KEY" if w.engine == "vllm" else "SPARKCTL_API_KEY"
    pidf = q(pid_file(home, w.name))
    if inv.runtime.venv:
        # braces keep `&` to the launch alone (not the whole && chain), so $! is the workload's pid
        prefix = f"{env} " if env else ""
        launch = f"{{ {prefix}setsid {shlex.join(argv)} > {q(log)} 2>&1 < /dev/null & }} && echo $! > {pidf}"
        prelude = _env_prelude(home)
    elif own_container(inv, w):
        # `docker run` of the user's image with its entrypoint named (vLLM's CLI, whatever the image's ENTRYPOINT)
        # and the key handed over by name; `docker logs -f` fills the log, the container is the process record.
        name = workload_container(w.name)
        envs = [x for k, v in workload_env(inv, w).items() for x in ("-e", f"{k}={v}")]
        docker = ["docker", "run", "-d", "--name", name, *container_flags(inv, home), "-e", key_var, *envs]
        docker += ["--entrypoint", argv[0], inv.runtime.image or "", *argv[1:]]
        launch = _docker_run(name, docker, log)
        prelude = ""
    else:
        inner = (
            f"{{ setsid {shlex.join(argv)} > {q(f'{CONTAINER_STATE}/logs/{w.name}.log')} 2>&1 < /dev/null & }} "
            f"&& echo $! > {q(f'{CONTAINER_STATE}/workload-{w.name}.pid')}"
        )
        envs = [x for k, v in workload_env(inv, w).items() for x in ("-e", f"{k}={v}")]
        launch = shlex.join(["docker", "exec", "-e", key_var, *envs, RAY_CONTAINER, "sh", "-c", inner])
        prelude = ""  # the container has the env file and the token settings from `docker run`
    mkdir = f"mkdir -p {q(paths.state_dir(home))}/logs"
    if own_container(inv, w):
        mkdir = "mkdir -p " + " ".join(q(d) for d in _mounted_dirs(inv, home))
    return (
        f"{mkdir} && "
        f"IFS= read -r {key_var} && export {key_var} && {prelude}"
        f"{launch} && printf '%s\\n' {q(workload_spec(inv, w, home, host))} > {q(spec_file(home, w.name))}"
    )


def build_workload_alive(inv: Inventory, name: str, home: str) -> str:
    """Shell line that succeeds while a workload's process is running (in the head's Ray container, if any)."""
    w = next((w for w in inv.workloads if w.name == name), None)
    if w is not None and own_container(inv, w):
        return f"[ \"$(docker inspect -f '{{{{.State.Running}}}}' {q(workload_container(name))} 2>/dev/null)\" = true ]"
    if inv.runtime.image:
        inner = f'kill -0 "$(cat {q(f"{CONTAINER_STATE}/workload-{name}.pid")})" 2>/dev/null'
        return shlex.join(["docker", "exec", RAY_CONTAINER, "sh", "-c", inner])
    return f'kill -0 "$(cat {q(pid_file(home, name))})" 2>/dev/null'


def build_workload_forget(home: str, name: str, container: bool = False) -> str:
    """Forget a workload whose process is gone (it exited by itself): its pid, spec and health records, and nothing
    signalled, since a pid of a process that is gone may name another one by now; in a container of its own, the
    exited container too."""
    records = f"rm -f {q(pid_file(home, name))} {q(spec_file(home, name))} {q(health_file(home, name))}"
    if container:
        return f"docker rm -f {q(workload_container(name))} >/dev/null 2>&1; {records}"
    return records


def build_workload_stop(inv: Inventory, name: str, home: str, grace: int = 30, *, own: bool = False) -> str:
    """Stop a workload: TERM its process group, wait up to `grace` s, then KILL; forget its pid. `own`: it runs in a
    container of its own (`own_container`)."""
    if own:
        # its own container: `docker stop` sends SIGTERM to its init, which hands it to vLLM, and waits `grace` s
        # before SIGKILL (docker stop --time); then the container and the records go
        container = q(workload_container(name))
        records = f"{q(pid_file(home, name))} {q(spec_file(home, name))} {q(health_file(home, name))}"
        return (
            f"docker stop -t {int(grace)} {container} >/dev/null 2>&1; docker rm -f {container} >/dev/null 2>&1; "
            f"rm -f {records}; true"
        )
    if inv.runtime.image:  # inside the Ray container (its processes are the container's), then the host's records
        inner = _stop_script(
            q(f"{CONTAINER_STATE}/workload-{name}.pid"), q(f"{CONTAINER_STATE}/workload-{name}.spec"), grace
        )
        docker = shlex.join(["docker", "exec", RAY_CONTAINER, "sh", "-c", inner])
        records = f"{q(pid_file(home, name))} {q(spec_file(home, name))} {q(health_file(home, name))}"
        return f"{docker} 2>/dev/null; rm -f {records}; true"
    return _stop_script(q(pid_file(home, name)), q(spec_file(home, name)), grace, q(health_file(home, name)))


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
