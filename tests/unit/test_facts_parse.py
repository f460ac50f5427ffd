"""Fact parsers fed with outputs captured from the real tools (tests/unit/fixtures/), and the probe script."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from sparkctl.facts.models import GidEntry, Gpu, Listener
from sparkctl.facts.parse import (
    parse_gids,
    parse_ip_addr,
    parse_listeners,
    parse_meminfo,
    parse_netplan,
    parse_nm_connections,
    parse_nm_devices,
    parse_nvidia_smi,
    parse_probe,
    parse_processes,
    parse_route_dev,
    parse_runtime,
    parse_sections,
    split_terse,
)
from sparkctl.facts.probe import MARK, build_probe, probe_sections
from sparkctl.inventory import parse_inventory

FIXTURES = Path(__file__).resolve().parent / "fixtures"
EXAMPLE = Path(__file__).resolve().parents[2] / "inventories" / "example-pair.yaml"


def fx(name: str) -> str:
    return (FIXTURES / name).read_text()


# --- nmcli terse format --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "fields"),
    [
        ("a:b:c", ["a", "b", "c"]),
        (
            r"lab\: uplink \\ old:495c:802-3-ethernet::no:/x",
            ["lab: uplink \\ old", "495c", "802-3-ethernet", "", "no", "/x"],
        ),
        ("enP7s7:ethernet:unmanaged:", ["enP7s7", "ethernet", "unmanaged", ""]),
        ("", [""]),
        (r"a\\:b", ["a\\", "b"]),
    ],
)
def test_split_terse_undoes_nmcli_escapes(line: str, fields: list[str]) -> None:
    assert split_terse(line) == fields


def test_nm_connections_from_captured_listing_and_settings() -> None:
    cons = parse_nm_connections(fx("nmcli-connection-show.txt"), fx("nmcli-connection-settings.txt"))
    by_name = {c.name: c for c in cons}
    assert [c.name for c in cons] == [
        "Wired connection 2",
        "lo",
        "sparkctl-enp1s0f1np1",
        "Wired connection 1",
        "lab: uplink \\ old",
    ]

    ours = by_name["sparkctl-enp1s0f1np1"]
    assert ours.uuid == "7edf7baf-b1b3-444b-b3d6-9d36d85b9601"
    assert ours.type == "802-3-ethernet"
    assert ours.device == "enp1s0f1np1"
    assert ours.interface_name == "enp1s0f1np1"
    assert ours.autoconnect is True
    assert ours.ipv4_method == "manual"
    assert ours.ipv4_addresses == ["192.168.100.10/24"]
    assert ours.ipv6_method == "disabled"
    assert ours.mtu == 9000
    assert ours.filename == "/etc/NetworkManager/system-connections/sparkctl-enp1s0f1np1.nmconnection"

    # NetworkManager's auto profile, inactive (empty DEVICE) and switched off
    wired1 = by_name["Wired connection 1"]
    assert (wired1.device, wired1.autoconnect, wired1.interface_name) == ("", False, "enp1s0f1np1")
    assert wired1.ipv4_method == "auto" and wired1.ipv4_addresses == [] and wired1.mtu is None

    wired2 = by_name["Wired connection 2"]
    assert (wired2.device, wired2.autoconnect) == ("enP2p1s0f1np1", True)
    assert wired2.filename.startswith("/run/NetworkManager/")

    odd = by_name["lab: uplink \\ old"]
    assert odd.ipv4_addresses == ["192.168.101.50/24", "10.9.9.9/16"]
    assert odd.filename == "/etc/NetworkManager/system-connections/lab: uplink \\ old.nmconnection"
    assert odd.autoconnect is False

    # a loopback profile has no 802-3-ethernet setting: no MTU line at all
    assert by_name["lo"].mtu is None and by_name["lo"].type == "loopback"


def test_nm_connection_without_settings_block_keeps_listing_fields() -> None:
    cons = parse_nm_connections(
        "Wired connection 1:f467ae8a-ad5b-35ff-a6f8-4d6272e55a85:802-3-ethernet:enp1s0f1np1:yes:/run/x\n", ""
    )
    assert len(cons) == 1
    c = cons[0]
    assert (c.name, c.device, c.autoconnect, c.interface_name, c.mtu) == (
        "Wired connection 1",
        "enp1s0f1np1",
        True,
        "",
        None,
    )


def test_nm_connections_skip_short_lines() -> None:
    assert parse_nm_connections("garbage\n\n", "") == []


def test_nm_devices_from_captured_status() -> None:
    devices = parse_nm_devices(fx("nmcli-device-status.txt"))
    assert set(devices) == {"lo", "enp1s0f1np1", "enP2p1s0f1np1", "enP7s7"}
    assert devices["enp1s0f1np1"].state == "connected"
    assert devices["enp1s0f1np1"].connection == "sparkctl-enp1s0f1np1"
    assert devices["enP2p1s0f1np1"].state == "connecting (getting IP configuration)"
    assert devices["enP2p1s0f1np1"].connection == "Wired connection 2"
    assert devices["enP7s7"].state == "unmanaged" and devices["enP7s7"].connection == ""
    assert devices["enP7s7"].type == "ethernet"


def test_nm_device_with_escaped_connection_name() -> None:
    devices = parse_nm_devices(r"enp1s0f1np1:ethernet:connected:lab\: uplink" + "\n")
    assert devices["enp1s0f1np1"].connection == "lab: uplink"


# --- iproute2 ------------------------------------------------------------------------------------------


def test_ip_addr_from_captured_json() -> None:
    ifs = parse_ip_addr(fx("ip-addr-show.json"))
    assert list(ifs) == ["lo", "enP7s7", "enp1s0f1np1", "enP2p1s0f1np1"]
    assert ifs["lo"].ipv4 == ["127.0.0.1/8"]
    assert ifs["enP7s7"].ipv4 == ["10.0.0.11/24"]
    assert (ifs["enp1s0f1np1"].mtu, ifs["enp1s0f1np1"].ipv4) == (9000, ["192.168.100.10/24"])
    # the twin without IPv4 has only an IPv6 link-local address: no IPv4 listed
    assert (ifs["enP2p1s0f1np1"].mtu, ifs["enP2p1s0f1np1"].ipv4) == (1500, [])
    assert all(i.up for i in ifs.values())
    assert ifs["enp1s0f1np1"].operstate == "UP"


def test_ip_addr_down_link_is_not_up() -> None:
    text = (
        '[{"ifindex":5,"ifname":"enp1s0f1np1","flags":["BROADCAST","MULTICAST"],"mtu":1500,'
        '"operstate":"DOWN","addr_info":[]}]'
    )
    iface = parse_ip_addr(text)["enp1s0f1np1"]
    assert (iface.up, iface.operstate, iface.ipv4) == (False, "DOWN", [])


def test_route_get_names_the_device() -> None:
    assert parse_route_dev(fx("ip-route-get.json")) == "enP7s7"


@pytest.mark.parametrize("text", ["", "[]", "not json", "RTNETLINK answers: Network is unreachable"])
def test_route_get_without_a_route(text: str) -> None:
    assert parse_route_dev(text) == ""


# --- RDMA GID table ------------------------------------------------------------------------------------


def test_gids_from_sysfs_dump() -> None:
    entries = parse_gids(fx("sysfs-gids-spark-a.txt"))
    assert [(e.device, e.port, e.index) for e in entries] == [
        ("roceP2p1s0f1", 1, 0),
        ("roceP2p1s0f1", 1, 1),
        ("rocep1s0f1", 1, 0),
        ("rocep1s0f1", 1, 1),
        ("rocep1s0f1", 1, 2),
        ("rocep1s0f1", 1, 3),
    ]
    v2 = entries[-1]
    assert v2 == GidEntry(
        device="rocep1s0f1",
        port=1,
        index=3,
        gid="0000:0000:0000:0000:0000:ffff:c0a8:640a",
        type="RoCE v2",
        ndev="enp1s0f1np1",
    )
    assert entries[-2].type == "IB/RoCE v1"
    assert entries[0].ndev == "enP2p1s0f1np1"


def test_gids_index_order_is_numeric_not_glob_order() -> None:
    entries = parse_gids(fx("sysfs-gids-spark-b.txt"))
    rocep1 = [e for e in entries if e.device == "rocep1s0f1"]
    assert [e.index for e in rocep1] == [0, 1, 2, 3, 4, 5]
    v4 = [(e.index, e.type, e.ipv4) for e in rocep1 if e.ipv4]
    assert v4 == [(4, "IB/RoCE v1", "192.168.100.11"), (5, "RoCE v2", "192.168.100.11")]


@pytest.mark.parametrize(
    ("gid", "ipv4"),
    [
        ("0000:0000:0000:0000:0000:ffff:c0a8:640a", "192.168.100.10"),
        ("0000:0000:0000:0000:0000:ffff:c0a8:650b", "192.168.101.11"),
        ("0000:0000:0000:0000:0000:FFFF:0A00:0001", "10.0.0.1"),
        ("0000:0000:0000:0000:0000:ffff:ffff:ffff", "255.255.255.255"),
        ("fe80:0000:0000:0000:4ebb:47ff:fe2a:10c1", None),
        ("fd00:0000:0000:0064:4ebb:47ff:fe2a:20c1", None),
        ("0000:0000:0000:0000:0000:0000:c0a8:640a", None),  # IPv4-compatible, not IPv4-mapped
        ("0000:0000:0000:0000:0000:0000:0000:0000", None),
        ("0000:0000:0000:0000:ffff:c0a8:640a", None),  # truncated
    ],
)
def test_gid_ipv4_mapping(gid: str, ipv4: str | None) -> None:
    assert GidEntry(device="d", port=1, index=0, gid=gid).ipv4 == ipv4


def test_gids_ignore_other_lines() -> None:
    text = (
        "grep: /sys/class/infiniband/x/ports/1/gid_attrs/types/7: Invalid argument\n"
        "/sys/class/infiniband/rocep1s0f1/ports/1/gids/3:0000:0000:0000:0000:0000:ffff:c0a8:640a\n"
    )
    assert [(e.index, e.type) for e in parse_gids(text)] == [(3, "")]


# --- GPU, processes, sockets, memory, runtime, netplan -------------------------------------------------


def test_nvidia_smi_csv() -> None:
    assert parse_nvidia_smi(fx("nvidia-smi-query-gpu.csv")) == [
        Gpu(name="NVIDIA GB10", compute_cap="12.1", driver="580.142", temperature=41)
    ]


def test_nvidia_smi_without_temperature_or_driver() -> None:
    assert parse_nvidia_smi("NVIDIA GB10, 12.1, 580.142, [N/A]\n")[0].temperature is None
    failed = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n"
    assert parse_nvidia_smi(failed) == []


def test_processes_from_captured_ps() -> None:
    procs = parse_processes(fx("ps-eo-pid-user-args.txt"))
    assert len(procs) == len(fx("ps-eo-pid-user-args.txt").splitlines())
    by_pid = {p.pid: p for p in procs}
    assert by_pid[1].user == "root" and by_pid[1].args == "/sbin/init"
    raylet = by_pid[472]
    assert raylet.user == "spark"
    assert raylet.args.split()[0].endswith("/ray/core/src/ray/raylet/raylet")
    assert "--node_ip_address=192.168.100.10" in raylet.args.split()
    assert by_pid[496].args == "ray::DashboardAgent"
    # quoting and inner spacing of args survive
    assert '"from multiprocessing.forkserver import main;' in by_pid[251].args


def test_listeners_from_captured_ss() -> None:
    found = parse_listeners(fx("ss-ltnH.txt"))
    assert len(found) == 13
    assert Listener(address="*", port=6379) in found
    assert Listener(address="127.0.0.1", port=8265) in found
    assert Listener(address="192.168.100.10", port=52365) in found
    assert Listener(address="0.0.0.0", port=52368) in found
    # Ray's client server, printed as [::ffff:192.168.100.10]:10001: IPv4-mapped is IPv4
    assert Listener(address="192.168.100.10", port=10001) in found
    assert Listener(address="127.0.0.1", port=10001) in found
    assert not any(ln.address.startswith("::ffff:") for ln in found)


def test_listeners_with_scope_ids() -> None:
    text = "LISTEN 0 4096 127.0.0.53%lo:53 0.0.0.0:*\nLISTEN 0 128 [fe80::1%enP7s7]:22 [::]:*\n"
    assert parse_listeners(text) == [
        Listener(address="127.0.0.53", port=53),
        Listener(address="fe80::1", port=22),
    ]


def test_meminfo() -> None:
    mem = parse_meminfo(fx("proc-meminfo.txt"))
    assert mem["MemTotal"] == 24684092
    assert mem["MemAvailable"] == 24019020
    assert mem["Cached"] == 1567348
    assert mem["HugePages_Total"] == 0  # lines without a unit count too


def test_runtime_versions() -> None:
    text = (
        "Python 3.12.3\nray-2.52.1.dist-info\nvllm-0.11.1rc1+cu130.dist-info\ntorch-2.9.0+cu130.dist-info\n"
        "nvidia_nccl_cu13-2.28.3.dist-info\nrequests-2.32.3.dist-info\n"
    )
    rt = parse_runtime(text)
    assert (rt.python, rt.ray, rt.vllm, rt.torch, rt.nccl) == (
        "3.12.3",
        "2.52.1",
        "0.11.1rc1+cu130",
        "2.9.0+cu130",
        "2.28.3",
    )
    img = parse_runtime("image_id=sha256:0123abcd\n")
    assert img.image_id == "sha256:0123abcd" and img.ray == ""


def test_netplan_files() -> None:
    text = (
        "== /etc/netplan/40-cx7.yaml\nnetwork:\n  ethernets:\n    enp1s0f1np1:\n      mtu: 9000\n"
        "== /etc/netplan/50-cloud-init.yaml\nnetwork: {version: 2}\n"
    )
    files = parse_netplan(text)
    assert list(files) == ["/etc/netplan/40-cx7.yaml", "/etc/netplan/50-cloud-init.yaml"]
    assert files["/etc/netplan/40-cx7.yaml"] == "network:\n  ethernets:\n    enp1s0f1np1:\n      mtu: 9000\n"
    assert parse_netplan("") == {}


# --- whole probe output --------------------------------------------------------------------------------

ENV = "# Managed by sparkctl\nNCCL_IB_GID_INDEX=3\nNCCL_SOCKET_IFNAME=enp1s0f1np1\n"
SPEC = "VLLM_DISTRIBUTED_EXECUTOR_CONFIG={} /opt/sparkctl-runtime/bin/vllm serve m --port 8000"
# `docker ps --filter name=sparkctl- --format '{{.Names}} {{.Image}}'` with Ray and a workload in containers
CONTAINERS = "sparkctl-chat nvcr.io/nvidia/vllm:25.11-py3\nsparkctl-ray nvcr.io/nvidia/vllm:25.11-py3\n"


def assembled_probe() -> str:
    """A full probe output as `sh -s` prints it, sections filled from the captured fixtures."""

    def section(name: str, body: str) -> str:
        return f"{MARK} {name}\n{body.rstrip(chr(10))}\n" if body else f"{MARK} {name}\n"

    gids = fx("sysfs-gids-spark-a.txt")
    return "".join(
        [
            section("identity", "nvidia\n/home/nvidia\nspark-a"),
            section("sudo", "nopasswd"),
            section("ssh", "10.0.0.2 53422 10.0.0.11 22\n" + fx("ip-route-get.json")),
            section("ip_addr", fx("ip-addr-show.json")),
            section("nm_running", "running"),
            section("nm_connections", fx("nmcli-connection-show.txt")),
            section("nm_settings", fx("nmcli-connection-settings.txt")),
            section("nm_devices", fx("nmcli-device-status.txt")),
            # cat of a file ending in a newline, then `echo`, then the present mark
            section("env_file", ENV + f"\n{MARK} present"),
            section("non_carry_over", f"{MARK} absent"),
            section(
                "state_files",
                "ray-token.sha256:" + "ab" * 32 + f"\nworkload-chat.pid:4242\nworkload-chat.spec:{SPEC}",
            ),
            section("containers", CONTAINERS),
            section("processes", fx("ps-eo-pid-user-args.txt")),
            section("listeners", fx("ss-ltnH.txt")),
            section("meminfo", "".join(line + "\n" for line in fx("proc-meminfo.txt").splitlines()[:5])),
            section("gids", gids),
            section("gpus", fx("nvidia-smi-query-gpu.csv")),
            section("cuda", "CUDA Version: 13.0"),
            section("netplan", ""),
            section("runtime", "Python 3.12.3\nray-2.52.1.dist-info\nvllm-0.11.0.dist-info"),
            f"{MARK} end\n",
        ]
    )


def test_parse_probe_on_assembled_output() -> None:
    facts = parse_probe("spark-a", assembled_probe())
    assert (facts.host, facts.user, facts.home, facts.hostname) == (
        "spark-a",
        "nvidia",
        "/home/nvidia",
        "spark-a",
    )
    assert facts.sudo_nopasswd is True
    assert (facts.ssh_client_ip, facts.ssh_server_ip, facts.ssh_interface) == (
        "10.0.0.2",
        "10.0.0.11",
        "enP7s7",
    )
    assert facts.interfaces["enp1s0f1np1"].ipv4 == ["192.168.100.10/24"]
    assert facts.nm_running is True
    assert facts.connection("sparkctl-enp1s0f1np1").mtu == 9000
    assert facts.connection("Wired connection 2").device == "enP2p1s0f1np1"
    assert facts.nm_devices["enp1s0f1np1"].connection == "sparkctl-enp1s0f1np1"
    assert facts.env_file == ENV
    assert facts.non_carry_over is None
    assert facts.files == {
        "ray-token.sha256": "ab" * 32,
        "workload-chat.pid": "4242",
        "workload-chat.spec": SPEC,
    }
    assert facts.containers == {
        "sparkctl-chat": "nvcr.io/nvidia/vllm:25.11-py3",
        "sparkctl-ray": "nvcr.io/nvidia/vllm:25.11-py3",
    }
    assert [p.pid for p in facts.processes_matching("raylet/raylet")] == [472]
    assert Listener(address="*", port=6379) in facts.listeners
    assert facts.meminfo_kb["Cached"] == 1567348
    assert len(facts.gids) == 6
    assert facts.gpus[0].compute_cap == "12.1"
    assert facts.cuda_version == "13.0"
    assert facts.netplan == {}
    assert (facts.runtime.python, facts.runtime.ray, facts.runtime.vllm) == ("3.12.3", "2.52.1", "0.11.0")


def test_present_file_sections_keep_their_content() -> None:
    out = f"{MARK} env_file\nA=1\n\n{MARK} present\n{MARK} non_carry_over\n[]\n\n{MARK} present\n{MARK} end\n"
    facts = parse_probe("h", out)
    assert facts.env_file == "A=1\n"
    assert facts.non_carry_over == "[]\n"
    sections = parse_sections(out)
    assert set(sections) == {"env_file", "non_carry_over", "end"}


def test_empty_present_file_is_empty_not_absent() -> None:
    facts = parse_probe("h", f"{MARK} env_file\n\n{MARK} present\n{MARK} end\n")
    assert facts.env_file == ""


def test_parse_probe_on_the_captured_run() -> None:
    """The probe script run by a real `sh` on a host with NetworkManager and Ray (no GPU/RDMA there)."""
    facts = parse_probe("spark-a", fx("probe-capture-spark-a.txt"))
    assert (facts.user, facts.home, facts.hostname) == ("spark", "/home/spark", "spark-a")
    assert facts.sudo_nopasswd is False
    assert facts.ssh_interface == "enP7s7" and facts.ssh_server_ip == "10.0.0.11"
    assert facts.nm_running is True
    assert len(facts.nm_connections) == 5
    assert facts.env_file is None and facts.non_carry_over is None
    assert facts.files == {}
    assert facts.containers == {}  # a probe from before the containers section
    assert facts.gids == [] and facts.gpus == [] and facts.cuda_version == ""
    assert facts.runtime.ray == "2.60.0" and facts.runtime.python == "3.11.2"
    assert any("--node_ip_address=192.168.100.10" in p.args for p in facts.processes)
    assert facts.meminfo_kb["MemTotal"] > 0


def test_output_cut_short_still_parses_what_arrived() -> None:
    cut = assembled_probe().split(f"{MARK} processes")[0]
    facts = parse_probe("spark-a", cut)
    assert facts.interfaces and facts.processes == [] and facts.gids == []


# --- the probe script itself ---------------------------------------------------------------------------


def _inventories() -> list:
    text = EXAMPLE.read_text()
    image = text.replace("  venv: /opt/sparkctl-runtime", "  image: nvcr.io/nvidia/vllm:25.11-py3")
    return [parse_inventory(text), parse_inventory(image)]


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX sh")
@pytest.mark.parametrize("inv", _inventories(), ids=["venv", "image"])
def test_probe_script_is_valid_sh(inv) -> None:
    for host in inv.hosts:
        script = build_probe(inv, host)
        r = subprocess.run(["sh", "-n"], input=script, capture_output=True, text=True, timeout=10)
        assert r.returncode == 0, r.stderr
        marks = [line for line in script.splitlines() if line.startswith(f"echo '{MARK} ")]
        assert len(marks) == len(set(marks))
        assert script.rstrip().endswith(f"echo '{MARK} end'")
        # every netplan file is read: the renderer of a twin's definition can come from another file
        assert "/etc/netplan/*.yaml" in script and "/run/netplan/*.yaml" in script


def test_probe_only_reads() -> None:
    inv = _inventories()[0]
    script = build_probe(inv, inv.hosts[0])
    for verb in (
        "nmcli con add",
        "connection add",
        "connection modify",
        "connection up",
        " rm ",
        "install ",
        "sysctl -w",
        "ray start",
        "kill ",
    ):
        assert verb not in script


STUBS = {
    "ip": """case "$*" in
  "-j addr show") cat "$FX/ip-addr-show.json" ;;
  "-j route get "*) cat "$FX/ip-route-get.json" ;;
  *) exit 1 ;;
