"""Inventory models: what a cluster of Sparks should look like. Field descriptions are the reference docs."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

# Plain names only: no whitespace, no shell metacharacters, no leading '-' (it would read as an option).
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# A plain name becomes part of file names (the laptop's <cluster>/api-key-<workload>, the hosts'
# workload-<name>.health and logs/<name>.log: 255 bytes each) and may be a host's DNS label (63 at most).
MAX_NAME = 63
_IFNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")
_MODEL = re.compile(r"^[A-Za-z0-9_./~][A-Za-z0-9_./:@+~-]*$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./:@-]*$")


def invalid(message: str, hint: str) -> PydanticCustomError:
    """A validation error that carries its fix (the loader prints `hint:` from it)."""
    return PydanticCustomError("sparkctl", "{message}", {"message": message, "hint": hint})


def _plain_name(value: str) -> str:
    if len(value) > MAX_NAME:
        raise invalid(
            f"{value[:20]!r}... is {len(value)} characters long; a plain name has at most {MAX_NAME}",
            f"shorten it to {MAX_NAME} characters or fewer",
        )
    if not _NAME.match(value):
        raise invalid(
            f"{value!r} is not a plain name",
            "use letters, digits, '_', '.', '-' only, starting with a letter or digit, e.g. spark-a",
        )
    return value


def _interface_name(value: str) -> str:
    if not _IFNAME.match(value):
        raise invalid(
            f"{value!r} is not a Linux interface name",
            "use the name `ip link` shows: at most 15 of letters, digits, '_', '.', '-', e.g. enp1s0f1np1",
        )
    return value


def _host_address(value: str) -> str:
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    labels = value.split(".")
    if all(x.isdigit() for x in labels):
        raise invalid(
            f"{value!r} is not an IP address",
            "an IPv4 address is four numbers from 0 to 255, e.g. 10.0.0.11; a DNS name ends in a name, not a number",
        )
    if (
        not value
        or len(value) > 253
        or not all(re.match(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$", x) for x in labels)
        or labels[-1].isdigit()
    ):
        raise invalid(
            f"{value!r} is neither an IP address nor a DNS name",
            "use the management address or host name the laptop reaches over SSH, e.g. 10.0.0.11 or spark-a.lan",
        )
    return value


def _git_revision(value: str) -> str:
    # git-check-ref-format(1): no "..", no component starting with "." or ending with ".lock"; a commit is 40 hex
    if not _REVISION.match(value) or ".." in value or "/." in value or value.endswith((".lock", "/")):
        raise invalid(
            f"{value!r} is not a branch, tag or commit",
            "use a name like main, v1.0 or refs/pr/1, or a 40-hex commit: letters, digits, . _ - /",
        )
    return value


def _model_name(value: str) -> str:
    if not _MODEL.match(value):
        raise invalid(
            f"{value!r} is not a model id or path",
            "use a Hugging Face id like Qwen/Qwen3-8B or a directory on the hosts: no spaces, quotes or $`;|&",
        )
    return value


def _single_line(value: str) -> str:
    if "\n" in value or "\0" in value or "\r" in value:
        raise invalid("must be a single line", "remove the line breaks (use a list for several values)")
    return value


def _image_name(value: str) -> str:
    if not _IMAGE.match(value):
        raise invalid(f"{value!r} is not a container image reference", "e.g. nvcr.io/nvidia/vllm:26.05-py3")
    return value


def _abs_path(value: str) -> str:
    if not value.startswith("/") or not re.match(r"^[A-Za-z0-9_./+-]+$", value):
        raise invalid(
            f"{value!r} must be an absolute path of plain characters", "e.g. /opt/sparkctl-runtime (no spaces)"
        )
    return value


def _env_name(value: str) -> str:
    # The value is not echoed: a key pasted where the variable's name belongs is a secret.
    if not _ENV_KEY.match(value):
        raise invalid(
            "is not an environment variable name",
            "name the variable that holds the secret (letters, digits, '_'), e.g. VLLM_API_KEY; "
            "never put the secret itself in the file",
        )
    return value


def _env_key(value: str) -> str:
    if not _ENV_KEY.match(value):
        raise invalid(
            f"{value!r} is not an environment variable name",
            "use letters, digits and '_', not starting with a digit, e.g. NCCL_DEBUG",
        )
    return value


PlainName = Annotated[str, AfterValidator(_plain_name)]
InterfaceName = Annotated[str, AfterValidator(_interface_name)]
HostAddress = Annotated[str, AfterValidator(_host_address)]
ModelName = Annotated[str, AfterValidator(_model_name)]
GitRevision = Annotated[str, AfterValidator(_git_revision)]
SingleLine = Annotated[str, AfterValidator(_single_line)]
AbsPath = Annotated[str, AfterValidator(_abs_path)]
EnvName = Annotated[str, AfterValidator(_env_name)]
EnvKey = Annotated[str, AfterValidator(_env_key)]
FilePath = Annotated[str, AfterValidator(_single_line)]


def _ulimit(value: str) -> str:
    """A docker `--ulimit` value: name=soft[:hard] (-1 for unlimited), or podman's `host`."""
    if value != "host" and not re.fullmatch(r"[a-z]+=-?\d+(:-?\d+)?", value):
        raise ValueError(f"{value!r} is not a ulimit (name=soft[:hard], e.g. memlock=-1, or host)")
    return value


