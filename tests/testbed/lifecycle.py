"""Booting the hosts: start each namespace init, wait for its daemons, wait for NetworkManager."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ._proc import TestbedError, children_of, clean_env, pid_alive
from .layout import LAPTOP_IP, MGMT_IFNAME, MGMT_PREFIX_LEN, SIM_MOUNTPOINT, TWINS, HostSpec, Twin

Exec = Callable[..., "subprocess.CompletedProcess[str]"]


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def cgroup_mounts(mountinfo: str = "/proc/self/mountinfo") -> str:
    """This machine's cgroup hierarchies as `dir=fstype:options` words, for boot.sh to mount again: `ip netns exec`
    mounts a fresh /sys for the netns, without them, and the container runtime (runc) needs them."""
    words = []
    for line in Path(mountinfo).read_text().splitlines():
        fields, _, tail = line.partition(" - ")
        point = fields.split()[4]
        fstype, _, options = tail.split()[:3]
        if fstype in ("cgroup", "cgroup2") and (point + "/").startswith("/sys/fs/cgroup/"):
            opts = ",".join(o for o in options.split(",") if o not in ("rw", "ro")) or "none"
            if opts.startswith("name="):
                opts = "none," + opts
            words.append(f"{point.removeprefix('/sys/fs/cgroup').strip('/') or '.'}={fstype}:{opts}")
    return " ".join(words)


def spawn_host(root: Path, spec: HostSpec, hostdir: Path, started: Callable[[subprocess.Popen[bytes]], None]) -> int:
    """Start boot.sh as PID 1 of new mount/PID/UTS/IPC namespaces inside the host's netns.

    `started` gets the Popen (the `unshare` parent) as soon as it exists, so it can be recorded.
    Returns the init's PID as the machine numbers it (for nsenter and for SIGKILL at teardown).
    """
    env = clean_env(
        TB_NAME=spec.name,
        TB_HOSTDIR=str(hostdir),
        TB_MGMT_IF=MGMT_IFNAME,
        TB_MGMT_CIDR=f"{spec.mgmt_ip}/{MGMT_PREFIX_LEN}",
        TB_GATEWAY=LAPTOP_IP,
        TB_LIBEXEC=str(root / "libexec"),
        TB_SIMBIN=str(root / "sim-bin"),
        TB_SIM_MOUNT=SIM_MOUNTPOINT,
        TB_CGROUPS=cgroup_mounts(),
    )
    argv = [
        *f"ip netns exec {spec.netns} unshare --mount --pid --uts --ipc --fork".split(),
        *["--mount-proc", "--propagation", "private", "/bin/bash", str(root / "libexec" / "boot.sh")],
    ]
    with open(hostdir / "boot.log", "ab") as log:
        # A new session: the hosts outlive the process that brought them up (the CLI's `up`).
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    started(proc)
    deadline = time.monotonic() + 10
    while not (kids := children_of(proc.pid)):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise TestbedError(f"{spec.name}: the namespace init did not start\n{tail(hostdir / 'boot.log')}")
        time.sleep(0.01)
    return kids[0]


def wait_booted(records: Sequence[dict[str, Any]], timeout: float) -> None:
    """Wait until every host's boot.sh reported "booted" (they boot in parallel)."""
    pending = {rec["name"]: rec for rec in records}
    deadline = time.monotonic() + timeout
    while pending:
        for name, rec in list(pending.items()):
            status_file = Path(rec["dir"]) / "status"
            status = status_file.read_text().strip() if status_file.exists() else ""
            if status == "booted":
                del pending[name]
            elif status.startswith("failed") or not pid_alive(rec["init_pid"], rec["init_start"]):
                raise TestbedError(
                    f"{name} failed to boot: {status or 'init exited'}\n{tail(Path(rec['dir']) / 'boot.log')}"
                )
        if pending and time.monotonic() > deadline:
            raise TestbedError(f"hosts {sorted(pending)} did not boot in {timeout:.0f}s")
        time.sleep(0.05)


def settle_host(exec_in: Exec, host: str, hostdir: Path, timeout: float, host_twins: Sequence[Twin] = TWINS) -> None:
    """Mark the twins managed; wait for NM's "Wired connection" profiles and the GID tables."""
    twins = [t.interface for t in host_twins]
    deadline = time.monotonic() + timeout
    managed: set[str] = set()
    while True:
        for twin in twins:
            if twin in managed:
                continue
            # Fails while NetworkManager is still registering on D-Bus; retried.
            if exec_in(host, ["nmcli", "device", "set", twin, "managed", "yes"], check=False).returncode == 0:
                managed.add(twin)
        devices = exec_in(host, ["nmcli", "-t", "-f", "DEVICE,STATE", "device", "status"], check=False).stdout
        states = dict(line.split(":", 1) for line in devices.splitlines() if ":" in line)
        profiles = exec_in(host, ["nmcli", "-t", "-f", "NAME,TYPE", "connection", "show"], check=False).stdout
        wired = [p for p in profiles.splitlines() if p.startswith("Wired connection")]
        gids = all((hostdir / "sim" / "ib" / t.rdma_device / "ports/1/gids/0").exists() for t in host_twins)
        if (
            len(managed) == len(twins)
            and all(states.get(t, "unmanaged") not in ("unmanaged", "unavailable") for t in twins)
            and len(wired) >= len(twins)
            and gids
        ):
            return
        if time.monotonic() > deadline:
            raise TestbedError(
                f"{host}: NetworkManager did not settle in {timeout:.0f}s "
                f"(devices: {states}; profiles: {profiles.splitlines()}; gid tables written: {gids})"
            )
        time.sleep(0.1)