esac""",
    "nmcli": """case "$*" in
  "-t -f RUNNING general") echo running ;;
  "-t -f NAME,UUID,TYPE,DEVICE,AUTOCONNECT,FILENAME connection show") cat "$FX/nmcli-connection-show.txt" ;;
  "-t -f UUID connection show") cat "$FX/nmcli-uuids.txt" ;;
  "-t -f DEVICE,TYPE,STATE,CONNECTION device status") cat "$FX/nmcli-device-status.txt" ;;
  "-t -f connection.uuid,"*" connection show uuid "*)
     # like nmcli: the profiles in the order given, a blank line between them
     [ -n "$NMCLI_ONE_ID" ] && [ $# -gt 7 ] && exit 2
     first=1
     while [ $# -gt 0 ]; do
       if [ "$1" = uuid ]; then
         shift; [ $first = 1 ] || echo; first=0
         awk -v u="connection.uuid:$1" 'BEGIN{RS="";ORS="\\n"} index($0,u)==1' "$FX/nmcli-connection-settings.txt"
       fi
       shift
     done ;;
  *) exit 1 ;;
esac""",
    "ps": 'cat "$FX/ps-eo-pid-user-args.txt"',
    "docker": """case "$*" in
  "ps --filter name=sparkctl- --format {{.Names}} {{.Image}}") printf 'sparkctl-ray nvcr.io/nvidia/vllm:25.11-py3\\n' ;;
  *) exit 1 ;;