Port = Annotated[int, Field(ge=1, le=65535)]


class _Model(BaseModel):
    # strict: YAML's `yes` is not a number and 3 is not a name; finite: `.inf` is no timeout.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class SshSettings(_Model):
    """How the laptop reaches the hosts. Unset values come from ~/.ssh/config, then OpenSSH defaults."""

    user: PlainName | None = Field(None, description="Login user; default from ~/.ssh/config or the local user.")
    port: Port | None = Field(None, description="SSH port; default from ~/.ssh/config or 22.")
    identity_file: FilePath | None = Field(
        None, description="Private key file; ssh-agent and ~/.ssh/config keys are used too."
    )
    known_hosts: FilePath = Field("~/.ssh/known_hosts", description="known_hosts file host keys are checked against.")
    host_key_policy: Literal["reject", "accept_new"] = Field(
        "reject", description="Unknown host keys: 'reject' (default) or 'accept_new' (record them on first use)."
    )
    connect_timeout: float = Field(10, gt=0, le=3600, description="Seconds to wait for a connection.")
    command_timeout: float = Field(120, gt=0, le=86400, description="Seconds any one command may take.")


class SshOverride(_Model):
    """Per-host overrides of the cluster's SSH settings."""

    user: PlainName | None = Field(None, description="Login user on this host.")
    port: Port | None = Field(None, description="SSH port of this host.")
    identity_file: FilePath | None = Field(None, description="Private key file for this host.")


class SudoSettings(_Model):
    """Where the sudo password comes from when a host needs one (never from the inventory itself)."""

    password_env: EnvName = Field(
        "SPARKCTL_SUDO_PASSWORD", description="Environment variable holding the sudo password."
    )
    password_file: FilePath | None = Field(
        None, description="File holding the sudo password (first line); refused if others can read it."
    )


class FabricInterface(_Model):
    """One ConnectX-7 twin netdev and the static address sparkctl gives it."""

    interface: InterfaceName = Field(description="Netdev name, e.g. enp1s0f1np1.")
    address: ipaddress.IPv4Interface = Field(
        strict=False, description="IPv4 address with prefix, e.g. 192.168.100.10/24."
    )
    rdma_device: InterfaceName | None = Field(None, description="RDMA device of this netdev, e.g. rocep1s0f1.")


class Host(_Model):
    """One Spark."""

    name: PlainName = Field(description="Short name used in output and on the command line.")
    address: HostAddress = Field(description="Management address the laptop reaches over SSH.")
    ssh: SshOverride = Field(default_factory=SshOverride, description="Overrides of the cluster SSH settings.")
    fabric: list[FabricInterface] = Field(min_length=1, description="Fabric twins, in link order.")
    gpus: int = Field(1, ge=0, description="GPUs on this host (one GB10 per Spark).")


