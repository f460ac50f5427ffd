"""Files of the testbed: shared keys and tools, and each host's seeded /etc, /home and sim state.

Everything is written before a host boots: once /etc and /home are mounted as overlays inside the
host, their upper layers are only changed from inside the host (Testbed.exec).
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

from ._proc import run
from .layout import (
    DEFAULT_DRIVER_VERSION,
    DEFAULT_GPU_TEMPERATURE,
    GID_TABLE_SIZE,
    LOGIN_USER,
    MGMT_IFNAME,
    RING_TWINS,
    SIM_MOUNTPOINT,
    SUDO_PASSWORD,
    TWINS,
    HostSpec,
    Twin,
)

PACKAGE_DIR = Path(__file__).resolve().parent
SIM_TOOLS = ("nvidia-smi", "ibdev2netdev", "show_gids")
RUNTIME_SIM_TOOLS = ("vllm",)
"""Shown on top of the runtime venv's bin/ inside the hosts (there is no GPU for the real ones)."""
HOST_KEY = "ssh_host_ed25519_key"
SIM_HEADER = "SIMULATED by the sparkctl testbed (tests/testbed); not real hardware state.\n"


# --- shared files -------------------------------------------------------------------------------


def install_support_files(root: Path) -> None:
    """Copy the init/reset scripts, GID updater and SIMULATED tools into the state dir."""
    libexec, simbin, runtime_simbin = root / "libexec", root / "sim-bin", root / "runtime-sim-bin"
    for d in (libexec, simbin, runtime_simbin):
        d.mkdir(mode=0o755, parents=True, exist_ok=True)
    for script in ("boot.sh", "reset_host.sh"):
        shutil.copyfile(PACKAGE_DIR / script, libexec / script)
    shutil.copyfile(PACKAGE_DIR / "sim" / "gid_updater.py", libexec / "gid_updater.py")
    for tool in SIM_TOOLS:
        shutil.copyfile(PACKAGE_DIR / "sim" / tool, simbin / tool)
        (simbin / tool).chmod(0o755)
    for tool in RUNTIME_SIM_TOOLS:
        shutil.copyfile(PACKAGE_DIR / "sim" / tool, runtime_simbin / tool)
        (runtime_simbin / tool).chmod(0o755)
    # not simulated: the real container engine (podman) under the name sparkctl calls, first on the hosts' PATH
    shutil.copyfile(PACKAGE_DIR / "docker", simbin / "docker")
    (simbin / "docker").chmod(0o755)
    for d in (simbin, runtime_simbin):
        (d / "README.SIMULATED").write_text(SIM_HEADER)


def write_client_key(ssh_dir: Path) -> Path:
    """The laptop's key pair; its public half is authorized on every host."""
    ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ssh_dir / "id_ed25519"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "sparkctl-testbed", "-f", str(key)])
    return key


def render_known_hosts(entries: Sequence[tuple[str, str]]) -> str:
    """known_hosts lines from (address, "ssh-ed25519 AAAA... comment") pairs."""
    lines = []
    for address, pubkey in entries:
        kind, blob = pubkey.split()[:2]
        lines.append(f"{address} {kind} {blob}\n")
    return "".join(lines)


# --- pure renderers of per-host files -----------------------------------------------------------


def render_networkmanager_conf() -> str:
    # keyfile only, like DGX OS; hostname-mode=none or NM renames the host; the management NIC is
    # configured statically by the testbed and must stay out of NetworkManager's hands.
    return (
        "# sparkctl testbed host: stock behaviour except the lines below.\n"
        "[main]\n"
        "plugins=keyfile\n"
        "hostname-mode=none\n"
        "\n"
        "[keyfile]\n"
        f"unmanaged-devices=interface-name:{MGMT_IFNAME}\n"
    )


def render_udev_twin_rule() -> str:
    # 85-nm-unmanaged.rules marks every veth unmanaged; the twins stand in for ConnectX ports, which
    # NetworkManager manages, also after a restart of NetworkManager.
    names = "|".join(dict.fromkeys(t.interface for t in (*TWINS, *RING_TWINS)))
    return (
        "# sparkctl testbed: the fabric twins are real NICs on a DGX Spark, so NM manages them.\n"
        f'SUBSYSTEM=="net", ACTION!="remove", KERNEL=="{names}", ENV{{NM_UNMANAGED}}="0"\n'
    )


def render_sshd_config(spec: HostSpec) -> str:
    return (
        "# sparkctl testbed host: every address (no ListenAddress, as DGX OS's stock sshd_config), public keys only.\n"
        "Port 22\n"
        f"HostKey /etc/ssh/{HOST_KEY}\n"
        "PubkeyAuthentication yes\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "PermitRootLogin no\n"
        "UsePAM yes\n"
        "AuthorizedKeysFile .ssh/authorized_keys\n"
        "PidFile /run/sshd.pid\n"
        "AcceptEnv LANG LC_*\n"
        "Subsystem sftp /usr/lib/openssh/sftp-server\n"
    )