esac""",
    "ss": 'cat "$FX/ss-ltnH.txt"',
    "sudo": "exit 0",
    "id": "echo nvidia",
    "hostname": "echo spark-a",
    "nvidia-smi": """case "$*" in
  --query-gpu=*) cat "$FX/nvidia-smi-query-gpu.csv" ;;
  *) echo '| NVIDIA-SMI 580.142    Driver Version: 580.142    CUDA Version: 13.0 |' ;;
esac""",
}


@pytest.mark.skipif(not Path("/proc/meminfo").exists() or shutil.which("sh") is None, reason="needs Linux and sh")
@pytest.mark.parametrize("one_id", [False, True], ids=["nmcli-many-ids", "nmcli-one-id"])
def test_probe_script_output_parses_back(tmp_path: Path, one_id: bool) -> None:
    """Run the real probe with `sh -s` against stub tools printing the fixtures; parse what it printed.

    `one_id`: an nmcli that refuses several profiles in one call; the probe falls back to one call per profile.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STUBS.items():
        tool = bin_dir / name
        tool.write_text("#!/bin/sh\n" + body + "\n")
        tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    fixtures = tmp_path / "fx"
    shutil.copytree(FIXTURES, fixtures)
    uuids = re.findall(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", fx("nmcli-connection-show.txt"))
    (fixtures / "nmcli-uuids.txt").write_text("".join(u + "\n" for u in uuids))
    # a venv with a python and dist-info folders; the sparkctl state under $HOME
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("#!/bin/sh\necho 'Python 3.12.3'\n")
    (venv / "bin" / "python").chmod(0o755)
    site = venv / "lib" / "python3.12" / "site-packages"
    for d in ("ray-2.52.1.dist-info", "torch-2.9.0.dist-info", "requests-2.32.3.dist-info"):
        (site / d).mkdir(parents=True)
    home = tmp_path / "home"
    state = home / ".local" / "state" / "sparkctl"
    state.mkdir(parents=True)
    (state / "ray-token").write_text("tok-0123456789\n")
    (state / "workload-chat.pid").write_text("472\n")
    (state / "workload-chat.spec").write_text(SPEC + "\n")
    nco = home / ".config" / "vllm"
    nco.mkdir(parents=True)
    (nco / "ray_non_carry_over_env_vars.json").write_text('[\n  "NCCL_IB_GID_INDEX"\n]\n')
    # the example's model in the hub cache: one blob, the snapshot's link to it, refs/main; and sparkctl's record
    repo = home / ".cache" / "huggingface" / "hub" / "models--Qwen--Qwen3-30B-A3B-Instruct-2507"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / ("ab" * 32)).write_bytes(b"x" * 1234)
    (repo / "blobs" / "cd.incomplete").write_bytes(b"y" * 10)
    (repo / "snapshots" / "c0ffee").mkdir(parents=True)
    (repo / "snapshots" / "c0ffee" / "model.safetensors").symlink_to(f"../../blobs/{'ab' * 32}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c0ffee")
    (state / "weights").mkdir()
    (state / "weights" / "models--Qwen--Qwen3-30B-A3B-Instruct-2507@main.json").write_text('{"commit": "c0ffee"}\n')

    text = EXAMPLE.read_text().replace("  venv: /opt/sparkctl-runtime", f"  venv: {venv}")
    inv = parse_inventory(text)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(home),
        "FX": str(fixtures),
        "SSH_CONNECTION": "10.0.0.2 53422 10.0.0.11 22",
        "TMPDIR": str(tmp_path / "tmp"),
    }
    if one_id:
        env["NMCLI_ONE_ID"] = "1"
    (tmp_path / "tmp").mkdir()
    r = subprocess.run(
        ["sh", "-s"],
        input=build_probe(inv, inv.host("spark-a")),
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    facts = parse_probe("spark-a", r.stdout)

    assert (facts.user, facts.hostname, facts.sudo_nopasswd) == ("nvidia", "spark-a", True)
    assert facts.ssh_interface == "enP7s7"
    assert facts.nm_running is True
    assert facts.connection("sparkctl-enp1s0f1np1").mtu == 9000
    assert facts.connection("lab: uplink \\ old").ipv4_addresses == ["192.168.101.50/24", "10.9.9.9/16"]
    # every listed profile got its settings (the one without an ethernet setting reads as mtu "auto")
    blocks = fx("nmcli-connection-settings.txt").strip().split("\n\n")
    assert {c.uuid for c in facts.nm_connections if c.ipv4_method} == {b.split("\n")[0].split(":")[1] for b in blocks}
    assert facts.non_carry_over == '[\n  "NCCL_IB_GID_INDEX"\n]\n'
    assert facts.files["ray-token.sha256"] == hashlib.sha256(b"tok-0123456789\n").hexdigest()
    assert facts.files["workload-chat.pid"] == "472"
    assert facts.files["workload-chat.spec"] == SPEC
    assert facts.containers == {"sparkctl-ray": "nvcr.io/nvidia/vllm:25.11-py3"}
    assert facts.gpus[0].name == "NVIDIA GB10" and facts.cuda_version == "13.0"
    assert (facts.runtime.python, facts.runtime.ray, facts.runtime.torch) == ("3.12.3", "2.52.1", "2.9.0")
    assert len(facts.processes) == len(fx("ps-eo-pid-user-args.txt").splitlines())
    assert facts.meminfo_kb["MemTotal"] > 0
    assert set(facts.meminfo_kb) <= {"MemTotal", "MemFree", "MemAvailable", "Cached", "Buffers"}
    assert os.environ.get("FX") is None  # the stub environment did not leak into the test process
    held = facts.weights["Qwen/Qwen3-30B-A3B-Instruct-2507@main"]
    assert held.files == {f"blobs/{'ab' * 32}": 1234, "blobs/cd.incomplete": 10, "refs/main": 6}
    assert held.links == {"snapshots/c0ffee/model.safetensors": f"../../blobs/{'ab' * 32}"}
    assert held.refs == {"main": "c0ffee"} and held.manifest == '{"commit": "c0ffee"}'
    assert facts.hf_free > 0
    assert list(facts.state_free) == [str(state)] and facts.state_free[str(state)] > 0  # logs: on the same filesystem

    # The sections run side by side, yet print exactly what they print one after the other; nothing is left behind.
    assert list((tmp_path / "tmp").iterdir()) == []
    sections = probe_sections(inv, inv.host("spark-a"))
    one_by_one = (
        "export LC_ALL=C; _sp=$(mktemp -d)\n"
        + "".join(f"echo '{MARK} {name}'\n{cmd}\n" for name, cmd in sections.items())
        + f"echo '{MARK} end'\n"
    )
    seq = subprocess.run(["sh", "-s"], input=one_by_one, capture_output=True, text=True, env=env, timeout=30)
    assert seq.returncode == 0, seq.stderr
    live = ("meminfo", "hf_free", "state_free")  # this machine's /proc and free disk, changing between the two runs
    assert [k for k in parse_sections(r.stdout)] == [*sections, "end"]
    assert {k: v for k, v in parse_sections(r.stdout).items() if k not in live} == {
        k: v for k, v in parse_sections(seq.stdout).items() if k not in live
    }


def test_state_free_keeps_one_path_per_filesystem() -> None:
    from sparkctl.facts.parse import parse_state_free

    # `df -P -B1 DIR | awk 'NR==2 {print $4, $6, d}'` for the state directory and its logs directory
    same = "51234567890 / /home/nvidia/.local/state/sparkctl\n51234567890 / /home/nvidia/.local/state/sparkctl/logs\n"
    assert parse_state_free(same) == {"/home/nvidia/.local/state/sparkctl": 51234567890}
    apart = "1048576 /home/nvidia/.local/state/sparkctl /home/nvidia/.local/state/sparkctl\n" + (
        "900000000 /srv/logs /home/nvidia/.local/state/sparkctl/logs\n"
    )
    assert parse_state_free(apart) == {
        "/home/nvidia/.local/state/sparkctl": 1048576,
        "/home/nvidia/.local/state/sparkctl/logs": 900000000,
    }
    assert parse_state_free("") == {} and parse_state_free("df: /x: No such file\n") == {}


def test_gcs_links_from_ss_with_and_without_the_state_column() -> None:
    from sparkctl.facts.parse import parse_tcp_links

    text = (
        "0      0      192.168.100.11:51234 192.168.100.10:6379\n"
        "ESTAB  0      0      [::ffff:192.168.100.10]:6379 [::ffff:192.168.100.11]:51234\n"
        "garbage\n"
    )
    links = parse_tcp_links(text)
    assert [(x.local, x.local_port, x.peer, x.peer_port) for x in links] == [
        ("192.168.100.11", 51234, "192.168.100.10", 6379),
        ("192.168.100.10", 6379, "192.168.100.11", 51234),
    ]


# nvidia-smi's first summary line before and from the R610 drivers (580.142 as the testbed's GB10 prints it;
# 610.43.02 as quoted in sgl-project/sglang#27487).
SUMMARY_580 = "| NVIDIA-SMI 580.142              Driver Version: 580.142        CUDA Version: 13.0     |"
SUMMARY_610 = "| NVIDIA-SMI 610.43.02              KMD Version: 610.43.02     CUDA UMD Version: 13.3     |"


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs sh")
@pytest.mark.parametrize(
    ("line", "version"), [(SUMMARY_580, "13.0"), (SUMMARY_610, "13.3"), ("No devices were found", "")]
)
def test_the_cuda_version_is_read_from_either_summary_spelling(tmp_path: Path, line: str, version: str) -> None:
    """The probe's own `cuda` section, run by sh against an nvidia-smi printing that line, then parsed."""
    from sparkctl.facts.parse import parse_cuda_version
    from sparkctl.facts.probe import probe_sections
    from sparkctl.inventory import example_inventory_text, parse_inventory

    inv = parse_inventory(example_inventory_text(), "example")
    tool = tmp_path / "nvidia-smi"
    tool.write_text(f"#!/bin/sh\necho '+------+'\necho '{line}'\n")
    tool.chmod(0o755)
    cmd = probe_sections(inv, inv.hosts[0])["cuda"]
    out = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, check=True,
                         env={"PATH": f"{tmp_path}:/usr/bin:/bin"}).stdout  # fmt: skip
    assert parse_cuda_version(out) == version


