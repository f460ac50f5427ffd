"""Pure builders of the shell lines that start and stop Ray and workloads on a host."""

from __future__ import annotations

import json
import shlex

from sparkctl import paths
from sparkctl.inventory.models import Host, Inventory, Workload

q = shlex.quote

WORKER_FILE = "embed_worker.py"
RAY_CONTAINER = "sparkctl-ray"


def runtime_python(inv: Inventory) -> str:
    """The Python that runs sparkctl's helpers on the hosts: the runtime venv's, else the image's/system's."""
    return f"{inv.runtime.venv}/bin/python" if inv.runtime.venv else "python3"


def fabric_ip(host: Host) -> str:
    """The address Ray and the collectives use on a host."""
    return str(host.fabric[0].address.ip)


def _env_prelude(home: str) -> str:
    """Load the env file and turn on Ray token auth (the token is a file, never a value on a command line)."""
    return (
        f"set -a && . {q(paths.ENV_FILE)} && set +a && "
        f"export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={q(paths.token_path(home))} && "
    )


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
        rt.image or "",
        "sh",
        "-c",
        shlex.join(argv),
    ]
    return f"mkdir -p {q(paths.state_dir(home))}/logs && {_docker_run(RAY_CONTAINER, docker, log)}"


def _docker_run(name: str, docker: list[str], log: str) -> str:
    """Replace a container of that name (a stopped one keeps the name) and follow its output into `log`."""
    return (
        f"{{ docker rm -f {q(name)} >/dev/null 2>&1; true; }} && {shlex.join(docker)} > /dev/null && "
        f"{{ setsid docker logs -f {q(name)} >> {q(log)} 2>&1 < /dev/null & }}"
    )


def container_flags(inv: Inventory, home: str) -> list[str]:
    """docker run flags for the worker container on a Spark."""
    hf = inv.runtime.hf_cache.replace("~", home, 1)
    return [
        "--gpus",
        "all",
        "--network",
        "host",
        "--ipc",
        "host",
        f"--shm-size={inv.runtime.shm_size_gb}g",
        "--ulimit",
        "memlock=-1",
        "--ulimit",
        "stack=67108864",
        "--device",
        "/dev/infiniband",
        "--env-file",
        paths.ENV_FILE,
        "-e",
        "RAY_AUTH_MODE=token",
        "-e",
        "RAY_AUTH_TOKEN_PATH=/sparkctl/ray-token",
        "-v",
        f"{paths.state_dir(home)}:/sparkctl",
        "-v",
        f"{hf}:/root/.cache/huggingface",
    ]


def build_ray_stop(inv: Inventory, home: str) -> str:
    """Shell line stopping Ray on a host (safe when nothing runs)."""
    if inv.runtime.venv:
        return f"{q(inv.runtime.venv)}/bin/ray stop --force >/dev/null 2>&1; true"
    return f"docker rm -f {RAY_CONTAINER} >/dev/null 2>&1; true"


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


def build_ray_check(inv: Inventory, home: str) -> str:
    """Shell line on the head running the formation check (the script comes on stdin)."""
    head = f"{fabric_ip(inv.head)}:{inv.ray.port}"
    if inv.runtime.venv:
        return f"{_env_prelude(home)}export RAY_ADDRESS={q(head)} && exec {q(inv.runtime.venv)}/bin/python -"
    return f"exec docker exec -i -e RAY_ADDRESS={q(head)} {RAY_CONTAINER} python -"


def bind_address(inv: Inventory, w: Workload) -> str:
    """Where a workload's API listens on the head."""
    return {"fabric": fabric_ip(inv.head), "management": inv.head.address, "loopback": "127.0.0.1"}[w.bind]


def endpoint(inv: Inventory, w: Workload) -> str:
    """Base URL of a workload's API as the laptop reaches it."""
    host = inv.head.address if w.bind != "fabric" else fabric_ip(inv.head)
    return f"http://{host}:{w.port}"


