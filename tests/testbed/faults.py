"""Fault injection on the fake Sparks. Every fault is undone by Testbed.reset_hosts()."""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import network
from ._proc import TestbedError, clean_env, run
from .layout import validate_gid_index

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from .layout import HostSpec

# A listener that holds a port until killed; its argv carries a marker reset_host.sh looks for.
_OCCUPY = """
import os, socket, sys, time
family = socket.AF_INET6 if ":" in sys.argv[2] else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port a test just released may sit in TIME_WAIT
s.bind((sys.argv[2], int(sys.argv[3])))
s.listen()
print("ready", os.getpid(), flush=True)
while True:
    time.sleep(3600)
"""


class PortHandle:
    """A port held open inside a host by occupy_port(); release() frees it."""

    def __init__(
        self,
        testbed: FaultsMixin,
        host: str,
        port: int,
        address: str,
        pid: int,
        proc: subprocess.Popen[str],
    ) -> None:
        self.testbed, self.host, self.port, self.address = testbed, host, port, address
        self.pid, self._proc = pid, proc

    def release(self) -> None:
        """Stop the listener (idempotent)."""
        if self._proc.poll() is None:
            self.testbed.exec(self.host, ["kill", "-KILL", str(self.pid)], check=False)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)
        self.testbed._forget_port(self.host, self.pid)

    def __enter__(self) -> PortHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class FaultsMixin:
    """Methods of Testbed that break things on purpose."""

    root: Path
    _popens: list[subprocess.Popen[Any]]

    if TYPE_CHECKING:

        def _state(self) -> dict[str, Any]: ...
        def _save(self, state: dict[str, Any]) -> None: ...
        def _host(self, host: str, state: dict[str, Any] | None = None) -> dict[str, Any]: ...
        def spec(self, host: str) -> HostSpec: ...
        def hostdir(self, host: str) -> Path: ...
        def exec(
            self,
            host: str,
            argv: Sequence[str],
            check: bool = True,
            user: str | None = None,
            input: str | None = None,
            timeout: float = 60,
            env: Mapping[str, str] | None = None,
        ) -> subprocess.CompletedProcess[str]: ...

    # --- sshd -----------------------------------------------------------------------------------

    def stop_sshd(self, host: str) -> None:
        """Stop the sshd listener (open sessions survive, as with `systemctl stop ssh`)."""
        self.exec(
            host,
            [
                "/bin/sh",
                "-c",
                'p=$(cat /run/sshd.pid 2>/dev/null) && kill "$p" && '
                'while kill -0 "$p" 2>/dev/null; do sleep 0.05; done; '
                "rm -f /run/sshd.pid",
            ],
        )

    def drop_ssh(self, host: str) -> None:
        """sshd dies on the host: the listener and every sshd process under it (the open sessions) are killed,
        found by pid from /run/sshd.pid down the process tree; commands the sessions started are left alone.
        The laptop's connection breaks at once."""
        self.exec(
            host,
            [
                "/bin/sh",
                "-c",
                "p=$(cat /run/sshd.pid 2>/dev/null) || exit 0; "
                'pids=$(ps -eo pid=,ppid=,comm= | awk -v root="$p" '
                "'{ parent[$1] = $2; name[$1] = $3 } END { for (q in parent) { r = q; "
                'while (r != "" && r != root && r > 1) r = parent[r]; '
                "if (r == root && name[q] ~ /^sshd/) print q } }'); "
                "kill -KILL $pids 2>/dev/null; "
                'while kill -0 "$p" 2>/dev/null; do sleep 0.05; done; rm -f /run/sshd.pid',
            ],
        )

    def start_sshd(self, host: str) -> None:
        """Start the sshd listener if it is not running; return once it accepts connections."""
        self.exec(
            host,
            [
                "/bin/sh",
                "-c",
                "p=$(cat /run/sshd.pid 2>/dev/null); "
                '{ [ -n "$p" ] && kill -0 "$p" 2>/dev/null; } || /usr/sbin/sshd </dev/null >/dev/null 2>&1; '
                # sshd forks into the background before it listens.
                'for i in $(seq 200); do [ -n "$(ss -Htln "sport = :22")" ] && exit 0; sleep 0.05; done; '
                "echo 'sshd is not listening on port 22' >&2; exit 1",
            ],
        )

    def change_host_key(self, host: str) -> str:
        """New sshd host key + sshd restart; known_hosts stays stale. Returns the new public key."""
        self.exec(
            host,
            [
                "/bin/sh",
                "-c",
                "set -e; k=/etc/ssh/ssh_host_ed25519_key; rm -f $k $k.pub; "
                "ssh-keygen -q -t ed25519 -N '' -C root@$(hostname) -f $k",
            ],
        )
        self.stop_sshd(host)
        self.start_sshd(host)
        return self.exec(host, ["cat", "/etc/ssh/ssh_host_ed25519_key.pub"]).stdout.strip()

    # --- links ----------------------------------------------------------------------------------

    def link_down(self, host: str, ifname: str) -> None:
        """Set an interface of the host administratively down (inside the host)."""
        self.exec(host, ["ip", "link", "set", ifname, "down"])

    def link_up(self, host: str, ifname: str) -> None:
        self.exec(host, ["ip", "link", "set", ifname, "up"])

    def set_mtu(self, host: str, ifname: str, mtu: int) -> None:
        """Change the device MTU behind NetworkManager's back."""
        self.exec(host, ["ip", "link", "set", ifname, "mtu", str(mtu)])

    def fail_nm_activation(self, host: str, ifname: str) -> None:
        """Make `nmcli connection up` of any profile for ifname fail: the device disappears.

        The interface is moved out of the host into the machine's root namespace (parked under a
        recorded sptbx* name), so NetworkManager reports "No suitable device found for this
        connection" and `ip link` no longer lists it; the far end (peer host's twin) loses carrier.
        Losing carrier alone is not enough: NetworkManager 1.42 activates static profiles on a veth
        without carrier. Undo with restore_nm_activation() or reset_hosts().
        """
        state = self._state()
        spec = self.spec(host)
        temp = f"sptbx{spec.index}{len(state['parked'])}"
        state["links"].append(temp)
        state["parked"].append({"host": host, "ifname": ifname, "temp": temp})
        self._save(state)
        run(["ip", "-n", spec.netns, "link", "set", ifname, "netns", "1", "name", temp])

    def restore_nm_activation(self, host: str, ifname: str) -> None:
        """Bring back an interface removed by fail_nm_activation() (up, MTU 1500, no address)."""
        state = self._state()
        for parked in [p for p in state["parked"] if (p["host"], p["ifname"]) == (host, ifname)]:
            self._unpark(state, parked)
        self._save(state)

    def _unpark(self, state: dict[str, Any], parked: dict[str, str]) -> None:
        spec = self.spec(parked["host"])
        if Path("/sys/class/net", parked["temp"]).exists():
            run(["ip", "link", "set", parked["temp"], "netns", spec.netns, "name", parked["ifname"]])
            run(["ip", "-n", spec.netns, "link", "set", parked["ifname"], "mtu", "1500", "up"])
        state["parked"].remove(parked)
        if parked["temp"] in state["links"]:
            state["links"].remove(parked["temp"])

    def read_only_nm_profiles(self, host: str) -> None:
        """NetworkManager cannot write profiles: its keyfile directory becomes a read-only mount of itself.

        `nmcli connection add` then fails (the keyfile plugin cannot save the profile) while every profile that
        exists keeps working. Undo with writable_nm_profiles() or reset_hosts().
        """
        d = "/etc/NetworkManager/system-connections"
        self.exec(host, ["/bin/sh", "-c", f"mount --bind {d} {d} && mount -o remount,bind,ro {d}"])

    def writable_nm_profiles(self, host: str) -> None:
        d = "/etc/NetworkManager/system-connections"
        self.exec(host, ["/bin/sh", "-c", f"while mountpoint -q {d}; do umount {d}; done"])

    def carrier_down(self, host: str, ifname: str) -> None:
        """Pull the cable: the far end of ifname goes down, so ifname loses carrier.

        For a twin with two hosts the far end is the peer host's twin of the same name (like the
        other Spark's port being disabled); with more hosts, its switch port; for the management
        interface, its bridge port. Undo with carrier_up() or reset_hosts().
        """
        self._far_end(host, ifname, "down")

    def carrier_up(self, host: str, ifname: str) -> None:
        self._far_end(host, ifname, "up")

    def _far_end(self, host: str, ifname: str, updown: str) -> None:
        specs = [self.spec(h["name"]) for h in self._state()["hosts"]]
        network.set_far_end(specs, self.spec(host), ifname, updown)

    def _undo_wiring_faults(self, state: dict[str, Any]) -> None:
        for parked in list(state["parked"]):
            self._unpark(state, parked)
        self._save(state)
        names = [h["name"] for h in state["hosts"]]
        for name in names:
            spec = self.spec(name)
            run(["ip", "link", "set", spec.mgmt_peer, "up"])
            for twin in spec.twins:
                with contextlib.suppress(TestbedError):
                    self._far_end(name, twin.interface, "up")

    # --- ports ----------------------------------------------------------------------------------

    def occupy_port(self, host: str, port: int, address: str = "0.0.0.0") -> PortHandle:
        """Listen on address:port (TCP) inside the host until the handle is released."""
        rec = self._host(host)
        argv = [
            "nsenter",
            "-t",
            str(rec["init_pid"]),
            "-n",
            "-m",
            "-p",
            "-u",
            "-i",
            "--wd=/",
            "--",
            "/usr/bin/python3",
            "-I",
            "-c",
            _OCCUPY,
            "testbed-occupy-port",
            address,
            str(port),
        ]
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(),
        )
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        if len(line) != 2 or line[0] != "ready":
            proc.wait(timeout=5)
            err = proc.stderr.read() if proc.stderr else ""
            raise TestbedError(f"{host}: could not occupy {address}:{port}: {err.strip()}")
        pid = int(line[1])
        self._popens.append(proc)
        state = self._state()
        state["ports"].append({"host": host, "pid": pid, "port": port, "address": address})
        self._save(state)
        return PortHandle(self, host, port, address, pid, proc)

    def _forget_port(self, host: str, pid: int) -> None:
        state = self._state()
        state["ports"] = [p for p in state["ports"] if not (p["host"] == host and p["pid"] == pid)]
        self._save(state)

    # --- SIMULATED hardware ---------------------------------------------------------------------

    def set_driver_version(self, host: str, version: str) -> None:
        """What the host's SIMULATED nvidia-smi reports as driver_version, e.g. "590.44.01"."""
        (self.hostdir(host) / "sim" / "driver_version").write_text(f"{version}\n")

    def set_gpu_temperature(self, host: str, celsius: int) -> None:
        (self.hostdir(host) / "sim" / "temperature").write_text(f"{celsius}\n")

    def set_gid_index(self, host: str, index: int, wait: bool = True) -> None:
        """Move the host's SIMULATED RoCE v2 IPv4 GID entry to `index` (v1 goes to index-1)."""
        validate_gid_index(index)
        (self.hostdir(host) / "sim" / "gid_index").write_text(f"{index}\n")
        if wait:
            self.wait_gid_table(host)

    def gid_table(self, host: str, rdma_device: str) -> list[tuple[int, str, str, str]]:
        """(index, gid, type, ndev) of the host's used GID entries, read through the host's /sys."""
        script = (
            'p=/sys/class/infiniband/"$1"/ports/1; for f in "$p"/gids/*; do i=${f##*/}; '
            'printf "%s|%s|%s|%s\\n" "$i" "$(cat "$f")" "$(cat "$p/gid_attrs/types/$i")" '
            '"$(cat "$p/gid_attrs/ndevs/$i")"; done'
        )
        out = self.exec(host, ["/bin/sh", "-c", script, "sh", rdma_device]).stdout
        rows = []
        for line in out.splitlines():
            idx, gid, kind, ndev = line.split("|")
            if kind:
                rows.append((int(idx), gid, kind, ndev))
        return sorted(rows)

    def wait_gid_table(self, host: str, timeout: float = 10.0) -> None:
        """Wait until the GID updater has finished two full passes after this call."""
        counter = self.hostdir(host) / "sim" / "updater_passes"

        def passes() -> int:
            try:
                return int(counter.read_text().strip() or 0)
            except (OSError, ValueError):
                return 0

        start, deadline = passes(), time.monotonic() + timeout
        while passes() < start + 2:
            if time.monotonic() > deadline:
                raise TestbedError(
                    f"{host}: the SIMULATED GID updater is not running (see {self.hostdir(host) / 'boot.log'})"
                )
            time.sleep(0.05)