R610_SMI = f"""#!/bin/sh
case "$*" in
  *driver_version*) echo 'Field "driver_version" is not a valid field to query.' >&2; exit 2 ;;
  --query-gpu=*) echo 'NVIDIA GB10, 12.1, 44' ;;
  *) echo '+------+'; echo '{SUMMARY_610}' ;;
esac
"""
NA_SMI = f"""#!/bin/sh
case "$*" in
  --query-gpu=*) echo 'NVIDIA GB10, 12.1, [N/A], 44' ;;
  *) echo '+------+'; echo '{SUMMARY_610}' ;;
esac
"""
OLD_SMI = f"""#!/bin/sh
case "$*" in
  --query-gpu=*) echo 'NVIDIA GB10, 12.1, 580.142, 41' ;;
  *) echo '+------+'; echo '{SUMMARY_580}' ;;
esac
"""


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs sh")
@pytest.mark.parametrize(
    ("tool", "driver", "temperature"),
    [(OLD_SMI, "580.142", 41), (R610_SMI, "610.43.02", 44), (NA_SMI, "610.43.02", 44)],
    ids=["580-query", "query-refuses-driver_version", "query-gives-no-driver"],
)
def test_the_driver_is_read_from_the_query_or_else_the_summary(
    tmp_path: Path, tool: str, driver: str, temperature: int
) -> None:
    """The probe's `gpus` and `cuda` sections, run by sh against an nvidia-smi whose query answers the driver, refuses
    the driver_version field, or prints [N/A] for it; the summary's "Driver Version" / "KMD Version" fills in."""
    from sparkctl.facts.parse import parse_probe
    from sparkctl.facts.probe import MARK, probe_sections
    from sparkctl.inventory import example_inventory_text, parse_inventory

    inv = parse_inventory(example_inventory_text(), "example")
    (tmp_path / "nvidia-smi").write_text(tool)
    (tmp_path / "nvidia-smi").chmod(0o755)
    sections = probe_sections(inv, inv.hosts[0])
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    out = ""
    for name in ("gpus", "cuda"):
        run = subprocess.run(["sh", "-c", sections[name]], capture_output=True, text=True, check=True, env=env)
        out += f"{MARK} {name}\n" + run.stdout
    facts = parse_probe("spark-a", out)
    assert facts.gpus == [Gpu(name="NVIDIA GB10", compute_cap="12.1", driver=driver, temperature=temperature)]