def rank_hosts(inv: Inventory, w: Workload) -> list[Host]:
    """Hosts running a `vllm serve` of `w` under vLLM's multiprocessing executor, head first (index = node rank).

    Empty for every other workload: those run one process, on the head.
    """
    if w.engine != "vllm" or w.executor != "mp" or w.tensor_parallel_size < 2:
        return []
    others = [h for h in inv.hosts if h.name != inv.head.name]
    return [inv.head, *others][: w.tensor_parallel_size]


def workload_argv(inv: Inventory, w: Workload, home: str, host: Host | None = None) -> list[str]:
    """The program and arguments a workload runs on `host` (default: the head)."""
    if w.engine == "embed":
        py = runtime_python(inv)
        worker = f"{paths.state_dir(home)}/{WORKER_FILE}" if inv.runtime.venv else f"/sparkctl/{WORKER_FILE}"
        bundle = {"GPU": 1} if all(h.gpus for h in inv.hosts) and inv.runtime.image else {"CPU": 1}
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
            *w.extra_args,
        ]
    vllm = f"{inv.runtime.venv}/bin/vllm" if inv.runtime.venv else "vllm"
    # Ranks on several Sparks need the Ray executor, which vLLM only uses when asked: with the backend unset and
    # more ranks than local GPUs it refuses ("World size ... is larger than the number of available GPUs ...
    # set '--distributed-executor-backend ray'"). One rank needs no executor backend: vLLM picks "uni" and never
    # touches Ray (vllm/config/parallel.py, ParallelConfig.__post_init__, vLLM 0.32.0), which is also what runs
    # on a platform without a Ray device key (vLLM's CPU build: vllm/platforms/cpu.py).
    executor = ["--distributed-executor-backend", "ray"] if w.tensor_parallel_size > 1 else []
    api = ["--host", bind_address(inv, w), "--port", str(w.port)]
    ranks = [h.name for h in rank_hosts(inv, w)]
    if ranks:
        # vLLM's multiprocessing executor across nodes: every node runs `vllm serve` with the same model arguments
        # plus --nnodes/--node-rank/--master-addr (torch.distributed meets at master-addr:master-port, default
        # 29501: vllm/config/parallel.py, vllm/distributed/parallel_state.py); the nodes but the first run
        # --headless, no API server (vllm/entrypoints/cli/serve.py, run_headless). vLLM 0.32.0.
        rank = ranks.index(host.name) if host is not None and host.name in ranks else 0
        executor = ["--distributed-executor-backend", "mp", "--nnodes", str(len(ranks)), "--node-rank", str(rank)]
        executor += ["--master-addr", fabric_ip(inv.head)]
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
        *executor,
        "--gpu-memory-utilization",
        f"{w.gpu_memory_utilization:g}",
        *api,
        *w.extra_args,
    ]


SPREAD = json.dumps({"placement_group_options": {"strategy": "SPREAD"}}, separators=(",", ":"))


def workload_env(inv: Inventory, w: Workload) -> dict[str, str]:
    """Extra environment of a workload process (besides the env file and the API key): where Ray's head is."""
    # vLLM's multiprocessing executor never joins Ray.
    env = {} if rank_hosts(inv, w) else {"RAY_ADDRESS": f"{fabric_ip(inv.head)}:{inv.ray.port}"}
    if w.engine == "vllm":
        env["VLLM_DISTRIBUTED_EXECUTOR_CONFIG"] = SPREAD
    return env | dict(w.env)


def workload_spec(inv: Inventory, w: Workload, home: str, host: Host | None = None) -> str:
    """One line identifying what a workload runs on `host` (and in which image); a change of it means a restart."""
    env = " ".join(f"{k}={v}" for k, v in sorted(workload_env(inv, w).items()))
    image = f"image={inv.runtime.image} " if inv.runtime.image else ""
    return f"{image}{env} {shlex.join(workload_argv(inv, w, home, host))}".strip()


def pid_file(home: str, name: str) -> str:
    return f"{paths.state_dir(home)}/workload-{name}.pid"


def spec_file(home: str, name: str) -> str:
    return f"{paths.state_dir(home)}/workload-{name}.spec"