def render_hosts(spec: HostSpec) -> str:
    return (
        "127.0.0.1\tlocalhost\n"
        f"127.0.1.1\t{spec.name}\n"
        "::1\t\tlocalhost ip6-localhost ip6-loopback\n"
        "ff02::1\t\tip6-allnodes\n"
        "ff02::2\t\tip6-allrouters\n"
    )


def render_sudoers(spec: HostSpec) -> str:
    rule = "NOPASSWD: ALL" if spec.sudo_nopasswd else "ALL"
    # the container engine without a password, as a `docker` group member reaches Docker on DGX OS
    engine = f"{LOGIN_USER} ALL=(root) NOPASSWD:SETENV: /usr/bin/podman\n"
    return f"# sparkctl testbed\n{LOGIN_USER} ALL=(ALL:ALL) {rule}\n{engine}"


IMAGE_STORE = Path("/var/lib/sparkctl-testbed-images")
"""Read-only image store shared by the hosts (filled by tests/prepare.sh: the runtime image, built locally)."""
TESTBED_IMAGE = "localhost/sparkctl-runtime:test"


def render_containers_conf(volumes: Sequence[str] = ()) -> str:
    """podman settings this machine needs (docs/testbed.md, "A real container engine"): it is itself a container
    (cgroup v1/hybrid, no CAP_SYS_RESOURCE), so runc with cgroupfs, and no default rlimits to raise.

    `volumes` are mounted into every container the host starts ([containers] `volumes`,
    "<directory-on-host>:<directory-in-container>:<options>": /usr/share/containers/containers.conf of Debian's
    golang-github-containers-common 0.50.1, the library podman 4.3 reads it with). Testbed.use_vllm("simulated")
    lays the SIMULATED vllm over the image's this way, as it overlays the venv's on the host."""
    listed = ", ".join(json.dumps(v) for v in volumes)
    return (
        "# sparkctl testbed: podman inside a fake Spark\n"
        f"[containers]\ndefault_ulimits = []\nvolumes = [{listed}]\n\n"
        '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
    )


def render_storage_conf(hostdir: Path) -> str:
    """Each host its own containers (names, state) under its directory; images from the shared store."""
    return (
        "# sparkctl testbed: this host's container storage\n"
        '[storage]\ndriver = "overlay"\n'
        f'graphroot = "{hostdir}/containers"\nrunroot = "/run/containers/storage"\n\n'
        f'[storage.options]\nadditionalimagestores = ["{IMAGE_STORE}"]\n'
    )


def render_devices_json(twins: tuple[Twin, ...] = TWINS) -> str:
    devices = [{"rdma_device": t.rdma_device, "netdev": t.interface} for t in twins]
    return json.dumps({"devices": devices, "table_size": GID_TABLE_SIZE}, indent=2) + "\n"


# --- per-host tree ------------------------------------------------------------------------------


def _mkdirs_like(upper: Path, lower: Path, rel: str) -> Path:
    """Create upper/rel with the mode and owner of lower/rel (a merged dir shows the upper's)."""
    path_u, path_l = upper, lower
    for part in Path(rel).parts:
        path_u, path_l = path_u / part, path_l / part
        if not path_u.exists():
            path_u.mkdir()
            try:
                st = path_l.stat()
                os.chown(path_u, st.st_uid, st.st_gid)
                path_u.chmod(st.st_mode & 0o7777)
            except FileNotFoundError:
                path_u.chmod(0o755)
    return path_u


def _write(path: Path, text: str, mode: int = 0o644, owner: str | None = None) -> None:
    path.write_text(text)
    path.chmod(mode)
    if owner:
        pw = pwd.getpwnam(owner)
        os.chown(path, pw.pw_uid, pw.pw_gid)


def _hash_password(password: str) -> str:
    salt = secrets.token_hex(8)
    return run(["openssl", "passwd", "-6", "-salt", salt, "-stdin"], input=password).stdout.strip()


def _seed_shadow(etc_up: Path, password: str) -> None:
    """Give the login user a known password in this host's /etc/shadow (upper layer)."""
    lines = Path("/etc/shadow").read_text().splitlines(keepends=True)
    hashed = _hash_password(password)
    out = []
    for line in lines:
        fields = line.split(":")
        if fields[0] == LOGIN_USER:
            fields[1] = hashed
            line = ":".join(fields)
        out.append(line)
    target = etc_up / "shadow"
    target.write_text("".join(out))
    st = os.stat("/etc/shadow")
    os.chown(target, st.st_uid, st.st_gid)
    target.chmod(st.st_mode & 0o7777)