def test_the_kernel_and_its_cma_lines_are_read() -> None:
    """`uname -r`, /proc/cmdline and the CMA lines of /proc/meminfo as a 7.0 nvidia kernel prints them (values quoted
    in MiaAI-Lab/DeepSeek-v4-Flash-DSpark-2x-DGX-Spark#259)."""
    from sparkctl.facts.parse import parse_probe

    out = (
        f"{MARK} meminfo\nMemTotal:       127535216 kB\nMemFree:        92274688 kB\nCmaTotal:              0 kB\n"
        "CmaFree:          940604 kB\n"
        f"{MARK} kernel\n7.0.0-1019-nvidia\nBOOT_IMAGE=/boot/vmlinuz-7.0.0-1019-nvidia root=UUID=0b7e ro quiet splash\n"
        f"{MARK} end\n"
    )
    facts = parse_probe("spark-a", out)
    assert facts.kernel == "7.0.0-1019-nvidia" and facts.kernel_cmdline.endswith("quiet splash")
    assert (facts.meminfo_kb["CmaTotal"], facts.meminfo_kb["CmaFree"]) == (0, 940604)


def test_twin_links_from_sysfs() -> None:
    """The `links` section: a ConnectX-7 function (speed in Mb/s, PCIe "32.0 GT/s PCIe" x4 as sysfs prints them) and a
    veth (speed -1 or 10000, no PCI device: empty fields)."""
    from sparkctl.facts.parse import parse_links

    text = "enp1s0f1np1|200000|4|32.0 GT/s PCIe|4|32.0 GT/s PCIe\nenP2p1s0f1np1|-1||||\nveth0|10000||||\n"
    links = parse_links(text)
    assert links["enp1s0f1np1"].model_dump() == {
        "interface": "enp1s0f1np1", "speed_mbps": 200000, "pcie_width": 4, "pcie_speed": "32.0 GT/s PCIe",
        "pcie_max_width": 4, "pcie_max_speed": "32.0 GT/s PCIe",
    }  # fmt: skip
    assert links["enP2p1s0f1np1"].speed_mbps is None and links["enP2p1s0f1np1"].pcie_width is None
    assert links["veth0"].speed_mbps == 10000 and links["veth0"].pcie_width is None


