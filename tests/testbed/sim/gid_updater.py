"""SIMULATED RoCE GID table of a fake DGX Spark (sparkctl testbed; no RDMA hardware here).

Runs inside one host (as root, started by boot.sh) and keeps the per-host table under
<sim>/ib/<rdma device>/ports/1/ in step with the twin netdevs, the way the mlx5 driver does:

  index 0, 1           link-local fe80 GID from the netdev MAC (RoCE v1, RoCE v2)
  index 2 .. k-2       filler entries (an IPv6 ULA GID), present only when k > 3: real pairs
                       have been seen with the IPv4 entries further down the table
  index k-1, k         ::ffff:<IPv4> (RoCE v1, RoCE v2), only while the netdev has an IPv4 address;
                       k is read from <sim>/gid_index on every pass (default 3)
  unused entries       all-zero GID; types/ndevs files are empty (the kernel returns EINVAL there)

After every pass it writes the pass count to <sim>/updater_passes.
It also keeps ports/1/state, phys_state and active_mtu consistent with the netdev.
/sys/class/infiniband/<dev> inside the host is a symlink to <sim>/ib/<dev>.
Written for Debian's /usr/bin/python3; standard library only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

POLL_SECONDS = 0.3
ZERO_GID = "0000:0000:0000:0000:0000:0000:0000:0000"
V1 = "IB/RoCE v1"
V2 = "RoCE v2"
IB_MTUS = ((4096, 5), (2048, 4), (1024, 3), (512, 2), (256, 1))


def format_gid(raw: bytes) -> str:
    """16 bytes -> the kernel's %pI6 form: 8 groups of 4 hex digits."""
    hexed = raw.hex()
    return ":".join(hexed[i : i + 4] for i in range(0, 32, 4))


def link_local_gid(mac: str) -> str:
    octets = bytes(int(x, 16) for x in mac.split(":"))
    eui = bytes([octets[0] ^ 0x02]) + octets[1:3] + b"\xff\xfe" + octets[3:6]
    return format_gid(b"\xfe\x80" + b"\x00" * 6 + eui)


def ula_gid(mac: str) -> str:
    octets = bytes(int(x, 16) for x in mac.split(":"))
    eui = bytes([octets[0] ^ 0x02]) + octets[1:3] + b"\xff\xfe" + octets[3:6]
    return format_gid(b"\xfd\x00\x0b\x10" + b"\x00" * 4 + eui)


def ipv4_gid(address: str) -> str:
    return format_gid(b"\x00" * 10 + b"\xff\xff" + bytes(int(x) for x in address.split(".")))


def build_table(mac: str, ipv4: list[str], k: int, size: int) -> list[tuple[str, str]]:
    """(gid, type) per index; type "" marks an unused entry."""
    table = [(ZERO_GID, "")] * size
    if not mac or mac == "00:00:00:00:00:00":
        return table
    ll = link_local_gid(mac)
    table[0] = (ll, V1)
    table[1] = (ll, V2)
    filler = ula_gid(mac)
    for i in range(2, k - 1):
        table[i] = (filler, V1 if i % 2 == 0 else V2)
    for n, address in enumerate(ipv4):
        v1, v2 = k - 1 + 2 * n, k + 2 * n
        if v2 >= size:
            break
        gid = ipv4_gid(address)
        table[v1] = (gid, V1)
        table[v2] = (gid, V2)
    return table


def active_mtu(netdev_mtu: int) -> str:
    # RoCE payload MTU is the largest IB MTU that fits the Ethernet MTU minus headers.
    for mtu, code in IB_MTUS:
        if mtu + 100 <= netdev_mtu:
            return f"{mtu} ({code})"
    return "256 (1)"


def read(path: Path, default: str = "") -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return default


def write_if_changed(path: Path, content: str) -> None:
    try:
        if path.read_text() == content:
            return
    except OSError:
        pass
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(content)
    os.replace(tmp, path)


def ipv4_by_netdev() -> dict[str, list[str]]:
    out = subprocess.run(["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True, check=True).stdout
    result: dict[str, list[str]] = {}
    for link in json.loads(out or "[]"):
        addrs = [a["local"] for a in link.get("addr_info", []) if a.get("family") == "inet"]
        result[link["ifname"]] = addrs
    return result


def update(sim: Path) -> None:
    config = json.loads((sim / "devices.json").read_text())
    k = int(read(sim / "gid_index", "3"))
    size = int(config["table_size"])
    addresses = ipv4_by_netdev()
    for dev in config["devices"]:
        netdev, port = dev["netdev"], sim / "ib" / dev["rdma_device"] / "ports" / "1"
        sysnet = Path("/sys/class/net") / netdev
        mac = read(sysnet / "address")
        table = build_table(mac, addresses.get(netdev, []), k, size)
        for i, (gid, kind) in enumerate(table):
            write_if_changed(port / "gids" / str(i), gid + "\n")
            write_if_changed(port / "gid_attrs" / "types" / str(i), kind + "\n" if kind else "")
            write_if_changed(port / "gid_attrs" / "ndevs" / str(i), netdev + "\n" if kind else "")
        up = read(sysnet / "operstate") == "up"
        write_if_changed(port / "state", "4: ACTIVE\n" if up else "1: DOWN\n")
        write_if_changed(port / "phys_state", "5: LinkUp\n" if up else "3: Disabled\n")
        write_if_changed(port / "active_mtu", active_mtu(int(read(sysnet / "mtu", "1500"))) + "\n")


def main() -> int:
    sim = Path(sys.argv[1])
    passes = 0
    while True:
        try:
            update(sim)
        except Exception as exc:  # keep simulating; a broken pass must not stop the table
            print(f"gid_updater: {exc!r}", file=sys.stderr, flush=True)
        passes += 1
        # Lets the testbed wait for "the table reflects what I just changed".
        write_if_changed(sim / "updater_passes", f"{passes}\n")
        time.sleep(POLL_SECONDS)


if __name__ == "__main__":
    raise SystemExit(main())
