"""How sparkctl's commands run on a host: the runtime's Python, the env file and Ray token prelude, the container
of the image (its docker run flags and mounts), and ssh from one Spark to another."""

from __future__ import annotations

import shlex

from sparkctl import paths
from sparkctl.inventory.models import Inventory

q = shlex.quote

RAY_CONTAINER = paths.RAY_CONTAINER


def runtime_python(inv: Inventory) -> str:
    """The Python that runs sparkctl's helpers on the hosts: the runtime venv's, else the image's/system's."""
    return f"{inv.runtime.venv}/bin/python" if inv.runtime.venv else "python3"


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


def env_prelude(home: str) -> str:
    """Load the env file and turn on Ray token auth (the token is a file, never a value on a command line)."""
    return (
        f"set -a && . {q(paths.ENV_FILE)} && set +a && "
        f"export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={q(paths.token_path(home))} && "
    )


def ray_image(inv: Inventory) -> str:
    """The image the Ray container runs (and the workloads `docker exec`ed into it): Runtime.ray_image."""
    return inv.runtime.ray_image


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


def mounted_dirs(inv: Inventory, home: str) -> list[str]:
    """Host directories a container of the image mounts (made first, so that docker does not make them root's)."""
    hf = inv.runtime.hf_cache.replace("~", home, 1)
    return [f"{paths.state_dir(home)}/logs", hf, f"{home}/{VLLM_CONFIG_DIR}"]


def docker_run(name: str, docker: list[str], log: str) -> str:
    """Replace a container of that name (a stopped one keeps the name) and follow its output into `log`."""
    return (
        f"{{ docker rm -f {q(name)} >/dev/null 2>&1; true; }} && {shlex.join(docker)} > /dev/null && "
        f"{{ setsid docker logs -f {q(name)} >> {q(log)} 2>&1 < /dev/null & }}"
    )
