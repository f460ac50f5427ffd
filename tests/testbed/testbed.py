"""The Testbed: N fake DGX Sparks in network/mount/PID/UTS namespaces with real daemons."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from . import lifecycle, network, provision
from ._proc import (
    TestbedError,
    clean_env,
    pid_alive,
    proc_start_time,
    require_root,
    run,
)
from .faults import FaultsMixin
from .inventory import build_inventory, write_inventory
from .layout import (
    DEFAULT_DRIVER_VERSION,
    DEFAULT_GPU_TEMPERATURE,
    LAPTOP_IP,
    LOGIN_USER,
    MGMT_IFNAME,
    MGMT_PREFIX_LEN,
    RUNTIME_VENV,
    SUDO_PASSWORD,
    HostSpec,
    build_host_specs,
    build_wiring,
    default_root,
)

STATE_VERSION = 1
VLLM_KINDS = ("real", "simulated")
BOOT_TIMEOUT = 60.0
SETTLE_TIMEOUT = 60.0


class Testbed(FaultsMixin):
    """Fake Sparks on this machine; every resource it creates is listed in <root>/state.json."""

    __test__ = False

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()
        self._popens: list[subprocess.Popen[bytes]] = []

    # --- state ----------------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    def _load(self) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return None
        return data

    def _state(self) -> dict[str, Any]:
        state = self._load()
        if state is None:
            raise TestbedError(f"no testbed is up (no {self.state_file})\nhint: python -m tests.testbed up")
        return state

    def _save(self, state: dict[str, Any]) -> None:
        tmp = self.state_file.with_name(".state.json.tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.state_file)

    def is_up(self) -> bool:
        return self._load() is not None

    @property
    def hosts(self) -> list[str]:
        """Host names, e.g. ["spark-a", "spark-b"]."""
        return [h["name"] for h in self._state()["hosts"]]

    def spec(self, host: str) -> HostSpec:
        rec = self._host(host)
        topology = str(self._state().get("topology", "direct"))
        return HostSpec(
            name=str(rec["name"]), index=int(rec["index"]), gid_index=int(rec["gid_index"]), topology=topology
        )

    def _host(self, host: str, state: dict[str, Any] | None = None) -> dict[str, Any]:
        state = state or self._state()
        for rec in state["hosts"]:
            if rec["name"] == host:
                found: dict[str, Any] = rec  # the live record: callers update it, then _save()
                return found
        names = [h["name"] for h in state["hosts"]]
        raise TestbedError(f"unknown host {host!r}; the testbed has {names}")

    def hostdir(self, host: str) -> Path:
        return Path(self._host(host)["dir"])

    @property
    def identity_file(self) -> Path:
        """Private key authorized for the login user on every host."""
        return self.root / "ssh" / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        """known_hosts with every host's key for its management address."""
        return self.root / "ssh" / "known_hosts"

    @property
    def sudo_password(self) -> str:
        """Password sudo asks for on every host but the first (pass as SPARKCTL_SUDO_PASSWORD)."""
        return SUDO_PASSWORD

    def sudo_password_for(self, host: str) -> str | None:
        """None where sudo needs no password (the first host)."""
        return None if self.spec(host).sudo_nopasswd else SUDO_PASSWORD

    def mgmt_ip(self, host: str) -> str:
        return self.spec(host).mgmt_ip

    @property
    def timings(self) -> dict[str, float]:
        """Seconds taken by the last up() and its phases."""
        return dict(self._state().get("timings", {}))

    # --- up -------------------------------------------------------------------------------------

    def up(self, hosts: int = 2, gid_index: Mapping[str, int] | None = None, topology: str | None = None) -> None:
        """Create `hosts` fresh Sparks; gid_index maps host name -> RoCE v2 IPv4 GID index; topology: direct
        (2 hosts, the default for 2), switch (the default for more) or ring (3 hosts, four interfaces each)."""
        require_root()
        specs = build_host_specs(hosts, gid_index, topology)
        if self.is_up():
            raise TestbedError(
                f"a testbed is already up ({self.state_file})\nhint: python -m tests.testbed down (or Testbed().down())"
            )
        if self.root.exists() and any(self.root.iterdir()):
            raise TestbedError(
                f"{self.root} exists but holds no state.json, so nothing in it can be attributed "
                f"to a testbed\nhint: inspect and remove it, or set SPARKCTL_TESTBED_DIR"
            )
        t0 = time.monotonic()
        self.root.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.root.chmod(0o755)
        wiring = build_wiring(len(specs), specs[0].topology)
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "root": str(self.root),
            "created_at": time.time(),
            "topology": wiring.topology,
            "links": [],
            "netns": [],
            "paths": [],
            "hosts": [],
            "ports": [],
            "parked": [],
            "timings": {},
        }
        self._save(state)
        try:
            self._provision(state, specs)
            t1 = time.monotonic()
            self._wire(state, specs)
            t2 = time.monotonic()
            for spec in specs:
                self._spawn_host(state, spec)
            self._wait_booted(state)
            t3 = time.monotonic()
            self._parallel(self._settle_host, [s.name for s in specs])
            t4 = time.monotonic()
        except BaseException:
            with contextlib.suppress(Exception):
                self.down()
            raise
        state["timings"] = {
            "files": round(t1 - t0, 2),
            "network": round(t2 - t1, 2),
            "boot": round(t3 - t2, 2),
            "settle": round(t4 - t3, 2),
            "total": round(t4 - t0, 2),
        }
        self._save(state)
        self.inventory_path()

    def _provision(self, state: dict[str, Any], specs: Sequence[HostSpec]) -> None:
        _ensure_login_user()
        for sub in ("libexec", "sim-bin", "runtime-sim-bin", "ssh", "hosts", "inventory.yaml"):
            state["paths"].append(str(self.root / sub))
        self._save(state)
        provision.install_support_files(self.root)
        key = provision.write_client_key(self.root / "ssh")
        authorized = Path(f"{key}.pub").read_text()
        entries = []
        for spec in specs:
            hostdir = self.root / "hosts" / spec.name
            state["hosts"].append(
                {
                    "name": spec.name,
                    "index": spec.index,
                    "gid_index": spec.gid_index,
                    "netns": spec.netns,
                    "mgmt_ip": spec.mgmt_ip,
                    "dir": str(hostdir),
                    "unshare_pid": None,
                    "init_pid": None,
                    "init_start": None,
                }
            )
            self._save(state)
            entries.append((spec.mgmt_ip, provision.write_host_tree(spec, hostdir, authorized)))
        self.known_hosts.write_text(provision.render_known_hosts(entries))
        self.known_hosts.chmod(0o644)

    def _wire(self, state: dict[str, Any], specs: Sequence[HostSpec]) -> None:
        def record(kind: str, name: str) -> None:
            state["links" if kind == "link" else "netns"].append(name)
            self._save(state)

        network.wire_hosts(specs, record)

    def _spawn_host(self, state: dict[str, Any], spec: HostSpec) -> None:
        rec = self._host(spec.name, state)

        def started(proc: subprocess.Popen[bytes]) -> None:
            self._popens.append(proc)
            rec["unshare_pid"] = proc.pid
            rec["unshare_start"] = proc_start_time(proc.pid)
            self._save(state)

        init_pid = lifecycle.spawn_host(self.root, spec, Path(rec["dir"]), started)
        rec["init_pid"] = init_pid
        rec["init_start"] = proc_start_time(init_pid)
        self._save(state)

    def _wait_booted(self, state: dict[str, Any]) -> None:
        lifecycle.wait_booted(state["hosts"], BOOT_TIMEOUT)

    def _settle_host(self, host: str) -> None:
        lifecycle.settle_host(self.exec, host, self.hostdir(host), SETTLE_TIMEOUT, self.spec(host).twins)

    @staticmethod
    def _parallel(fn: Callable[[str], None], hosts: Sequence[str]) -> None:
        with ThreadPoolExecutor(max_workers=max(1, len(hosts))) as pool:
            for future in [pool.submit(fn, h) for h in hosts]:
                future.result()

    # --- down -----------------------------------------------------------------------------------

    def down(self) -> None:
        """Remove everything the state file lists; safe to call twice or after a crashed run."""
        state = self._load()
        if state is None:
            self._reap_popens(timeout=5)
            return
        require_root()
        for rec in state["hosts"]:
            pid = rec.get("init_pid")
            if pid and pid_alive(pid, rec.get("init_start")):
                # The PID-namespace init ignores SIGTERM from outside; SIGKILL takes the host down.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 15
        for rec in state["hosts"]:
            pid = rec.get("init_pid")
            while pid and pid_alive(pid, rec.get("init_start")) and time.monotonic() < deadline:
                time.sleep(0.02)
            upid = rec.get("unshare_pid")
            while upid and pid_alive(upid, rec.get("unshare_start")) and time.monotonic() < deadline:
                time.sleep(0.02)
        self._reap_popens(timeout=5)
        for ns in state["netns"]:
            if Path("/run/netns", ns).exists():
                run(["ip", "netns", "del", ns], check=False)
        for link in reversed(state["links"]):
            if Path("/sys/class/net", link).exists():
                run(["ip", "link", "del", link], check=False)
        for path in state["paths"]:
            _remove(Path(path))
        for rec in state["hosts"]:
            _remove(Path(rec["dir"]))
        self.state_file.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.root.rmdir()

    def _reap_popens(self, timeout: float = 0) -> None:
        """Collect exit statuses of our own children (the hosts' unshare, port listeners)."""
        for proc in self._popens:
            if timeout:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=timeout)
            else:
                proc.poll()
        self._popens = [p for p in self._popens if p.returncode is None]

    # --- running commands inside hosts ----------------------------------------------------------

    def exec(
        self,
        host: str,
        argv: Sequence[str],
        check: bool = True,
        user: str | None = None,
        input: str | None = None,
        timeout: float = 60,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv inside a host (all its namespaces), as root or as `user`; output captured."""
        rec = self._host(host)
        if not pid_alive(rec["init_pid"], rec["init_start"]):
            raise TestbedError(
                f"{host} is not running (its init {rec['init_pid']} is gone)\n"
                "hint: python -m tests.testbed down, then up"
            )
        wd = pwd.getpwnam(user).pw_dir if user else "/root"
        full = [
            "nsenter",
            "-t",
            str(rec["init_pid"]),
            "-n",
            "-m",
            "-p",
            "-u",
            "-i",
            f"--wd={wd}",
            "--",
        ]
        if user:
            full += [
                "setpriv",
                f"--reuid={user}",
                f"--regid={user}",
                "--init-groups",
                "--reset-env",
                "--",
            ]
        return run(
            full + list(argv),
            check=check,
            input=input,
            timeout=timeout,
            env=clean_env(**dict(env or {})),
            where=host,
        )

    def ssh_argv(self, host: str, *remote: str, user: str = LOGIN_USER) -> list[str]:
        """Command line of the real ssh client to a host, strict host key checking on."""
        return [
            "ssh",
            "-F",
            "/dev/null",
            "-i",
            str(self.identity_file),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=5",
            f"{user}@{self.mgmt_ip(host)}",
            *remote,
        ]

    # --- inventory ------------------------------------------------------------------------------

    def inventory_data(self, workloads: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
        state = self._state()
        specs = [self.spec(h["name"]) for h in state["hosts"]]
        return build_inventory(
            specs,
            identity_file=self.identity_file,
            known_hosts=self.known_hosts,
            topology=state["topology"],
            workloads=workloads,
        )

    def inventory_path(self, workloads: Sequence[dict[str, Any]] | None = None) -> Path:
        """Write <root>/inventory.yaml for sparkctl and return its path."""
        return write_inventory(self.root / "inventory.yaml", self.inventory_data(workloads))

    # --- fresh state between tests --------------------------------------------------------------

    def reset_hosts(self, hosts: Sequence[str] | None = None) -> None:
        """Return hosts to a fresh install: see docs/testbed.md for exactly what is reset."""
        state = self._state()
        names = list(hosts or self.hosts)
        self._undo_wiring_faults(state)
        self._parallel(self._reset_host, names)
        state = self._state()
        state["ports"] = [p for p in state["ports"] if p["host"] not in names]
        self._save(state)
        self._reap_popens()
        self._parallel(self._settle_host, names)

    def _reset_host(self, host: str) -> None:
        spec, hostdir = self.spec(host), self.hostdir(host)
        sim = hostdir / "sim"
        (sim / "driver_version").write_text(f"{DEFAULT_DRIVER_VERSION}\n")
        (sim / "temperature").write_text(f"{DEFAULT_GPU_TEMPERATURE}\n")
        (sim / "gid_index").write_text(f"{spec.gid_index}\n")
        self.exec(
            host,
            ["/bin/bash", str(self.root / "libexec" / "reset_host.sh")],
            env={
                "TB_TWINS": " ".join(t.interface for t in self.spec(host).twins),
                "TB_USER": LOGIN_USER,
                "TB_RUNTIME": RUNTIME_VENV,
                "TB_HOSTDIR": str(hostdir),
                "TB_MGMT_IF": MGMT_IFNAME,
                "TB_MGMT_CIDR": f"{spec.mgmt_ip}/{MGMT_PREFIX_LEN}",
                "TB_GATEWAY": LAPTOP_IP,
            },
            timeout=60,
        )

    # --- a reboot ----------------------------------------------------------------------------------

    def reboot(self, host: str) -> float:
        """Reboot one host: every process in it killed at once (its PID namespace's init, so the kernel ends them
        all), what a power cycle clears cleared (the interfaces' addresses and MTU, the nftables ruleset; /run and
        /dev/shm are tmpfs the new init mounts afresh), then booted again on the same disk (/etc, /home,
        NetworkManager's profiles and state kept), NetworkManager bringing the autoconnect profiles back itself.
        Returns the seconds it took until sshd answered and NetworkManager had activated its profiles."""
        t0 = time.monotonic()
        state = self._state()
        rec = self._host(host, state)
        spec = self.spec(host)
        twins = [t.interface for t in spec.twins]
        flush = "; ".join(
            [f"ip addr flush dev {MGMT_IFNAME}", "nft flush ruleset 2>/dev/null"]
            + [f"ip addr flush dev {t}; ip link set {t} mtu 1500" for t in twins]
        )
        self.exec(host, ["sh", "-c", flush + "; true"])
        os.kill(rec["init_pid"], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while pid_alive(rec["init_pid"], rec["init_start"]):
            if time.monotonic() > deadline:
                raise TestbedError(f"{host}: its init {rec['init_pid']} outlived SIGKILL for 30 s")
            time.sleep(0.05)
        self._reap_popens()
        (Path(rec["dir"]) / "status").unlink(missing_ok=True)
        self._spawn_host(state, spec)
        lifecycle.wait_booted([rec], BOOT_TIMEOUT)
        # the twins NetworkManager manages (as the testbed's first boot marks them), then their profiles active
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while True:
            for t in twins:
                self.exec(host, ["nmcli", "device", "set", t, "managed", "yes"], check=False)
            out = self.exec(host, ["nmcli", "-t", "-f", "DEVICE,STATE", "device", "status"], check=False).stdout
            states = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
            if all(states.get(t) == "connected" for t in twins):
                return time.monotonic() - t0
            if time.monotonic() > deadline:
                raise TestbedError(f"{host}: after the reboot the twins are {states}")
            time.sleep(0.2)

    # --- which vLLM the hosts run ----------------------------------------------------------------

    def use_vllm(self, kind: str, hosts: Sequence[str] | None = None) -> None:
        """Make the runtime venv's `vllm` inside the hosts vLLM itself or the SIMULATED one.

        "real" (the state after up()): the venv's own bin/, i.e. vLLM's CPU build installed by tests/prepare.sh.
        "simulated": tests/testbed/sim/vllm laid over the venv's bin/ (an overlay inside each host's mount
        namespace; the machine's venv is never written), for what needs a GPU: the Ray executor across nodes.
        The containers a host starts from then on see it too: podman mounts it over the image's
        `<venv>/bin/vllm` (the host's containers.conf `volumes`), so container mode runs it exactly as the venv does.
        """
        if kind not in VLLM_KINDS:
            raise TestbedError(f"use_vllm: kind {kind!r} is not one of {', '.join(VLLM_KINDS)}")
        bindir = f"{RUNTIME_VENV}/bin"
        if kind == "real" and not Path(bindir, "vllm").exists():
            raise TestbedError(f"{bindir}/vllm does not exist on this machine\nhint: run tests/prepare.sh")
        simbin = self.root / "runtime-sim-bin"
        if kind == "real":
            script = f"while mountpoint -q {bindir}; do umount {bindir}; done"
        else:
            script = f"mountpoint -q {bindir} || mount -t overlay overlay -o lowerdir={simbin}:{bindir} {bindir}"

        volumes = [] if kind == "real" else [f"{simbin}/vllm:{bindir}/vllm:ro"]

        def switch(host: str) -> None:
            self.exec(host, ["sh", "-c", script])
            conf = provision.render_containers_conf(volumes)
            self.exec(host, ["sh", "-c", "cat > /etc/containers/containers.conf"], input=conf)

        self._parallel(switch, list(hosts or self.hosts))

    def vllm_kind(self, host: str) -> str:
        """'simulated' while the SIMULATED vllm is laid over the runtime venv inside `host`, else 'real'."""
        r = self.exec(host, ["mountpoint", "-q", f"{RUNTIME_VENV}/bin"], check=False)
        return "simulated" if r.returncode == 0 else "real"

    def namespace_pids(self) -> dict[str, list[int]]:
        """PIDs (as the machine numbers them) of every process running inside each host."""
        result: dict[str, list[int]] = {}
        for rec in self._state()["hosts"]:
            result[rec["name"]] = []
            if not pid_alive(rec["init_pid"], rec["init_start"]):
                continue
            try:
                target = os.readlink(f"/proc/{rec['init_pid']}/ns/pid")
            except OSError:
                continue
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit():
                    with contextlib.suppress(OSError):
                        if os.readlink(entry / "ns" / "pid") == target:
                            result[rec["name"]].append(int(entry.name))
        return result

    def processes(self, host: str) -> list[str]:
        """`ps` lines (pid user args) of a host, for assertions."""
        out = self.exec(host, ["ps", "-eo", "pid=,user=,args="]).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]


def _ensure_login_user() -> None:
    """Create the login user on the real machine once; each host sees its own /home overlay."""
    try:
        pwd.getpwnam(LOGIN_USER)
    except KeyError:
        run(["useradd", "-m", "-s", "/bin/bash", LOGIN_USER])


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        run(["rm", "-rf", "--one-file-system", str(path)], check=False)


@contextlib.contextmanager
def running_testbed(hosts: int = 2, **kwargs: Any) -> Iterator[Testbed]:
    """Context manager: a testbed up for the duration of the block."""
    tb = Testbed()
    tb.down()
    tb.up(hosts=hosts, **kwargs)
    try:
        yield tb
    finally:
        tb.down()