class Network(_Model):
    """Fabric link settings shared by all twins."""

    mtu: int = Field(9000, ge=1280, le=9216, description="MTU on every twin.")
    topology: Literal["direct", "ring", "switch"] = Field(
        "direct",
        description="'direct': two hosts joined by one cable; 'ring': three hosts, each cabled to the next "
        "(Port0 to the next host's Port1); 'switch': two or more hosts, each cabled to one switch.",
    )
    checkpoint_timeout: int = Field(
        120,
        ge=10,
        le=3600,
        description="Seconds after which NetworkManager on a host undoes a fabric change by itself unless the run "
        "has committed it (after the jumbo-frame checks); covers a change that cuts the host off.",
    )
    open_ports: list[Port] = Field(
        default_factory=list,
        description="TCP ports of your own services that the sparkctl firewall lets in on every interface, e.g. a "
        "service in the ephemeral range 32768-60999, which it otherwise drops except over the fabric and loopback.",
    )


class RayPorts(_Model):
    """Ray's ports, pinned so that every listener is known (and can be kept off the management network)."""

    node_manager: Port = 6381
    object_manager: Port = 6382
    dashboard: Port = 8265
    dashboard_agent_listen: Port = 52365
    dashboard_agent_grpc: Port = 52366
    runtime_env_agent: Port = 52367
    metrics_export: Port = 52368
    client_server: Port = 10001
    min_worker: Port = 10100
    max_worker: Port = 10199


class RaySettings(_Model):
    """The Ray cluster sparkctl forms over the fabric."""

    head: PlainName | None = Field(None, description="Host running the Ray head; default the first host.")
    port: Port = Field(6379, description="GCS port on the head's fabric address.")
    ports: RayPorts = Field(default_factory=RayPorts, description="Other Ray ports, pinned.")
    dashboard: bool = Field(True, description="Run the dashboard on 127.0.0.1 (reach it with `sparkctl dashboard`).")
    form: Literal["when-needed", "always"] = Field(
        "when-needed",
        description="'when-needed': Ray runs only when a workload needs it (the embed worker, vLLM's Ray executor) "
        "or when there is no workload; 'always': formed on every `up`, for your own Ray jobs.",
    )


