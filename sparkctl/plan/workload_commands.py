"""Pure builders of a workload's program and arguments, its environment, and the shell lines that start, watch and
stop it on a host."""

from __future__ import annotations

import json
import shlex

from sparkctl import paths
from sparkctl.facts.probe import SYSTEM_NCCL
from sparkctl.inventory.models import Host, Inventory, Workload
from sparkctl.plan.layout import (
    bind_address,
    fabric_ip,
    needs_ray,
    own_container,
    rank_hosts,
    workload_container,
    workload_ranks,
)
from sparkctl.plan.runtime import (
    CONTAINER_STATE,
    RAY_CONTAINER,
    container_flags,
    docker_run,
    env_prelude,
    mounted_dirs,
    ray_image,
    runtime_python,
)

q = shlex.quote


WORKER_FILE = paths.WORKER_FILE


def workload_argv(inv: Inventory, w: Workload, home: str, host: Host | None = None) -> list[str]:
    """The program and arguments a workload runs on `host` (default: the head)."""
    if w.engine == "embed":
        return _embed_argv(inv, w, home)
    return _vllm_argv(inv, w, host)


def _embed_argv(inv: Inventory, w: Workload, home: str) -> list[str]:
    """sparkctl's embedding worker: its ranks as Ray actors, one bundle each, its health in a file."""
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


def _vllm_argv(inv: Inventory, w: Workload, host: Host | None) -> list[str]:
    """`vllm serve` of the workload on `host` (default: the head): its executor, pipeline stages and API."""
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


def health_file(home: str, name: str) -> str:
    """Where the embed worker keeps its health (`loading`, `ok`, `failed <why>`), read by the facts probe."""
    return f"{paths.state_dir(home)}/workload-{name}.health"


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
        prelude = env_prelude(home)
    elif own_container(inv, w):
        # `docker run` of the user's image with its entrypoint named (vLLM's CLI, whatever the image's ENTRYPOINT)
        # and the key handed over by name; `docker logs -f` fills the log, the container is the process record.
        name = workload_container(w.name)
        envs = [x for k, v in workload_env(inv, w).items() for x in ("-e", f"{k}={v}")]
        docker = ["docker", "run", "-d", "--name", name, *container_flags(inv, home), "-e", key_var, *envs]
        docker += ["--entrypoint", argv[0], inv.runtime.image or "", *argv[1:]]
        launch = docker_run(name, docker, log)
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
        mkdir = "mkdir -p " + " ".join(q(d) for d in mounted_dirs(inv, home))
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
