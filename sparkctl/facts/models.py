"""HostFacts: what one read-only probe learned about a host. Frozen data, built by pure parsers."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field


class _Fact(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Interface(_Fact):
    """A netdev as `ip -j addr` shows it."""

    name: str
    mtu: int
    operstate: str = "UNKNOWN"
    up: bool = False
    ipv4: list[str] = Field(default_factory=list, description="addresses with prefix, e.g. 192.168.100.10/24")


class NmConnection(_Fact):
    """A NetworkManager profile (`nmcli -t connection show` + its settings)."""

    uuid: str
    name: str
    type: str = ""
    device: str = Field("", description="device it is active on, '' if inactive")
    interface_name: str = ""
    autoconnect: bool = True
    ipv4_method: str = ""
    ipv4_addresses: list[str] = Field(default_factory=list)
    ipv4_routes: list[str] = Field(
        default_factory=list, description="static routes as `destination [next-hop] [attr=value]` (ipv4.routes)"
    )
    ipv4_routing_rules: list[str] = Field(default_factory=list, description="nmcli's ipv4.routing-rules")
    ipv6_method: str = ""
    mtu: int | None = Field(None, description="802-3-ethernet.mtu; None means auto")
    filename: str = ""


class NmDevice(_Fact):
    """A device as `nmcli -t device status` shows it."""

    name: str
    type: str
    state: str
    connection: str = ""


class GidEntry(_Fact):
    """One entry of an RDMA port's GID table (sysfs)."""

    device: str
    port: int
    index: int
    gid: str
    type: str = ""
    ndev: str = ""

    @property
    def ipv4(self) -> str | None:
        """The IPv4 address of an IPv4-mapped GID (::ffff:a.b.c.d), else None."""
        groups = self.gid.lower().split(":")
        if len(groups) != 8 or groups[:5] != ["0000"] * 5 or groups[5] != "ffff":
            return None
        raw = groups[6] + groups[7]
        return ".".join(str(int(raw[i : i + 2], 16)) for i in range(0, 8, 2))


class NmCheckpoints(_Fact):
    """NetworkManager checkpoint state: the twins' D-Bus device paths, pending checkpoints, and sparkctl's own."""

    devices: dict[str, str] = Field(default_factory=dict, description="twin interface -> NM device object path")
    listed: list[str] = Field(default_factory=list, description="checkpoints NetworkManager holds now")
    recorded: str = Field("", description="the checkpoint a sparkctl run opened (CHECKPOINT_FILE), '' if none")

    @property
    def pending(self) -> str:
        """sparkctl's checkpoint if NetworkManager still holds it (not yet committed, rolled back or expired)."""
        return self.recorded if self.recorded and self.recorded in self.listed else ""


class TwinLink(_Fact):
    """A twin's negotiated Ethernet speed and the PCIe link of its function, as sysfs shows them."""

    interface: str
    speed_mbps: int | None = Field(None, description="/sys/class/net/<if>/speed; None when unreadable or -1")
    pcie_width: int | None = Field(None, description="device/current_link_width; None without a PCI device")
    pcie_speed: str = Field("", description="device/current_link_speed, e.g. '32.0 GT/s PCIe'")
    pcie_max_width: int | None = None
    pcie_max_speed: str = ""


class Gpu(_Fact):
    """One GPU as nvidia-smi reports it."""

    name: str
    compute_cap: str
    driver: str
    temperature: int | None = None


class Process(_Fact):
    """A process on the host."""

    pid: int
    user: str
    args: str


class Listener(_Fact):
    """A listening TCP socket."""

    address: str
    port: int


class TcpLink(_Fact):
    """An established TCP connection, as `ss -tn` shows it."""

    local: str
    local_port: int
    peer: str
    peer_port: int


class Runtime(_Fact):
    """What the worker runtime (venv or image) holds."""

    python: str = ""
    ray: str = ""
    vllm: str = ""
    torch: str = ""
    nccl: str = ""
    fastsafetensors: str = Field("", description="the optional loader `--load-format fastsafetensors` imports")
    image_id: str = ""
    image_size: int = Field(0, description="bytes, as `docker image inspect` gives .Size")
    ray_image_id: str = Field("", description="runtime.add_ray: the ID of the image derived with Ray, if built")
    ray_image_base: str = Field("", description="runtime.add_ray: the base image ID the derived image is labelled with")
    image_cuda: str = Field(
        "",
        description="the CUDA the image requires of the driver (its NVIDIA_REQUIRE_CUDA `cuda>=` term, else its "
        "CUDA_VERSION's major.minor); empty when it states none or sets NVIDIA_DISABLE_REQUIRE",
    )