class Runtime(_Model):
    """Where Ray and the workers run on every host: a venv, or a container image."""

    venv: AbsPath | None = Field(
        None, description="Python venv present on every host (vllm and torch; Ray when a workload needs it)."
    )
    image: Annotated[str, AfterValidator(_image_name)] | None = Field(
        None,
        description="Container image (e.g. nvcr.io/nvidia/vllm:26.05-py3) run with docker on every host; needed on "
        "one host only: `up` copies it to the others over the fabric.",
    )
    hf_cache: FilePath = Field(
        "~/.cache/huggingface", description="Hugging Face cache on the hosts (mounted in containers)."
    )
    shm_size_gb: int = Field(64, ge=1, description="Container shared memory size in GiB.")
    ulimits: list[Annotated[str, AfterValidator(_ulimit)]] = Field(
        default_factory=lambda: ["memlock=-1", "stack=67108864"],
        description="`--ulimit` values of the Ray container (NVIDIA's run: memlock=-1, stack=67108864).",
    )
    devices: list[AbsPath] = Field(
        default_factory=lambda: ["/dev/infiniband"], description="`--device` paths handed to the Ray container."
    )
    add_ray: Annotated[str, Field(pattern=r"^\d+\.\d+\.\d+$")] | None = Field(
        None,
        description="image only: a Ray version (e.g. 2.60.0) sparkctl adds to an image that has none, for the "
        "workloads that need Ray: an image derived on each host FROM `image` with `pip install "
        "'ray[default]==<version>'` (tagged localhost/sparkctl/<name>:<tag>-ray<version>, built once per base image).",
    )
    ray_wheels: AbsPath | None = Field(
        None,
        description="with add_ray: a directory on every host holding the Ray wheel (and any dependency the image "
        "lacks); the build installs from it with --no-index instead of from the package index.",
    )

    nccl: Literal["bundled", "system"] = Field(
        "bundled",
        description="venv only: 'system' makes vLLM's own collectives (its pynccl communicator) load DGX OS's "
        "/usr/lib/aarch64-linux-gnu/libnccl.so.2 instead of the runtime's nvidia-nccl wheel (VLLM_NCCL_SO_PATH in "
        "every vLLM workload of several ranks); torch's own NCCL process group keeps the wheel's. See "
        "docs/workers.md, 'Which NCCL the workloads load'.",
    )

    @property
    def ray_image(self) -> str:
        """The image the Ray container runs: `image`, or with `add_ray` the image sparkctl derives from it with Ray
        added (plan/images.py): localhost/sparkctl/<last name component>:<tag>-ray<version>, a digest reference's
        tag being digest-<12 hex>."""
        image = self.image or ""
        if not self.add_ray:
            return image
        name = image.rsplit("/", 1)[-1]
        if "@" in name:
            repo, digest = name.split("@", 1)
            tag = "digest-" + digest.rsplit(":", 1)[-1][:12]
        elif ":" in name:
            repo, tag = name.rsplit(":", 1)
        else:
            repo, tag = name, "latest"
        return f"localhost/sparkctl/{repo}:{tag}-ray{self.add_ray}"

    @model_validator(mode="after")
    def _one_kind(self) -> Runtime:
        if self.venv is not None and (self.add_ray or self.ray_wheels):
            raise invalid("add_ray and ray_wheels are for an image", "install Ray into the venv, or remove them")
        if self.image is not None and self.nccl == "system":
            raise invalid(
                "nccl: system is for a venv: the host's libnccl.so.2 is not inside the container",
                "remove runtime.nccl, or use an image whose NCCL is the one you want (doctor rule nccl-two-builds "
                "shows both)",
            )
        if self.ray_wheels and not self.add_ray:
            raise invalid("ray_wheels is read only with add_ray", "set add_ray: <Ray version>, or remove ray_wheels")
        if (self.venv is None) == (self.image is None):
            raise invalid(
                "set exactly one of 'venv' or 'image'",
                "keep exactly one: venv (a Python venv on every host) or image (a container image run with docker)",
            )
        return self