def _seed_etc(spec: HostSpec, etc_up: Path) -> None:
    lower = Path("/etc")
    _write(etc_up / "hostname", f"{spec.name}\n")
    _write(etc_up / "hosts", render_hosts(spec))
    _write(etc_up / "machine-id", uuid.uuid4().hex + "\n", mode=0o444)

    nm = _mkdirs_like(etc_up, lower, "NetworkManager")
    _write(nm / "NetworkManager.conf", render_networkmanager_conf())
    _mkdirs_like(etc_up, lower, "NetworkManager/system-connections").chmod(0o700)

    rules = _mkdirs_like(etc_up, lower, "udev/rules.d")
    _write(rules / "86-testbed-twins.rules", render_udev_twin_rule())

    ssh = _mkdirs_like(etc_up, lower, "ssh")
    run(
        [
            "ssh-keygen",
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            f"root@{spec.name}",
            "-f",
            str(ssh / HOST_KEY),
        ]
    )
    _write(ssh / "sshd_config", render_sshd_config(spec))

    sudoers = _mkdirs_like(etc_up, lower, "sudoers.d")
    _write(sudoers / "spark-testbed", render_sudoers(spec), mode=0o440)

    containers = etc_up / "containers"
    containers.mkdir(mode=0o755, exist_ok=True)
    _write(containers / "containers.conf", render_containers_conf())
    _write(containers / "storage.conf", render_storage_conf(etc_up.parent))
    _write(containers / "nodocker", "")  # podman-docker's banner off
    if not spec.sudo_nopasswd:
        _seed_shadow(etc_up, SUDO_PASSWORD)


def _seed_home(home_up: Path, authorized_key: str) -> None:
    home = pwd.getpwnam(LOGIN_USER).pw_dir  # /home/spark
    rel = Path(home).relative_to("/home")
    user_home = _mkdirs_like(home_up, Path("/home"), str(rel))
    ssh = user_home / ".ssh"
    ssh.mkdir(mode=0o700, exist_ok=True)
    pw = pwd.getpwnam(LOGIN_USER)
    os.chown(ssh, pw.pw_uid, pw.pw_gid)
    _write(ssh / "authorized_keys", authorized_key, mode=0o600, owner=LOGIN_USER)


def _seed_sim(spec: HostSpec, hostdir: Path) -> None:
    sim = hostdir / "sim"
    sim.mkdir(mode=0o755)
    _write(sim / "README.SIMULATED", SIM_HEADER)
    _write(sim / "devices.json", render_devices_json(spec.twins))
    _write(sim / "gid_index", f"{spec.gid_index}\n")
    _write(sim / "driver_version", f"{DEFAULT_DRIVER_VERSION}\n")
    _write(sim / "temperature", f"{DEFAULT_GPU_TEMPERATURE}\n")
    classdir = hostdir / "sysclass" / "infiniband"
    classdir.mkdir(parents=True)
    for twin in spec.twins:
        port = sim / "ib" / twin.rdma_device / "ports" / "1"
        for sub in ("gids", "gid_attrs/types", "gid_attrs/ndevs"):
            (port / sub).mkdir(parents=True)
        _write(port / "link_layer", "Ethernet\n")
        netdir = sim / "ib" / twin.rdma_device / "device" / "net"
        netdir.mkdir(parents=True)
        (netdir / twin.interface).symlink_to(f"/sys/class/net/{twin.interface}")
        (classdir / twin.rdma_device).symlink_to(f"{SIM_MOUNTPOINT}/ib/{twin.rdma_device}")


def write_host_tree(spec: HostSpec, hostdir: Path, authorized_key: str) -> str:
    """Create one host's directory; returns the host's public key line."""
    hostdir.mkdir(mode=0o755, parents=True)
    for sub in ("etc-up", "etc-work", "home-up", "home-work", "root-work", "var-lib-nm"):
        (hostdir / sub).mkdir(mode=0o755)
    (hostdir / "root-up").mkdir(mode=0o700)
    (hostdir / "tmp").mkdir()
    (hostdir / "tmp").chmod(0o1777)
    _seed_etc(spec, hostdir / "etc-up")
    _seed_home(hostdir / "home-up", authorized_key)
    _seed_sim(spec, hostdir)
    keep = hostdir / "hostkey-orig"
    keep.mkdir(mode=0o700)
    for name in (HOST_KEY, f"{HOST_KEY}.pub"):
        shutil.copy2(hostdir / "etc-up" / "ssh" / name, keep / name)
    return (keep / f"{HOST_KEY}.pub").read_text().strip()