# --- the NCCL libraries (probe section nccl_libs) ----------------------------------------------------------


def test_nccl_libs_section_gives_both_builds() -> None:
    from sparkctl.facts.parse import parse_nccl_libs

    libs = parse_nccl_libs((FIXTURES / "probe-nccl-libs-spark.txt").read_text())
    assert set(libs) == {"runtime", "system"}
    assert libs["runtime"].build_id == "a7f420a1" and libs["runtime"].size == 219_000_000
    assert libs["runtime"].version == ""  # a wheel's libnccl.so.2 names no version: the dist-info does
    assert libs["system"].version == "2.28.9" and libs["system"].build_id == "c0db9360"
    assert libs["system"].path == "/usr/lib/aarch64-linux-gnu/libnccl.so.2"


def test_nccl_libs_reach_the_facts_from_both_sections() -> None:
    """Container mode: the image's libraries arrive in the `runtime` section, the host's in `nccl_libs`."""
    from sparkctl.facts.probe import MARK

    wheel = "/usr/local/lib/python3.12/dist-packages/nvidia/nccl/lib/libnccl.so.2"
    image_line = f"nccl-lib\truntime\t{wheel}\t{wheel}\t219000000\ta7f420a1"
    host = (FIXTURES / "probe-nccl-libs-spark.txt").read_text().splitlines()[1]
    out = f"{MARK} runtime\nPython 3.12.3\n{image_line}\n{MARK} nccl_libs\n{host}\n{MARK} end\n"
    facts = parse_probe("spark-a", out)
    assert facts.nccl_libs["runtime"].path.startswith("/usr/local/lib/python3.12/dist-packages/")
    assert facts.nccl_libs["system"].build_id == "c0db9360"


@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs binutils readelf to compare with")
def test_nccl_reader_reads_the_build_id_readelf_prints(tmp_path: Path) -> None:
    """The probe's reader, run as the probe runs it (paths on stdin), on a real ELF library of this machine."""
    import sys

    from sparkctl.facts.parse import parse_nccl_libs
    from sparkctl.facts.probe import NCCL_HOST

    lib = Path(sys.executable).resolve()
    readelf = subprocess.run(["readelf", "-n", str(lib)], capture_output=True, text=True, check=True).stdout
    want = re.search(r"Build ID: ([0-9a-f]+)", readelf)
    if want is None:
        pytest.skip(f"{lib} has no build id")
    link = tmp_path / "libnccl.so.2"
    link.symlink_to(lib)
    out = subprocess.run(
        [sys.executable, "-c", NCCL_HOST], input=f"system {link}\n", capture_output=True, text=True, check=True
    ).stdout
    got = parse_nccl_libs(out)["system"]
    assert got.build_id == want.group(1)
    assert got.real == str(lib) and got.size == lib.stat().st_size
