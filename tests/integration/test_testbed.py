"""Self-tests of the testbed: the fake Sparks behave like fresh DGX Sparks, on real state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.testbed import TWINS, Testbed, TestbedError

pytestmark = pytest.mark.testbed

REPO = Path(__file__).resolve().parents[2]
TWIN, TWIN2 = TWINS[0].interface, TWINS[1].interface
HOSTS = ["spark-a", "spark-b"]


def ssh(tb: Testbed, host: str, command: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """The real ssh client, testbed key, testbed known_hosts, StrictHostKeyChecking=yes."""
    return subprocess.run(
        tb.ssh_argv(host, command),
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )


def nmcli_fields(tb: Testbed, host: str, *args: str) -> list[list[str]]:
    out = tb.exec(host, ["nmcli", "-t", *args]).stdout
    return [line.split(":") for line in out.splitlines() if line]


def link(tb: Testbed, host: str, ifname: str) -> dict[str, object]:
    data: list[dict[str, object]] = json.loads(tb.exec(host, ["ip", "-j", "addr", "show", "dev", ifname]).stdout)
    return data[0]


def ipv4_of(link_info: dict[str, object]) -> list[str]:
    infos = link_info.get("addr_info", [])
    assert isinstance(infos, list)
    return [a["local"] for a in infos if a.get("family") == "inet"]


def configure_twin(tb: Testbed, host: str, address: str, name: str = "t") -> None:
    """The manual bring-up sparkctl automates, with the exact nmcli commands."""
    tb.exec(
        host,
        [
            "nmcli",
            "connection",
            "add",
            "type",
            "ethernet",
            "con-name",
            name,
            "ifname",
            TWIN,
            "ipv4.method",
            "manual",
            "ipv4.addresses",
            address,
            "ipv6.method",
            "disabled",
            "802-3-ethernet.mtu",
            "9000",
        ],
    )
    tb.exec(host, ["nmcli", "connection", "up", name], timeout=60)


def live_pids(tb: Testbed) -> set[tuple[int, str]]:
    """(pid, start time) of every process inside the testbed's hosts."""
    out = set()
    for pids in tb.namespace_pids().values():
        for pid in pids:
            try:
                out.add((pid, Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]))
            except OSError:
                continue
    return out


def leftovers(root: Path, host_pids: set[tuple[int, str]]) -> list[str]:
    """Anything of a testbed still on the machine.

    Zombies are not counted: an orphaned `unshare` waits for PID 1 to reap it (docs/testbed.md).
    Other namespace setups on the machine are not ours and not counted either.
    """
    found = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += [f"netns {line.split()[0]}" for line in netns.splitlines() if "sptb" in line]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    found += [f"link {line.split(':')[1].strip()}" for line in links.splitlines() if "sptb" in line]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fields[0] == "Z":
            continue
        if (int(proc.name), fields[19]) in host_pids or str(root) in cmdline:
            found.append(f"process {proc.name}: {cmdline.strip()}")
    mounts = Path("/proc/self/mounts").read_text()
    found += [f"mount {line}" for line in mounts.splitlines() if str(root) in line]
    if root.exists():
        found.append(f"dir {root}: {sorted(p.name for p in root.iterdir())}")
    return found


# --- access ---------------------------------------------------------------------------------------


def test_inventory_points_at_testbed_hosts_and_files(testbed: Testbed) -> None:
    data = yaml.safe_load(testbed.inventory_path().read_text())
    assert data["cluster"] == "testbed"
    assert data["ssh"]["user"] == "spark"
    assert Path(data["ssh"]["identity_file"]).stat().st_mode & 0o777 == 0o600
    known = Path(data["ssh"]["known_hosts"]).read_text()
    assert [h["name"] for h in data["hosts"]] == HOSTS
    for i, host in enumerate(data["hosts"]):
        assert host["address"] == f"10.77.0.{11 + i}"
        assert f"10.77.0.{11 + i} ssh-ed25519 " in known
        assert [(f["interface"], f["address"], f["rdma_device"]) for f in host["fabric"]] == [
            ("enp1s0f1np1", f"192.168.100.{10 + i}/24", "rocep1s0f1"),
            ("enP2p1s0f1np1", f"192.168.101.{10 + i}/24", "roceP2p1s0f1"),
        ]
    assert data["ray"] == {"head": "spark-a", "port": 6379}
    assert data["runtime"] == {"venv": "/opt/sparkctl-runtime"}
    assert data["workloads"] == []
    with_workload = yaml.safe_load(
        testbed.inventory_path(workloads=[{"name": "embed", "engine": "builtin"}]).read_text()
    )
    assert with_workload["workloads"] == [{"name": "embed", "engine": "builtin"}]