class Workload(_Model):
    """A model served across the cluster."""

    name: PlainName = Field(description="Workload name (used in commands, logs, status).")
    engine: Literal["vllm", "embed"] = Field(description="'vllm', or 'embed' (sparkctl's built-in TP embedder).")
    model: ModelName = Field("all-MiniLM-L6-v2", description="Model id or a model directory on the hosts.")
    hosts: Annotated[list[PlainName], Field(min_length=1)] | None = Field(
        None,
        description="Hosts the workload runs on, its head first (the endpoint is there); default every host, the "
        "Ray head first.",
    )
    tensor_parallel_size: int = Field(2, ge=1, description="Ranks the model is split across.")
    pipeline_parallel_size: int = Field(
        1, ge=1, description="vllm only: pipeline stages (vLLM's --pipeline-parallel-size); TP x PP ranks in all."
    )
    replicas: int = Field(1, ge=1, description="embed only: independent full copies, one per host.")
    executor: Literal["ray", "mp"] = Field(
        "mp",
        description="vllm with ranks on several Sparks: 'mp' (the default: vLLM's multiprocessing executor, one "
        "`vllm serve` per Spark with --nnodes/--node-rank/--master-addr, --headless on all but the head; no Ray "
        "needed) or 'ray' (vLLM's Ray executor over sparkctl's Ray cluster). docs/workers.md says why.",
    )
    gpu_memory_utilization: float = Field(
        0.85, gt=0, le=0.90, description="Share of unified memory vLLM may take (SM121: 0.90 at most)."
    )
    port: Port = Field(8000, description="API port on the head host.")
    bind: Literal["fabric", "management", "loopback"] = Field(
        "management", description="Where the API listens on the head: its management, fabric or loopback address."
    )
    api_key_env: EnvName | None = Field(
        None, description="Laptop env var holding the API key; default a generated key stored 0600 on the laptop."
    )
    extra_args: list[SingleLine] = Field(default_factory=list, description="Extra engine arguments, verbatim.")
    env: dict[EnvKey, SingleLine] = Field(default_factory=dict, description="Extra environment for the workers.")
    revision: GitRevision | None = Field(
        None,
        description="vllm with a Hugging Face id: the branch, tag or commit to serve (vLLM's --revision); default "
        "the repository's main branch.",
    )
    sync_weights: bool = Field(
        True,
        description="vllm with a Hugging Face id: `up` downloads the model once, on one host of the group, and "
        "copies it to the others over the fabric (docs/workers.md); the workload then runs with HF_HUB_OFFLINE=1. "
        "false leaves the weights to each host.",
    )
    hf_token_env: EnvName | None = Field(
        None, description="Laptop env var holding a Hugging Face token (gated models); reaches the host on stdin."
    )
    ready_timeout: float = Field(1800, gt=0, le=86400, description="Seconds to wait for the endpoint to answer.")

    @property
    def ranks(self) -> int:
        """Ranks of the workload, one device each: the one definition of the rank layout (vLLM: tensor x pipeline
        parallel; embed: tensor parallel x replicas)."""
        if self.engine == "embed":
            return self.tensor_parallel_size * self.replicas
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def master_port(self) -> int:
        """Where vLLM's multiprocessing executor's ranks meet: `--master-port` in extra_args, else vLLM's default
        29501 (ParallelConfig.master_port, vllm/config/parallel.py, vLLM 0.32.0)."""
        args = list(self.extra_args)
        for i, a in enumerate(args):
            if a == "--master-port" and i + 1 < len(args) and args[i + 1].isdigit():
                return int(args[i + 1])
            if a.startswith("--master-port=") and a[len("--master-port=") :].isdigit():
                return int(a[len("--master-port=") :])
        return 29501


class Inventory(_Model):
    """A cluster of Sparks."""

    cluster: PlainName = Field(description="Cluster name.")
    ssh: SshSettings = Field(default_factory=SshSettings, description="How the laptop reaches the hosts.")
    sudo: SudoSettings = Field(default_factory=SudoSettings, description="Where a sudo password comes from.")
    network: Network = Field(default_factory=Network, description="Fabric link settings.")
    hosts: list[Host] = Field(min_length=1, description="The Sparks, each with its fabric twins.")
    runtime: Runtime = Field(
        default_factory=lambda: Runtime(venv="/opt/sparkctl-runtime"),
        description="Where Ray and the workers run: set exactly one of 'venv' or 'image'.",
    )
    ray: RaySettings = Field(default_factory=RaySettings, description="The Ray cluster over the fabric.")
    workloads: list[Workload] = Field(default_factory=list, description="Models served across the cluster.")

    def host(self, name: str) -> Host:
        """The host called `name`."""
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    @property
    def head(self) -> Host:
        """The host running the Ray head."""
        return self.host(self.ray.head) if self.ray.head else self.hosts[0]

    def group(self, w: Workload) -> list[Host]:
        """The hosts `w` runs on, its head first: `w.hosts` as listed, else every host with the Ray head first."""
        if w.hosts is not None:
            return [self.host(n) for n in w.hosts]
        return [self.head, *(h for h in self.hosts if h.name != self.head.name)]

    def synced_weights(self) -> list[Workload]:
        """The vllm workloads whose weights `up` fetches once and copies over the fabric: a Hugging Face id (not a
        path on the hosts) with sync_weights on."""
        return [
            w
            for w in self.workloads
            if w.engine == "vllm" and w.sync_weights and not w.model.startswith(("/", "~", "."))
        ]

    def workload_head(self, w: Workload) -> Host:
        """The host where `w`'s driver and endpoint run: the first host of its group."""
        return self.group(w)[0]

    def workload(self, name: str) -> Workload:
        """The workload called `name`."""
        for w in self.workloads:
            if w.name == name:
                return w
        raise KeyError(name)
