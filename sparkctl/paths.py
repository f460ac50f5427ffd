"""Where sparkctl keeps things on the hosts. Pure constants and functions of a home directory."""

from __future__ import annotations

ENV_FILE = "/etc/sparkctl/worker.env"
"""The per-host worker environment (KEY=value lines, readable by `docker --env-file` and `sh`)."""

FIREWALL_FILE = "/etc/sparkctl/firewall.nft"
"""nftables rules keeping Ray off every interface but the fabric and loopback."""

NON_CARRY_OVER = ".config/vllm/ray_non_carry_over_env_vars.json"
"""vLLM reads this list (relative to $HOME) of variables Ray must not copy from the head to workers."""

STATE = ".local/state/sparkctl"
"""Per-user state on a host (relative to $HOME): logs, the Ray token, the worker code."""

RAY_CONTAINER = "sparkctl-ray"
"""Container mode: the Ray container on every host (workloads run inside the head's)."""

CONTAINER_STATE = "/sparkctl"
"""Container mode: where the host's state dir is mounted in the Ray container."""

WORKER_FILE = "embed_worker.py"
"""sparkctl's embedding worker (sparkctl/workers/embed.py) as installed in the state dir."""

WORKLOAD_MARKERS = ("vllm serve", WORKER_FILE)
"""What the command line of a live workload process contains: vLLM's server or sparkctl's embedding worker."""

CONNECTION_PREFIX = "sparkctl-"
"""NetworkManager profiles sparkctl owns are named sparkctl-<interface>."""


def state_dir(home: str) -> str:
    """Absolute state dir on a host."""
    return f"{home.rstrip('/')}/{STATE}"


def log_path(home: str, name: str) -> str:
    """Log file of `ray` or a workload on a host."""
    return f"{state_dir(home)}/logs/{name}.log"


def token_path(home: str) -> str:
    """The Ray auth token on a host (0600)."""
    return f"{state_dir(home)}/ray-token"


def connection_name(interface: str) -> str:
    """The NetworkManager profile sparkctl owns for `interface`."""
    return f"{CONNECTION_PREFIX}{interface}"


CHECKPOINT_FILE = "/run/sparkctl/nm-checkpoint"
"""D-Bus path of the NetworkManager checkpoint a run opened and has not yet committed or rolled back.

Under /run (tmpfs) on purpose: NetworkManager keeps checkpoints in memory only, so neither survives a reboot.
"""


LOCK_DIR = "/run/lock/sparkctl"
"""The cluster lock on a host: a directory holding the owner record (see sparkctl.session.lock)."""


def peer_comment(cluster: str) -> str:
    """The comment that names the cluster's peer key (a Spark copying to another) in authorized_keys."""
    return f"sparkctl-peer-{cluster}"


def peer_file(home: str, name: str) -> str:
    """The peer key's files in the state dir: `peer-key` (0600), `peer-known-hosts`, `peer-receive`."""
    return f"{state_dir(home)}/{name}"


WEIGHTS_SCRIPT = "weights.py"
"""The host-side weights helper (sparkctl/workers/weights.py) in the state dir."""


def hub_folder(repo: str) -> str:
    """A model repository's folder in the Hugging Face cache's hub/ (huggingface_hub file_download.py,
    repo_folder_name: "models--" and the id with "/" as "--")."""
    return "models--" + repo.replace("/", "--")


def weights_manifest(repo: str, revision: str) -> str:
    """What a host verified of `repo` at `revision` (relative to the state dir)."""
    return f"weights/{hub_folder(repo)}@{revision.replace('/', '--')}.json"