@pytest.mark.parametrize("host", HOSTS)
def test_ssh_login_with_testbed_key_and_strict_known_hosts(testbed: Testbed, host: str) -> None:
    result = ssh(testbed, host, "hostname; id -un; echo $HOME")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [host, "spark", "/home/spark"]


def test_changed_host_key_is_refused_until_reset(fresh_testbed: Testbed) -> None:
    fresh_testbed.change_host_key("spark-a")
    refused = ssh(fresh_testbed, "spark-a", "true")
    assert refused.returncode == 255
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in refused.stderr
    assert ssh(fresh_testbed, "spark-b", "true").returncode == 0
    fresh_testbed.reset_hosts(["spark-a"])
    assert ssh(fresh_testbed, "spark-a", "true").returncode == 0


def test_stopped_sshd_refuses_connections(fresh_testbed: Testbed) -> None:
    fresh_testbed.stop_sshd("spark-b")
    refused = ssh(fresh_testbed, "spark-b", "true")
    assert refused.returncode == 255
    assert "Connection refused" in refused.stderr
    fresh_testbed.start_sshd("spark-b")
    assert ssh(fresh_testbed, "spark-b", "true").returncode == 0


def test_sudo_without_password_on_a_and_with_password_on_b(testbed: Testbed) -> None:
    a = ssh(testbed, "spark-a", "sudo -n id -u")
    assert (a.returncode, a.stdout.strip()) == (0, "0"), a.stderr
    b = ssh(testbed, "spark-b", "sudo -n true")
    assert b.returncode == 1
    assert "password is required" in b.stderr
    assert "unable to resolve host" not in b.stderr
    password = testbed.sudo_password_for("spark-b")
    assert password == testbed.sudo_password
    b_pw = ssh(testbed, "spark-b", "sudo -S -p '' id -u", stdin=f"{password}\n")
    assert (b_pw.returncode, b_pw.stdout.strip()) == (0, "0"), b_pw.stderr
    wrong = ssh(testbed, "spark-b", "sudo -S -p '' id -u", stdin="wrong\n")
    assert wrong.returncode == 1


# --- isolation ------------------------------------------------------------------------------------


def test_hosts_have_their_own_identity_and_etc(fresh_testbed: Testbed) -> None:
    tb = fresh_testbed
    seen = {
        h: tb.exec(
            h,
            [
                "sh",
                "-c",
                "hostname; cat /etc/hostname /etc/machine-id; cat /sys/class/net/enP7s7/address",
            ],
        ).stdout.split()
        for h in HOSTS
    }
    assert seen["spark-a"][:2] == ["spark-a", "spark-a"]
    assert seen["spark-b"][:2] == ["spark-b", "spark-b"]
    assert seen["spark-a"][2] != seen["spark-b"][2], "machine-id shared"
    assert seen["spark-a"][3] != seen["spark-b"][3], "management MAC shared"
    tb.exec("spark-a", ["sh", "-c", "mkdir -p /etc/sparkctl && echo a > /etc/sparkctl/probe"])
    tb.exec("spark-a", ["sh", "-c", "echo a > ~/probe"], user="spark")
    assert tb.exec("spark-b", ["test", "-e", "/etc/sparkctl/probe"], check=False).returncode == 1
    assert tb.exec("spark-b", ["test", "-e", "/home/spark/probe"], check=False).returncode == 1
    assert not Path("/etc/sparkctl/probe").exists()
    assert not Path("/home/spark/probe").exists()


def test_pid_namespaces_are_separate(fresh_testbed: Testbed) -> None:
    tb = fresh_testbed
    tb.exec("spark-a", ["sh", "-c", "setsid sleep 4242 </dev/null >/dev/null 2>&1 &"], user="spark")
    on_a = tb.exec("spark-a", ["pgrep", "-f", "sleep 4242"], check=False)
    on_b = tb.exec("spark-b", ["pgrep", "-f", "sleep 4242"], check=False)
    assert on_a.returncode == 0 and on_a.stdout.strip()
    assert on_b.returncode == 1
    init = tb.exec("spark-a", ["cat", "/proc/1/cmdline"]).stdout
    assert "boot.sh" in init
    tb.reset_hosts(["spark-a"])
    assert tb.exec("spark-a", ["pgrep", "-f", "sleep 4242"], check=False).returncode == 1


