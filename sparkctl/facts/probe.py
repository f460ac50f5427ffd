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
NMCLI_SETTINGS = "connection.uuid,connection.interface-name,ipv4.method,ipv4.addresses,ipv6.method,802-3-ethernet.mtu"
NVIDIA_QUERY = "--query-gpu=name,compute_cap,driver_version,temperature.gpu"
DIGESTED_FILES = ("ray-token", "embed_worker.py")


def probe_sections(inventory: Inventory, host: Host) -> dict[str, str]:
    """Section name -> the shell commands printing it, in the order of the output."""
    q = shlex.quote
    twins = " ".join(q(t.interface) for t in host.fabric)
    state = f'"$HOME"/{q(paths.STATE)}'
    rt = inventory.runtime
    gcs = int(inventory.ray.port)
    if rt.venv:
        venv = q(rt.venv)
        runtime = (
            f"{venv}/bin/python -V 2>&1; "
            f'for d in {venv}/lib/python3*/site-packages/*.dist-info; do echo "${{d##*/}}"; done 2>/dev/null '
            "| grep -E '^(ray|vllm|torch|nvidia_nccl_cu[0-9]+)-' || true"
        )
    else:
        runtime = f"docker image inspect --format 'image_id={{{{.Id}}}}' {q(rt.image or '')} 2>/dev/null || true"
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
        "env_file": f"cat {q(paths.ENV_FILE)} 2>/dev/null && echo && echo '{MARK} present' || echo '{MARK} absent'",
        "non_carry_over": f"cat \"$HOME\"/{q(paths.NON_CARRY_OVER)} 2>/dev/null && echo && echo '{MARK} present' "
        f"|| echo '{MARK} absent'",
        "state_files": (
            f"cd {state} 2>/dev/null && {{ sha256sum {' '.join(DIGESTED_FILES)} 2>/dev/null "
            '| while read -r d f; do echo "$f.sha256:$d"; done; '
            "grep -H '' workload-*.pid workload-*.spec 2>/dev/null; }; true"
        ),
        "firewall": (
            f"cat {q(paths.FIREWALL_FILE)} 2>/dev/null && echo && echo '{MARK} present' || echo '{MARK} absent'"
        ),
        "containers": (
            "command -v docker >/dev/null && docker ps --filter name=sparkctl- --format '{{.Names}} {{.Image}}' "
            "2>/dev/null; true"
        ),
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
        "netplan": (
            f'for f in /etc/netplan/*.yaml; do [ -f "$f" ] || continue; for i in {twins}; do '
            'grep -q -- "$i" "$f" 2>/dev/null && { echo "== $f"; cat "$f"; break; }; done; done; true'
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
    sections = probe_sections(inventory, host)
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