def build_workload_start(inv: Inventory, w: Workload, home: str, host: Host | None = None) -> str:
    """Start a workload on `host` (default the head) detached (own session), API key read from stdin, pid and
    spec recorded."""
    log = paths.log_path(home, w.name)
    argv = workload_argv(inv, w, home, host)
    env = " ".join(f"{k}={q(v)}" for k, v in workload_env(inv, w).items())
    key_var = "VLLM_API_KEY" if w.engine == "vllm" else "SPARKCTL_API_KEY"
    pidf = q(pid_file(home, w.name))
    if inv.runtime.venv:
        # braces keep `&` to the launch alone (not the whole && chain), so $! is the workload's pid
        prefix = f"{env} " if env else ""
        launch = f"{{ {prefix}setsid {shlex.join(argv)} > {q(log)} 2>&1 < /dev/null & }} && echo $! > {pidf}"
    else:
        name = f"sparkctl-{w.name}"
        envs = [x for k, v in workload_env(inv, w).items() for x in ("-e", f"{k}={v}")]
        docker = [
            "docker",
            "run",
            "-d",
            "--name",
            name,
            *container_flags(inv, home),
            "-e",
            key_var,
            *envs,
            inv.runtime.image or "",
            *argv,
        ]
        launch = f"{_docker_run(name, docker, log)} && docker inspect -f '{{{{.State.Pid}}}}' {q(name)} > {pidf}"
    return (
        f"mkdir -p {q(paths.state_dir(home))}/logs && "
        f"IFS= read -r {key_var} && export {key_var} && {_env_prelude(home)}"
        f"{launch} && printf '%s\\n' {q(workload_spec(inv, w, home, host))} > {q(spec_file(home, w.name))}"
    )


def build_workload_alive(inv: Inventory, name: str, home: str) -> str:
    """Shell line that succeeds while a workload's process (or container) is running."""
    if inv.runtime.image:
        return f"docker ps -q --filter name=^sparkctl-{name}$ | grep -q ."
    return f'kill -0 "$(cat {q(pid_file(home, name))})" 2>/dev/null'


def build_workload_stop(inv: Inventory, name: str, home: str, grace: int = 30) -> str:
    """Stop a workload: TERM its process group, wait up to `grace` s, then KILL; forget its pid."""
    pidf = q(pid_file(home, name))
    stop = (
        f"if [ -f {pidf} ]; then pid=$(cat {pidf}); "
        f'kill -TERM -"$pid" 2>/dev/null; i=0; '
        f'while kill -0 -"$pid" 2>/dev/null && [ $i -lt {grace * 5} ]; do sleep 0.2; i=$((i+1)); done; '
        f'kill -KILL -"$pid" 2>/dev/null; rm -f {pidf} {q(spec_file(home, name))}; fi; true'
    )
    if inv.runtime.image:  # the container's processes belong to root: docker stops them (TERM, KILL after grace)
        container = q(f"sparkctl-{name}")
        return (
            f"docker stop -t {grace} {container} >/dev/null 2>&1; docker rm -f {container} >/dev/null 2>&1; "
            f"rm -f {pidf} {q(spec_file(home, name))}; true"
        )
    return stop


EPHEMERAL = "32768-60999"


def render_firewall(inv: Inventory, host: Host, ssh_port: int = 22) -> str:
    """nftables rules keeping Ray off every interface but the fabric and loopback.

    Ray 2.x binds its GCS, raylet and agents on all interfaces even with --node-ip-address, so binding alone cannot
    keep them off the management network. New inbound TCP to Ray's pinned ports, its worker range and the ephemeral
    range (where Ray's unpinned helpers listen; Linux's default ip_local_port_range) is dropped unless it arrives
    on a twin or loopback. Established traffic, the SSH port this session uses and the workload API ports are
    accepted first, so even an SSH port inside a dropped range stays reachable.
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
    drop = ", ".join([*map(str, ports), f"{p.min_worker}-{p.max_worker}", EPHEMERAL])
    ifaces = ", ".join(f'"{i}"' for i in ["lo", *(t.interface for t in host.fabric)])
    keep = ", ".join(str(p) for p in sorted({ssh_port, *(w.port for w in inv.workloads)}))
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