def test_hosts_have_their_own_dev_shm(fresh_testbed: Testbed) -> None:
    # vLLM tells "same node" from shared memory (shm_broadcast): real Sparks share none, nor do the fake ones.
    tb = fresh_testbed
    tb.exec("spark-a", ["sh", "-c", "echo a > /dev/shm/testbed-probe"], user="spark")
    assert tb.exec("spark-a", ["cat", "/dev/shm/testbed-probe"]).stdout == "a\n"
    assert tb.exec("spark-b", ["test", "-e", "/dev/shm/testbed-probe"], check=False).returncode == 1
    assert not Path("/dev/shm/testbed-probe").exists()
    mounts = {h: tb.exec(h, ["findmnt", "-n", "-o", "FSTYPE", "/dev/shm"]).stdout.split() for h in HOSTS}
    assert all(m[-1:] == ["tmpfs"] for m in mounts.values()), mounts


def test_runtime_venv_shows_real_vllm_or_the_simulated_one_on_demand(fresh_testbed: Testbed) -> None:
    tb = fresh_testbed
    venv_vllm = "/opt/sparkctl-runtime/bin/vllm"
    machine = Path(venv_vllm).read_bytes()
    assert b"SIMULATED" not in machine[:4096]  # vLLM's own console script (tests/prepare.sh)
    try:
        for host in HOSTS:
            assert tb.vllm_kind(host) == "real"
            assert tb.exec(host, ["cat", venv_vllm]).stdout.encode() == machine
        tb.use_vllm("simulated", ["spark-b"])
        assert tb.vllm_kind("spark-a") == "real" and tb.vllm_kind("spark-b") == "simulated"
        assert "SIMULATED" in tb.exec("spark-b", ["head", "-c", "4096", venv_vllm]).stdout
        assert Path(venv_vllm).read_bytes() == machine  # the machine's venv is never written
        assert tb.exec("spark-b", ["test", "-x", "/opt/sparkctl-runtime/bin/ray"], check=False).returncode == 0
    finally:
        tb.use_vllm("real")
    assert tb.vllm_kind("spark-b") == "real"
    with pytest.raises(TestbedError, match="kind 'gpu'"):
        tb.use_vllm("gpu")


# --- network --------------------------------------------------------------------------------------


def test_fresh_twins_are_managed_with_wired_connection_profiles(fresh_testbed: Testbed) -> None:
    for host in HOSTS:
        states = {d[0]: d[1] for d in nmcli_fields(fresh_testbed, host, "-f", "DEVICE,STATE", "device", "status")}
        for twin in TWINS:
            assert states[twin.interface] not in ("unmanaged", "unavailable"), states
        assert states["enP7s7"] == "unmanaged"
        profiles = nmcli_fields(fresh_testbed, host, "-f", "NAME,TYPE,AUTOCONNECT", "connection", "show")
        wired = [p for p in profiles if p[0].startswith("Wired connection")]
        assert len(wired) == len(TWINS), profiles
        assert all(p[1] == "802-3-ethernet" and p[2] == "yes" for p in wired)
        for twin in TWINS:
            info = link(fresh_testbed, host, twin.interface)
            assert info["mtu"] == 1500
            assert ipv4_of(info) == []
            assert "UP" in info["flags"]  # type: ignore[operator]
        assert ipv4_of(link(fresh_testbed, host, "enP7s7")) == [fresh_testbed.mgmt_ip(host)]