class NcclLib(_Fact):
    """A libnccl.so.2 file as the probe read it (not loaded): where it is, what it resolves to, its GNU build id."""

    path: str
    real: str = Field("", description="the path with symlinks resolved, e.g. .../libnccl.so.2.28.9")
    size: int = Field(0, description="bytes")
    build_id: str = Field("", description="hex of its NT_GNU_BUILD_ID note; '' when it has none")

    @property
    def version(self) -> str:
        """The version its resolved file name carries (`libnccl.so.2.28.9` -> 2.28.9; a wheel's plain
        `libnccl.so.2` carries none: '')."""
        m = re.search(r"libnccl\.so\.(\d+\.\d+\.\d+)$", self.real or self.path)
        return m.group(1) if m else ""


class WeightsCopy(_Fact):
    """A model repository in this host's Hugging Face cache, as the probe lists it."""

    files: dict[str, int] = Field(default_factory=dict, description="path in the repo folder -> bytes (regular files)")
    links: dict[str, str] = Field(default_factory=dict, description="path in the repo folder -> symlink target")
    refs: dict[str, str] = Field(default_factory=dict, description="refs/<name> -> commit")
    manifest: str | None = Field(None, description="what sparkctl verified here (JSON), None if nothing")


class HostFacts(_Fact):
    """Everything planning and checks need to know about one host."""

    host: str
    user: str = ""
    home: str = ""
    hostname: str = ""
    sudo_nopasswd: bool = False
    ssh_client_ip: str = ""
    ssh_server_ip: str = ""
    ssh_server_port: int = 22
    ssh_interface: str = Field("", description="interface the SSH session uses (never touched)")
    interfaces: dict[str, Interface] = Field(default_factory=dict)
    nm_running: bool = False
    nm_connections: list[NmConnection] = Field(default_factory=list)
    nm_devices: dict[str, NmDevice] = Field(default_factory=dict)
    nm_checkpoints: NmCheckpoints = Field(default_factory=NmCheckpoints)
    env_file: str | None = Field(None, description="content of the env file sparkctl manages, None if absent")
    non_carry_over: str | None = None
    processes: list[Process] = Field(default_factory=list)
    containers: dict[str, str] = Field(default_factory=dict, description="running sparkctl-* containers: name -> image")
    container_workloads: list[str] = Field(
        default_factory=list, description="container mode: workloads whose recorded process runs in the Ray container"
    )
    listeners: list[Listener] = Field(default_factory=list)
    gcs_links: list[TcpLink] = Field(
        default_factory=list, description="established TCP connections to or from Ray's GCS port (ray.port)"
    )
    meminfo_kb: dict[str, int] = Field(default_factory=dict)
    links: dict[str, TwinLink] = Field(default_factory=dict, description="twin interface -> its link state")
    kernel: str = Field("", description="the running kernel's release (uname -r), e.g. 6.17.0-1032-nvidia")
    kernel_cmdline: str = Field("", description="the kernel command line it was booted with (/proc/cmdline)")
    gids: list[GidEntry] = Field(default_factory=list)
    gpus: list[Gpu] = Field(default_factory=list)
    cuda_version: str = ""
    netplan: dict[str, str] = Field(default_factory=dict, description="netplan files (/lib, /etc, /run) -> content")
    runtime: Runtime = Field(default_factory=Runtime)
    tools: dict[str, str] = Field(default_factory=dict, description="ib_write_bw, all_reduce_perf, mpirun -> path")
    files: dict[str, str] = Field(default_factory=dict, description="sparkctl-owned state files on the host")
    ssh_host_key: str = Field("", description="the host's ed25519 SSH host key: '<type> <base64>'")
    weights: dict[str, WeightsCopy] = Field(
        default_factory=dict, description="synced model repositories: '<repo>@<revision>' -> what this host holds"
    )
    hf_free: int = Field(-1, description="bytes free for the Hugging Face cache (-1: not read)")
    state_free: dict[str, int] = Field(
        default_factory=dict,
        description="bytes free where sparkctl writes on the host: its state directory, and its logs directory "
        "when that is on another filesystem (path -> bytes; empty: not read)",
    )
    machine_id: str = Field("", description="/etc/machine-id: 32 hex digits, unique per installed system")
    nccl_libs: dict[str, NcclLib] = Field(
        default_factory=dict,
        description="libnccl.so.2 by role: 'runtime' (the nvidia-nccl wheel's, in the venv or the image), 'image' "
        "(the image's own system library), 'system' (the host's: DGX OS's libnccl2)",
    )
    peer_authorized: str = Field(
        "", description="the login user's authorized_keys line for the cluster's peer key (sparkctl-peer-<cluster>)"
    )

    def connection(self, name: str) -> NmConnection | None:
        """The NetworkManager profile called `name`, if any."""
        return next((c for c in self.nm_connections if c.name == name), None)

    def processes_matching(self, needle: str) -> list[Process]:
        """Processes whose command line contains `needle`."""
        return [p for p in self.processes if needle in p.args]