def test_manual_nmcli_setup_passes_jumbo_frames_and_fills_gid_table(
    gid_index_mismatch: Testbed,
) -> None:
    tb = gid_index_mismatch
    configure_twin(tb, "spark-a", "192.168.100.10/24")
    configure_twin(tb, "spark-b", "192.168.100.11/24")
    for host, peer in (("spark-a", "192.168.100.11"), ("spark-b", "192.168.100.10")):
        info = link(tb, host, TWIN)
        assert info["mtu"] == 9000
        keyfile = tb.exec(host, ["cat", "/etc/NetworkManager/system-connections/t.nmconnection"])
        assert "mtu=9000" in keyfile.stdout
        ping = tb.exec(host, ["ping", "-M", "do", "-s", "8972", "-c", "1", "-W", "2", peer], check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
    tb.wait_gid_table("spark-a")
    tb.wait_gid_table("spark-b")
    a = {row[0]: row[1:] for row in tb.gid_table("spark-a", "rocep1s0f1")}
    b = {row[0]: row[1:] for row in tb.gid_table("spark-b", "rocep1s0f1")}
    mapped_a = "0000:0000:0000:0000:0000:ffff:c0a8:640a"
    mapped_b = "0000:0000:0000:0000:0000:ffff:c0a8:640b"
    assert a[2] == (mapped_a, "IB/RoCE v1", TWIN)
    assert a[3] == (mapped_a, "RoCE v2", TWIN)
    assert b[4] == (mapped_b, "IB/RoCE v1", TWIN)
    assert b[5] == (mapped_b, "RoCE v2", TWIN)
    assert b[3][0] != mapped_b
    assert a[0][0].startswith("fe80:0000:0000:0000:") and a[1][1] == "RoCE v2"
    # The other twin has no address, so no IPv4-mapped entry.
    assert all(":ffff:" not in gid for _, gid, _, _ in tb.gid_table("spark-a", "roceP2p1s0f1"))
    # A path MTU mismatch is visible: one side back at 1500 stops jumbo frames.
    tb.set_mtu("spark-b", TWIN, 1500)
    blocked = tb.exec(
        "spark-a",
        ["ping", "-M", "do", "-s", "8972", "-c", "1", "-W", "1", "192.168.100.11"],
        check=False,
    )
    assert blocked.returncode != 0
    # Removing the address removes the entries.
    tb.reset_hosts()
    tb.wait_gid_table("spark-a")
    assert all(":ffff:" not in gid for _, gid, _, _ in tb.gid_table("spark-a", "rocep1s0f1"))


def test_fail_nm_activation_link_and_mtu_faults_are_undone_by_reset(
    fresh_testbed: Testbed,
) -> None:
    tb = fresh_testbed
    tb.fail_nm_activation("spark-a", TWIN)
    tb.exec(
        "spark-a",
        [
            "nmcli",
            "connection",
            "add",
            "type",
            "ethernet",
            "con-name",
            "t",
            "ifname",
            TWIN,
            "ipv4.method",
            "manual",
            "ipv4.addresses",
            "192.168.100.10/24",
        ],
    )
    failed = tb.exec("spark-a", ["nmcli", "connection", "up", "t"], check=False, timeout=60)
    assert failed.returncode != 0
    assert "No suitable device" in failed.stderr
    assert tb.exec("spark-b", ["cat", f"/sys/class/net/{TWIN}/carrier"]).stdout.strip() == "0"
    tb.carrier_down("spark-b", TWIN2)
    assert tb.exec("spark-b", ["cat", f"/sys/class/net/{TWIN2}/carrier"]).stdout.strip() == "0"
    tb.link_down("spark-a", TWIN2)
    tb.set_mtu("spark-b", TWIN2, 9000)
    ibdev = tb.exec("spark-a", ["ibdev2netdev"]).stdout
    assert f"roceP2p1s0f1 port 1 ==> {TWIN2} (Down)" in ibdev
    tb.reset_hosts()
    for host in HOSTS:
        for twin in TWINS:
            info = link(tb, host, twin.interface)
            assert info["mtu"] == 1500 and info["operstate"] == "UP", info
    profiles = [p[0] for p in nmcli_fields(tb, "spark-a", "-f", "NAME", "connection", "show")]
    assert "t" not in profiles
    configure_twin(tb, "spark-a", "192.168.100.10/24")
    configure_twin(tb, "spark-b", "192.168.100.11/24")
    ping = tb.exec("spark-a", ["ping", "-c", "1", "-W", "2", "192.168.100.11"], check=False)
    assert ping.returncode == 0, ping.stdout


def test_occupy_port_listens_until_released(fresh_testbed: Testbed) -> None:
    tb = fresh_testbed
    listening = ["ss", "-Htln", "sport = :6379"]
    handle = tb.occupy_port("spark-a", 6379, "0.0.0.0")
    assert "0.0.0.0:6379" in tb.exec("spark-a", listening).stdout
    assert tb.exec("spark-b", listening).stdout.strip() == ""
    handle.release()
    assert tb.exec("spark-a", listening).stdout.strip() == ""
    with pytest.raises(TestbedError, match="could not occupy"):
        tb.occupy_port("spark-a", 6379, "192.168.100.10")  # address not configured yet


def test_reset_returns_hosts_to_fresh_install(fresh_testbed: Testbed) -> None:
    tb = fresh_testbed
    for host in HOSTS:
        tb.exec(
            host,
            [
                "nmcli",
                "connection",
                "add",
                "type",
                "ethernet",
                "con-name",
                "sparkctl-fabric0",
                "ifname",
                TWIN,
                "ipv4.method",
                "manual",
                "ipv4.addresses",
                "192.168.100.50/24",
                "802-3-ethernet.mtu",
                "9000",
            ],
        )
        tb.exec(host, ["nmcli", "connection", "up", "sparkctl-fabric0"])
        tb.exec(
            host,
            ["nmcli", "connection", "modify", "Wired connection 1", "connection.autoconnect", "no"],
        )
        tb.exec(
            host,
            [
                "sh",
                "-c",
                "mkdir -p /etc/sparkctl && echo X=1 > /etc/sparkctl/env; nft add table inet sparkctl",
            ],
        )
        tb.exec(
            host,
            [
                "sh",
                "-c",
                "mkdir -p ~/.ray && touch ~/.ray/auth_token; setsid sleep 4343 </dev/null >/dev/null 2>&1 &",
            ],
            user="spark",
        )
    tb.set_driver_version("spark-b", "590.44.01")
    tb.reset_hosts()
    for host in HOSTS:
        profiles = nmcli_fields(tb, host, "-f", "NAME,AUTOCONNECT", "connection", "show")
        assert not any(p[0].startswith("sparkctl-") for p in profiles)
        assert all(p[1] == "yes" for p in profiles if p[0].startswith("Wired connection"))
        info = link(tb, host, TWIN)
        assert (info["mtu"], ipv4_of(info)) == (1500, [])
        assert tb.exec(host, ["test", "-e", "/etc/sparkctl"], check=False).returncode == 1
        assert tb.exec(host, ["test", "-e", "/home/spark/.ray"], check=False).returncode == 1
        assert tb.exec(host, ["pgrep", "-u", "spark"], check=False).returncode == 1
        assert "sparkctl" not in tb.exec(host, ["nft", "list", "ruleset"]).stdout
    smi = tb.exec("spark-b", ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    assert smi.stdout.strip() == "580.142"


# --- simulated hardware ---------------------------------------------------------------------------


def test_simulated_gpu_and_rdma_tools(fresh_testbed: Testbed) -> None:
    tb = fresh_testbed
    query = "nvidia-smi --query-gpu=name,compute_cap,driver_version,temperature.gpu --format=csv,noheader"
    for host in HOSTS:
        out = ssh(tb, host, query)
        assert out.stdout.strip() == "NVIDIA GB10, 12.1, 580.142, 41", out.stderr
        assert ssh(tb, host, "nvidia-smi -L").stdout.startswith("GPU 0: NVIDIA GB10 (UUID: GPU-")
        assert ssh(tb, host, "ibdev2netdev").stdout.splitlines() == [
            "rocep1s0f1 port 1 ==> enp1s0f1np1 (Up)",
            "roceP2p1s0f1 port 1 ==> enP2p1s0f1np1 (Up)",
        ]
    tb.set_driver_version("spark-b", "590.44.01")
    assert ssh(tb, "spark-b", query).stdout.strip() == "NVIDIA GB10, 12.1, 590.44.01, 41"
    assert ssh(tb, "spark-a", query).stdout.strip() == "NVIDIA GB10, 12.1, 580.142, 41"
    assert not Path("/usr/local/bin/nvidia-smi").exists()
    assert not Path("/sys/class/infiniband").exists()


# --- teardown (keep last: it takes the shared testbed down and brings it back) --------------------


def test_down_leaves_nothing_behind_and_recovers_from_a_crashed_run(testbed: Testbed) -> None:
    root = testbed.root
    testbed.occupy_port("spark-a", 8265)
    pids = live_pids(testbed)
    assert len(pids) > 2 * 6  # init, dbus, udevd, NetworkManager, sshd, ... per host
    testbed.down()
    assert leftovers(root, pids) == []
    testbed.down()  # idempotent
    # A run that crashed: the testbed was brought up by another process, which then went away.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    up = subprocess.run(
        [sys.executable, "-m", "tests.testbed", "up", "--hosts", "2"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert up.returncode == 0, up.stderr
    assert Path(up.stdout.strip()).is_file()
    exec_cli = subprocess.run(
        [sys.executable, "-m", "tests.testbed", "exec", "spark-b", "--", "hostname"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert exec_cli.stdout.strip() == "spark-b"
    orphaned = Testbed(root)
    pids = live_pids(orphaned)
    orphaned.down()  # what the session fixture does first
    assert leftovers(root, pids) == []
    testbed.up(hosts=2)  # later tests keep their shared testbed
    assert ssh(testbed, "spark-a", "hostname").stdout.strip() == "spark-a"
