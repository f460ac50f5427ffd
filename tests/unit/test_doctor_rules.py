"""The doctor's rule table, case by case: host facts in, the finding each rule gives out.

Every rule id in sparkctl/data/rules.yaml needs cases here: at least one where it passes and one where it is
violated at its level (plus the alternative level a rule may give, such as the driver's `bad_level`). A rule added
to the table without cases fails `test_every_rule_has_cases`.

A case starts from a healthy converged pair (the facts of tests/unit/cases/up-converged-pair.yaml plus a GB10,
CUDA 13, the same runtime on both hosts, a Spark's /proc/meminfo and Ray listening on the fabric only), replaces
some HostFacts fields per host, and says what the rule must find: the worst level among its findings (None: the
rule has nothing to judge), the subject of a finding at that level, and fragments of its evidence and fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from sparkctl.doctor.evaluate import blocking, evaluate
from sparkctl.doctor.evaluators import EVALUATORS, CheckContext
from sparkctl.doctor.rules import Finding, Level, Rule, load_rules
from sparkctl.facts.models import GidEntry, Gpu, HostFacts, Interface, Listener, NmDevice, Process, Runtime
from sparkctl.facts.parse import parse_gids, parse_listeners, parse_meminfo, parse_nvidia_smi, parse_probe
from sparkctl.inventory import parse_inventory
from sparkctl.inventory.models import Inventory
from sparkctl.plan.context import fresh_facts

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"
RULES_FILE = HERE.parents[1] / "sparkctl" / "data" / "rules.yaml"
RULES: list[Rule] = list(load_rules().rules)
RULE = {r.id: r for r in RULES}
A, B = "spark-a", "spark-b"
SEVERITY = {"pass": 0, "warn": 1, "fail": 2}

# --- the inventory: the example pair, workloads and runtime per case ----------------------------------------

PAIR = """\
cluster: spark-pair
ssh: {user: nvidia}
hosts:
  - name: spark-a
    address: 10.0.0.11
    fabric:
      - {interface: enp1s0f1np1, address: 192.168.100.10/24, rdma_device: rocep1s0f1}
      - {interface: enP2p1s0f1np1, address: 192.168.101.10/24, rdma_device: roceP2p1s0f1}
  - name: spark-b
    address: 10.0.0.12
    fabric:
      - {interface: enp1s0f1np1, address: 192.168.100.11/24, rdma_device: rocep1s0f1}
      - {interface: enP2p1s0f1np1, address: 192.168.101.11/24, rdma_device: roceP2p1s0f1}
runtime: RUNTIME
ray: {head: spark-a, port: 6379}
"""
VENV = "{venv: /opt/sparkctl-runtime}"
IMAGE = "{image: 'nvcr.io/nvidia/vllm:25.11-py3'}"
CHAT: dict[str, Any] = {
    "name": "chat",
    "engine": "vllm",
    "model": "Qwen/Qwen3-30B-A3B-Instruct-2507",
    "tensor_parallel_size": 2,
    "gpu_memory_utilization": 0.85,
    "port": 8000,
    "extra_args": ["--max-model-len", "32768"],
}
EMBED: dict[str, Any] = {"name": "emb", "engine": "embed", "port": 8001}


def chat(**changes: Any) -> dict[str, Any]:
    """The example's chat workload with some fields changed."""
    return CHAT | changes


def inventory(workloads: tuple[dict[str, Any], ...] = (CHAT,), runtime: str = VENV) -> Inventory:
    text = PAIR.replace("RUNTIME", runtime) + yaml.safe_dump({"workloads": list(workloads)}, sort_keys=False)
    return parse_inventory(text, "doctor-case.yaml")


# --- the facts: a healthy converged pair, and edits of it ---------------------------------------------------


def _converged() -> dict[str, HostFacts]:
    case = yaml.safe_load((HERE / "cases" / "up-converged-pair.yaml").read_text())
    return {host: HostFacts.model_validate({"host": host, **data}) for host, data in case["facts"].items()}


def patched(facts: HostFacts, **fields: Any) -> HostFacts:
    """`facts` with some top-level fields replaced (validated again, like a probe's output)."""
    return HostFacts.model_validate(facts.model_dump() | fields)


GB10 = parse_nvidia_smi((FIXTURES / "nvidia-smi-query-gpu.csv").read_text())
RUNTIME = Runtime(python="3.12.3", ray="2.52.1", vllm="0.11.2", torch="2.9.0", nccl="2.28.9")
IMAGE_ID = "sha256:4c1e2b7a9d0f3e5c8b6a1d2f4e7c9b0a3d5f7e1c2b4a6d8f0e3c5b7a9d1f2e4c"
# A Spark: about 119 GiB usable of its 128 GB, little page cache.
SPARK_MEMINFO = {"MemTotal": 124_800_000, "MemFree": 110_200_000, "MemAvailable": 116_900_000, "Cached": 6_100_000}
FABRIC_LISTENERS = {
    A: [
        *(Listener(address="192.168.100.10", port=p) for p in (6379, 6381, 6382, 10001, 52365, 52366, 52367, 52368)),
        Listener(address="127.0.0.1", port=8265),
        Listener(address="10.0.0.11", port=8000),
    ],
    B: [Listener(address="192.168.100.11", port=p) for p in (6381, 6382, 52365, 52366, 52367, 52368)],
}
HEALTHY: dict[str, HostFacts] = {
    name: patched(
        f, gpus=GB10, cuda_version="13.0", runtime=RUNTIME, meminfo_kb=SPARK_MEMINFO, listeners=FABRIC_LISTENERS[name]
    )
    for name, f in _converged().items()
}
FABRIC = {A: ("192.168.100.10", "192.168.101.10"), B: ("192.168.100.11", "192.168.101.11")}
TWINS = ("enp1s0f1np1", "enP2p1s0f1np1")
ALL_PINGS_OK: dict[tuple[str, str, str], tuple[bool, str]] = {
    (host, TWINS[j], FABRIC[peer][j]): (True, "") for host, peer in ((A, B), (B, A)) for j in range(2)
}


def interfaces(host: str, **changes: Interface | None) -> dict[str, Interface]:
    """The healthy host's interfaces, some replaced, added, or (None) removed."""
    result = dict(HEALTHY[host].interfaces)
    for name, iface in changes.items():
        if iface is None:
            result.pop(name, None)
        else:
            result[name] = iface
    return result


def gid_table(device: str, ndev: str, address: str | None, roce_v2_index: int = 3) -> list[GidEntry]:
    """A port's GID table: link-local v1/v2 at 0/1, and the IPv4-mapped pair ending at `roce_v2_index`."""
    link_local = "fe80:0000:0000:0000:4ebb:47ff:fe2a:10c1"
    table = [
        GidEntry(device=device, port=1, index=0, gid=link_local, type="IB/RoCE v1", ndev=ndev),
        GidEntry(device=device, port=1, index=1, gid=link_local, type="RoCE v2", ndev=ndev),
    ]
    if address:
        a, b, c, d = (int(x) for x in address.split("."))
        mapped = f"0000:0000:0000:0000:0000:ffff:{a:02x}{b:02x}:{c:02x}{d:02x}"
        table += [
            GidEntry(device=device, port=1, index=roce_v2_index - 1, gid=mapped, type="IB/RoCE v1", ndev=ndev),
            GidEntry(device=device, port=1, index=roce_v2_index, gid=mapped, type="RoCE v2", ndev=ndev),
        ]
    return table


def gids(host: str, index: int) -> list[GidEntry]:
    """Both twins' GID tables with the RoCE v2 / IPv4 entry at `index`."""
    return [
        *gid_table("rocep1s0f1", TWINS[0], FABRIC[host][0], index),
        *gid_table("roceP2p1s0f1", TWINS[1], FABRIC[host][1], index),
    ]


def env_file(host: str, gid_index: int) -> str:
    """The healthy host's env file carrying another NCCL_IB_GID_INDEX."""
    text = HEALTHY[host].env_file or ""
    assert "NCCL_IB_GID_INDEX=3\n" in text
    return text.replace("NCCL_IB_GID_INDEX=3\n", f"NCCL_IB_GID_INDEX={gid_index}\n")


def gb10(driver: str = "580.142", temperature: int | None = 41) -> list[Gpu]:
    return [Gpu(name="NVIDIA GB10", compute_cap="12.1", driver=driver, temperature=temperature)]


# The second cable port's twin is gone (renamed, or the card sees one port): neither ip nor nmcli lists it.
TWIN_GONE: dict[str, Any] = {
    "interfaces": interfaces(B, enP2p1s0f1np1=None),
    "nm_devices": {k: v for k, v in HEALTHY[B].nm_devices.items() if k != "enP2p1s0f1np1"},
}
H100 = [Gpu(name="NVIDIA H100 80GB HBM3", compute_cap="9.0", driver="580.95.05", temperature=38)]
RAY_OFF: dict[str, Any] = {"processes": [Process(pid=1, user="root", args="/sbin/init")], "files": {}, "listeners": []}
PROBE_A = parse_probe(A, (FIXTURES / "probe-capture-spark-a.txt").read_text())
GIDS_A = parse_gids((FIXTURES / "sysfs-gids-spark-a.txt").read_text())
GIDS_B = parse_gids((FIXTURES / "sysfs-gids-spark-b.txt").read_text())
# Ray's client server as ss prints it: [::ffff:192.168.100.10]:10001 and [::ffff:127.0.0.1]:10001
MAPPED_LISTENERS = parse_listeners(
    "".join(line + "\n" for line in (FIXTURES / "ss-ltnH.txt").read_text().splitlines() if "[::ffff:" in line)
)


# --- the cases ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    rule: str
    name: str
    level: Level | None
    """The worst level among the rule's findings; None when the rule has nothing to judge."""
    facts: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Per host: HostFacts fields replaced in the healthy pair."""
    workloads: tuple[dict[str, Any], ...] = (CHAT,)
    runtime: str = VENV
    pings: Mapping[tuple[str, str, str], tuple[bool, str]] = field(default_factory=lambda: ALL_PINGS_OK)
    subject: str = ""
    """A finding at `level` is about this subject (any subject when empty)."""
    evidence: str = ""
    """... and its evidence contains this."""
    not_evidence: str = ""
    fix: str = ""
    xfail: str = ""
    """A known bug: the case must fail until it is fixed."""


CASES: list[Case] = [
    # --- gpu-present
    Case("gpu-present", "gb10-from-nvidia-smi", "pass", subject=A, evidence="nvidia-smi: NVIDIA GB10"),
    Case(
        "gpu-present",
        "no-gpu-on-one-host",
        "fail",
        facts={B: {"gpus": []}},
        subject=B,
        evidence="no GPU found",
        fix="nvidia-smi",
    ),
    Case("gpu-present", "another-gpu", "fail", facts={A: {"gpus": H100}}, subject=A, evidence="NVIDIA H100"),
    # --- gpu-compute-capability
    Case("gpu-compute-capability", "sm121", "pass", subject=B, evidence="compute capability 12.1"),
    Case(
        "gpu-compute-capability",
        "sm90",
        "fail",
        facts={A: {"gpus": H100}},
        subject=A,
        evidence="compute capability 9.0",
    ),
    Case(
        "gpu-compute-capability",
        "no-gpu",
        "fail",
        facts={B: {"gpus": []}},
        subject=B,
        evidence="compute capability unknown",
    ),
    # --- gpu-driver-580
    Case("gpu-driver-580", "580", "pass", subject=A, evidence="driver 580.142"),
    Case(
        "gpu-driver-580",
        "590-cudagraph-deadlock",
        "warn",
        facts={B: {"gpus": gb10(driver="590.44.01")}},
        subject=B,
        evidence="driver 590.44.01 (590.x: CUDAGraph deadlock on GB10)",
        fix="sudo apt-mark hold nvidia-driver-580",
    ),
    Case(
        "gpu-driver-580",
        "unknown-driver",
        "warn",
        facts={A: {"gpus": []}},
        subject=A,
        evidence="driver unknown (no nvidia-smi)",
        fix="apt-mark hold",
    ),
    Case(
        "gpu-driver-580",
        "older-driver",
        "warn",
        facts={A: {"gpus": gb10(driver="575.64.03")}},
        subject=A,
        evidence="driver 575.64.03",
        not_evidence="deadlock",
    ),
    # --- cuda-13
    Case("cuda-13", "cuda-13", "pass", subject=A, evidence="CUDA 13.0"),
    Case("cuda-13", "cuda-12", "warn", facts={B: {"cuda_version": "12.8"}}, subject=B, evidence="CUDA 12.8"),
    Case("cuda-13", "unknown", None, facts={A: {"cuda_version": ""}, B: {"cuda_version": ""}}),
    # --- nccl-version
    Case("nccl-version", "2.28.9", "pass", subject=A, evidence="NCCL 2.28.9"),
    Case(
        "nccl-version",
        "exactly-the-minimum",
        "pass",
        facts={A: {"runtime": RUNTIME.model_copy(update={"nccl": "2.28.3"})}},
        subject=A,
    ),
    Case(
        "nccl-version",
        "compared-as-numbers",
        "pass",
        facts={B: {"runtime": RUNTIME.model_copy(update={"nccl": "2.28.10"})}},
        subject=B,
        evidence="NCCL 2.28.10",
    ),
    Case(
        "nccl-version",
        "too-old",
        "warn",
        facts={B: {"runtime": RUNTIME.model_copy(update={"nccl": "2.27.7"})}},
        subject=B,
        evidence="NCCL 2.27.7",
        fix="nvidia-nccl",
    ),
    Case(
        "nccl-version",
        "not-in-the-runtime",
        None,
        facts={A: {"runtime": Runtime(image_id=IMAGE_ID)}, B: {"runtime": Runtime(image_id=IMAGE_ID)}},
        runtime=IMAGE,
    ),
    # --- gpu-temperature
    Case("gpu-temperature", "idle", "pass", subject=A, evidence="GPU at 41 C"),
    Case("gpu-temperature", "at-the-limit", "pass", facts={B: {"gpus": gb10(temperature=85)}}, subject=B),
    Case(
        "gpu-temperature",
        "hot",
        "warn",
        facts={B: {"gpus": gb10(temperature=91)}},
        subject=B,
        evidence="GPU at 91 C",
        fix="airflow",
    ),
    Case(
        "gpu-temperature",
        "not-reported",
        None,
        facts={h: {"gpus": parse_nvidia_smi("NVIDIA GB10, 12.1, 580.142, [N/A]\n")} for h in (A, B)},
    ),
    # --- twin-present
    Case("twin-present", "both-twins", "pass", subject=f"{B} enP2p1s0f1np1", evidence="present"),
    Case(
        "twin-present",
        "twin-missing",
        "fail",
        facts={B: TWIN_GONE},
        subject=f"{B} enP2p1s0f1np1",
        evidence="absent; the host has enP7s7, enp1s0f1np1",
        fix="sparkctl discover",
    ),
    # --- twin-managed
    Case("twin-managed", "connected", "pass", subject=f"{A} enp1s0f1np1", evidence="NetworkManager state: connected"),
    Case(
        "twin-managed",
        "unmanaged",
        "fail",
        facts={A: {"nm_devices": {"enp1s0f1np1": NmDevice(name="enp1s0f1np1", type="ethernet", state="unmanaged")}}},
        subject=f"{A} enp1s0f1np1",
        evidence="NetworkManager state: unmanaged",
        fix="nmcli device set",
    ),
    Case(
        "twin-managed",
        "networkmanager-not-running",
        "fail",
        facts={B: {"nm_running": False, "nm_devices": {}}},
        subject=f"{B} enP2p1s0f1np1",
        evidence="NetworkManager not running",
    ),
    Case(
        "twin-managed",
        "a-missing-twin-is-left-to-twin-present",
        "pass",
        facts={B: TWIN_GONE},
    ),
    # --- netplan-conflict
    Case("netplan-conflict", "no-netplan", "pass", subject=A, evidence="naming a twin: none"),
    Case(
        "netplan-conflict",
        "netplan-names-a-twin",
        "warn",
        facts={
            B: {
                "netplan": {
                    "/etc/netplan/50-cloud-init.yaml": (
                        "network:\n  version: 2\n  renderer: networkd\n  ethernets:\n    enp1s0f1np1:\n"
                        "      addresses: [192.168.100.11/24]\n      mtu: 9000\n"
                    )
                }
            }
        },
        subject=B,
        evidence="/etc/netplan/50-cloud-init.yaml",
        fix="netplan apply",
    ),
    Case(
        "netplan-conflict",
        "netplan-for-the-management-nic-only",
        "pass",
        facts={
            A: {"netplan": {"/etc/netplan/01-mgmt.yaml": "network:\n  ethernets:\n    enP7s7:\n      dhcp4: true\n"}}
        },
        subject=A,
    ),
    # --- twin-address
    Case("twin-address", "converged", "pass", subject=f"{A} enp1s0f1np1", evidence="has 192.168.100.10/24 MTU 9000 UP"),
    Case(
        "twin-address",
        "fresh-host",
        "fail",
        facts={B: {"interfaces": fresh_facts(inventory(), inventory().host(B)).interfaces}},
        subject=f"{B} enp1s0f1np1",
        evidence="has no IPv4 MTU 1500",
        fix="sparkctl up",
    ),
    Case(
        "twin-address",
        "wrong-address",
        "fail",
        facts={
            A: {
                "interfaces": interfaces(
                    A,
                    enP2p1s0f1np1=Interface(
                        name="enP2p1s0f1np1", mtu=9000, operstate="UP", up=True, ipv4=["192.168.101.50/24"]
                    ),
                )
            }
        },
        subject=f"{A} enP2p1s0f1np1",
        evidence="has 192.168.101.50/24",
    ),
    Case(
        "twin-address",
        "link-down",
        "fail",
        facts={
            B: {
                "interfaces": interfaces(
                    B,
                    enp1s0f1np1=Interface(
                        name="enp1s0f1np1", mtu=9000, operstate="DOWN", up=False, ipv4=["192.168.100.11/24"]
                    ),
                )
            }
        },
        subject=f"{B} enp1s0f1np1",
        evidence="MTU 9000 DOWN",
    ),
    # --- twin-subnets
    Case("twin-subnets", "own-subnets", "pass", subject=A, evidence="each twin on its own subnet"),
    Case(
        "twin-subnets",
        "another-nic-on-a-fabric-subnet",
        "fail",
        facts={
            B: {
                "interfaces": interfaces(
                    B, wlP9s9=Interface(name="wlP9s9", mtu=1500, operstate="UP", up=True, ipv4=["192.168.101.23/24"])
                )
            }
        },
        subject=B,
        evidence="wlP9s9 192.168.101.23/24 overlaps enP2p1s0f1np1's 192.168.101.0/24",
        fix="own /24",
    ),
    Case(
        "twin-subnets",
        "a-wider-network-covering-both-twins",
        "fail",
        facts={
            A: {
                "interfaces": interfaces(
                    A, docker0=Interface(name="docker0", mtu=1500, operstate="UP", up=True, ipv4=["192.168.0.1/16"])
                )
            }
        },
        subject=A,
        evidence="docker0 192.168.0.1/16 overlaps enp1s0f1np1's 192.168.100.0/24; "
        "docker0 192.168.0.1/16 overlaps enP2p1s0f1np1's 192.168.101.0/24",
    ),
    Case(
        "twin-subnets",
        "a-twin-also-on-the-other-twins-subnet",
        "fail",
        facts={
            A: {
                "interfaces": interfaces(
                    A,
                    enP2p1s0f1np1=Interface(
                        name="enP2p1s0f1np1",
                        mtu=9000,
                        operstate="UP",
                        up=True,
                        ipv4=["192.168.101.10/24", "192.168.100.20/24"],
                    ),
                )
            }
        },
        subject=A,
        evidence="192.168.100.20/24",
    ),
    # --- jumbo-path
    Case(
        "jumbo-path",
        "both-directions-both-twins",
        "pass",
        subject=f"{A} enp1s0f1np1 -> 192.168.100.11",
        evidence="crossed",
    ),
    Case(
        "jumbo-path",
        "one-direction-at-mtu-1500",
        "fail",
        pings=ALL_PINGS_OK
        | {(B, "enP2p1s0f1np1", "192.168.101.10"): (False, "ping: local error: message too long, mtu=1500")},
        subject=f"{B} enP2p1s0f1np1 -> 192.168.101.10",
        evidence="message too long, mtu=1500",
        fix="MTU 9000",
    ),
    Case("jumbo-path", "not-measured", None, pings={}),
    # --- rdma-device
    Case("rdma-device", "mapped", "pass", subject=f"{B} enp1s0f1np1", evidence="rocep1s0f1 -> enp1s0f1np1"),
    Case(
        "rdma-device",
        "device-missing",
        "warn",
        facts={B: {"gids": gid_table("rocep1s0f1", TWINS[0], FABRIC[B][0])}},
        subject=f"{B} enP2p1s0f1np1",
        evidence="roceP2p1s0f1 not found (host has rocep1s0f1)",
        fix="ibdev2netdev",
    ),
    Case(
        "rdma-device",
        "device-of-the-other-twin",
        "warn",
        facts={
            A: {
                "gids": [
                    *gid_table("rocep1s0f1", TWINS[1], FABRIC[A][1]),
                    *gid_table("roceP2p1s0f1", TWINS[0], FABRIC[A][0]),
                ]
            }
        },
        subject=f"{A} enp1s0f1np1",
        evidence="rocep1s0f1 -> enP2p1s0f1np1",
    ),
    Case(
        "rdma-device",
        "no-rdma-devices",
        "warn",
        facts={A: {"gids": []}},
        subject=f"{A} enp1s0f1np1",
        evidence="no RDMA devices",
    ),
    # --- gid-index
    Case("gid-index", "env-file-agrees", "pass", subject=f"{A} rocep1s0f1", evidence="RoCE v2 GID index 3"),
    Case("gid-index", "env-file-not-written-yet", "pass", facts={B: {"env_file": None}}, subject=f"{B} rocep1s0f1"),
    Case(
        "gid-index",
        "stale-index-in-the-env-file",
        "warn",
        facts={B: {"gids": gids(B, 4)}},
        subject=f"{B} rocep1s0f1",
        evidence="RoCE v2 GID index 4; env file says 3",
        fix="sparkctl up",
    ),
    Case(
        "gid-index",
        "hosts-disagree",
        "warn",
        facts={B: {"gids": gids(B, 4), "env_file": env_file(B, 4)}},
        subject="cluster",
        evidence="hosts disagree on the GID index (spark-a=3, spark-b=4)",
    ),
    Case(
        "gid-index",
        "hosts-agree-on-a-non-default-index",
        "pass",
        facts={h: {"gids": gids(h, 4), "env_file": env_file(h, 4)} for h in (A, B)},
    ),
    Case(
        "gid-index",
        "twin-without-its-address-yet",
        "warn",
        facts={A: {"gids": GIDS_A}},
        subject=f"{A} roceP2p1s0f1",
        evidence="no RoCE v2 GID holds the twin's IPv4 address",
    ),
    Case(
        "gid-index",
        "twins-of-one-host-need-different-indexes",
        "warn",
        facts={B: {"gids": GIDS_B, "env_file": env_file(B, 5)}},
        subject=f"{B} roceP2p1s0f1",
        # spark-b (sysfs capture): 192.168.100.11 is at index 5, 192.168.101.11 at index 3
        evidence="RoCE v2 GID index 3; env file says 5",
    ),
    # --- page-cache
    Case(
        "page-cache",
        "captured-meminfo",
        "pass",
        facts={A: {"meminfo_kb": parse_meminfo((FIXTURES / "proc-meminfo.txt").read_text())}},
        subject=A,
        evidence="page cache 1530 MiB of 24105 MiB (6%)",
    ),
    Case(
        "page-cache",
        "half-the-memory-cached",
        "warn",
        facts={B: {"meminfo_kb": SPARK_MEMINFO | {"Cached": 62_400_000, "MemAvailable": 70_000_000}}},
        subject=B,
        evidence="(50%)",
        fix="vm.drop_caches=3",
    ),
    Case("page-cache", "no-meminfo", None, facts={A: {"meminfo_kb": {}}, B: {"meminfo_kb": {}}}),
    # --- memory-fit
    Case(
        "memory-fit",
        "qwen3-235b-gptq-int4-tp2",
        "pass",
        workloads=(chat(model="Qwen/Qwen3-235B-A22B-GPTQ-Int4"),),
        subject="workload chat",
        evidence="~129 GB of weights, ~65 GB per rank vs 109 GB (0.85 of 128 GB)",
    ),
    Case(
        "memory-fit",
        "llama-405b-bf16-tp2",
        "warn",
        workloads=(chat(model="meta-llama/Llama-3.1-405B"),),
        subject="workload chat",
        evidence="~810 GB of weights, ~405 GB per rank",
        fix="quantized checkpoint",
    ),
    Case(
        "memory-fit",
        "qwen3-235b-bf16-tp2",
        "warn",
        workloads=(chat(model="Qwen/Qwen3-235B-A22B"),),
        subject="workload chat",
        evidence="~470 GB of weights",
    ),
    Case(
        "memory-fit",
        "qwen3-235b-fp8-tp2",
        "warn",
        workloads=(chat(model="Qwen/Qwen3-235B-A22B-Instruct-2507-FP8"),),
        subject="workload chat",
        evidence="~247 GB of weights",
    ),
    Case(
        "memory-fit",
        "small-model-one-rank",
        "pass",
        workloads=(chat(model="Qwen/Qwen3-8B", tensor_parallel_size=1),),
        evidence="~16 GB of weights, ~16 GB per rank",
    ),
    Case(
        "memory-fit",
        "no-size-in-the-name-and-embed-workloads",
        None,
        workloads=(chat(model="/models/house-finetune"), EMBED),
    ),
    # --- memory-utilization
    Case("memory-utilization", "0.85", "pass", subject="workload chat", evidence="gpu_memory_utilization 0.85"),
    Case("memory-utilization", "0.90-is-the-limit", "pass", workloads=(chat(gpu_memory_utilization=0.90),)),
    Case(
        "memory-utilization",
        "0.95-in-extra-args",
        "fail",
        workloads=(chat(extra_args=["--max-model-len", "32768", "--gpu-memory-utilization", "0.95"]),),
        subject="workload chat",
        evidence="gpu_memory_utilization 0.95",
        fix="never above 0.90",
    ),
    Case(
        "memory-utilization",
        "0.93-in-extra-args-with-equals",
        "fail",
        workloads=(chat(extra_args=["--gpu-memory-utilization=0.93"]),),
        evidence="gpu_memory_utilization 0.93",
    ),
    Case(
        "memory-utilization",
        "lower-value-in-extra-args",
        "pass",
        workloads=(chat(extra_args=["--gpu-memory-utilization", "0.80"]),),
    ),
    # --- flag-enforce-eager
    Case("flag-enforce-eager", "cuda-graphs-on", "pass", subject="workload chat", evidence="no --enforce-eager"),
    Case(
        "flag-enforce-eager",
        "enforce-eager",
        "warn",
        workloads=(chat(extra_args=["--max-model-len", "32768", "--enforce-eager"]),),
        subject="workload chat",
        evidence="--enforce-eager in extra_args",
        fix="--max-cudagraph-capture-size=2048",
    ),
    Case(
        "flag-enforce-eager",
        "enforce-eager-before-another-flag",
        "warn",
        workloads=(chat(extra_args=["--enforce-eager", "--max-model-len", "32768"]),),
        subject="workload chat",
        evidence="--enforce-eager in extra_args",
        not_evidence="--max-model-len",
    ),
    Case(
        "flag-enforce-eager",
        "embed-workloads-are-not-vllm",
        None,
        workloads=(EMBED | {"extra_args": ["--enforce-eager"]},),
    ),
    # --- flag-flashinfer
    Case(
        "flag-flashinfer",
        "triton-attention",
        "pass",
        workloads=(chat(extra_args=["--attention-backend=TRITON_ATTN"]),),
        subject="workload chat",
    ),
    Case(
        "flag-flashinfer",
        "flashinfer-flag",
        "fail",
        workloads=(chat(extra_args=["--attention-backend", "FLASHINFER"]),),
        subject="workload chat",
        evidence="--attention-backend=FLASHINFER",
        fix="TRITON_ATTN",
    ),
    Case(
        "flag-flashinfer",
        "flashinfer-flag-lowercase",
        "fail",
        workloads=(chat(extra_args=["--attention-backend=flashinfer"]),),
    ),
    Case(
        "flag-flashinfer",
        "flashinfer-env",
        "fail",
        workloads=(chat(env={"VLLM_ATTENTION_BACKEND": "FLASHINFER"}),),
        subject="workload chat",
    ),
    Case(
        "flag-flashinfer",
        "flashinfer-env-lowercase",
        "fail",
        workloads=(chat(env={"VLLM_ATTENTION_BACKEND": "flashinfer"}),),
    ),
    Case(
        "flag-flashinfer",
        "flashinfer-env-named-in-the-evidence",
        "fail",
        workloads=(chat(env={"VLLM_ATTENTION_BACKEND": "FLASHINFER"}),),
        subject="workload chat",
        evidence="set through the environment (VLLM_ATTENTION_BACKEND)",
        not_evidence="extra_args",
    ),
    Case(
        "flag-flashinfer",
        "triton-flag-but-flashinfer-env",
        "fail",
        workloads=(
            chat(extra_args=["--attention-backend", "TRITON_ATTN"], env={"VLLM_ATTENTION_BACKEND": "FLASHINFER"}),
        ),
        subject="workload chat",
        evidence="set through the environment (VLLM_ATTENTION_BACKEND)",
        not_evidence="TRITON_ATTN",
    ),
    Case(
        "flag-flashinfer",
        "triton-env",
        "pass",
        workloads=(chat(env={"VLLM_ATTENTION_BACKEND": "TRITON_ATTN"}),),
    ),
    # --- flag-cutlass-fp4
    Case(
        "flag-cutlass-fp4",
        "cutlass-on-an-nvfp4-checkpoint",
        "fail",
        workloads=(chat(model="nvidia/Qwen3-30B-A3B-NVFP4", extra_args=["--moe-backend", "cutlass"]),),
        subject="workload chat",
        evidence="--moe-backend=cutlass",
        fix="--moe-backend=marlin",
    ),
    Case(
        "flag-cutlass-fp4",
        "cutlass-with-an-fp4-quantization-flag",
        "fail",
        workloads=(
            chat(model="acme/qwen3-30b-house", extra_args=["--moe-backend=cutlass", "--quantization", "modelopt_fp4"]),
        ),
    ),
    Case(
        "flag-cutlass-fp4",
        "marlin-on-an-nvfp4-checkpoint",
        "pass",
        workloads=(chat(model="nvidia/Qwen3-30B-A3B-NVFP4", extra_args=["--moe-backend", "marlin"]),),
    ),
    Case(
        "flag-cutlass-fp4",
        "cutlass-on-a-bf16-checkpoint",
        "pass",
        workloads=(chat(extra_args=["--moe-backend", "cutlass"]),),
    ),
    # --- flag-mxfp4
    Case(
        "flag-mxfp4",
        "gpt-oss",
        "pass",
        workloads=(chat(model="openai/gpt-oss-120b", extra_args=["--quantization", "mxfp4"]),),
        subject="workload chat",
    ),
    Case(
        "flag-mxfp4",
        "bf16-checkpoint",
        "fail",
        workloads=(chat(extra_args=["--quantization=mxfp4"]),),
        subject="workload chat",
        evidence="--quantization mxfp4 with Qwen/Qwen3-30B-A3B-Instruct-2507",
        fix="gpt-oss",
    ),
    Case("flag-mxfp4", "no-quantization-flag", "pass", subject="workload chat", evidence="ok"),
    # --- flag-fastsafetensors
    Case(
        "flag-fastsafetensors",
        "fastsafetensors",
        "fail",
        workloads=(chat(extra_args=["--load-format", "fastsafetensors"]),),
        subject="workload chat",
        evidence="--load-format=fastsafetensors",
        fix="remove it",
    ),
    Case(
        "flag-fastsafetensors",
        "fastsafetensors-with-equals",
        "fail",
        workloads=(chat(extra_args=["--load-format=fastsafetensors"]),),
    ),
    Case(
        "flag-fastsafetensors",
        "safetensors",
        "pass",
        workloads=(chat(extra_args=["--load-format", "safetensors"]),),
        subject="workload chat",
    ),
    # --- ports-free
    Case(
        "ports-free",
        "ours-running",
        "pass",
        subject=A,
        evidence="ports in use by this cluster: 6379, 6381, 6382, 8000, 8265, 10001, 52365",
    ),
    Case("ports-free", "nothing-listening", "pass", facts={A: RAY_OFF, B: RAY_OFF}, evidence="needed ports free"),
    Case(
        "ports-free",
        "api-port-held-by-another-program",
        "fail",
        facts={
            A: RAY_OFF | {"listeners": [Listener(address="0.0.0.0", port=8000)]},
            B: RAY_OFF,
        },
        subject=A,
        evidence="held by something else: 8000 (workload chat)",
        fix="ss -ltnp",
    ),
    Case(
        "ports-free",
        "gcs-port-held-by-redis",
        "fail",
        facts={
            A: RAY_OFF
            | {
                "listeners": [Listener(address="*", port=6379)],
                "processes": [Process(pid=812, user="redis", args="/usr/bin/redis-server *:6379")],
            },
            B: RAY_OFF,
        },
        subject=A,
        evidence="held by something else: 6379 (ray)",
    ),
    Case(
        "ports-free",
        "gcs-port-held-by-redis-while-a-workload-is-recorded",
        "fail",
        # a workload's pid file vouches for the workload's port only, not for Ray's
        facts={
            A: RAY_OFF
            | {
                "files": {"workload-chat.pid": "5120"},
                "listeners": [Listener(address="*", port=6379), Listener(address="10.0.0.11", port=8000)],
                "processes": [Process(pid=812, user="redis", args="/usr/bin/redis-server *:6379")],
            },
            B: RAY_OFF,
        },
        subject=A,
        evidence="held by something else: 6379 (ray)",
        not_evidence="8000",
    ),
    Case(
        "ports-free",
        "ray-in-its-container",
        "pass",
        # root's Ray inside sparkctl-ray: known from `docker ps`, whatever ps shows
        runtime=IMAGE,
        facts={
            h: {
                "processes": [Process(pid=1, user="root", args="/sbin/init")],
                "containers": {"sparkctl-ray": "nvcr.io/nvidia/vllm:25.11-py3"},
            }
            for h in (A, B)
        },
        subject=A,
        evidence="ports in use by this cluster: 6379, 6381, 6382, 8000, 8265, 10001",
    ),
    Case(
        "ports-free",
        "api-port-busy-on-a-worker-is-not-needed-there",
        "pass",
        facts={A: RAY_OFF, B: RAY_OFF | {"listeners": [Listener(address="0.0.0.0", port=8000)]}},
        subject=B,
        evidence="needed ports free",
    ),
    Case(
        "ports-free",
        "ray-running-but-the-api-port-held-by-another-program",
        "fail",
        facts={
            A: {
                "files": {k: v for k, v in HEALTHY[A].files.items() if not k.startswith("workload-")},
                "processes": [p for p in HEALTHY[A].processes if "vllm" not in p.args],
            }
        },
        subject=A,
        evidence="held by something else: 8000 (workload chat)",
        not_evidence="6379",
    ),
    # --- ray-exposure
    Case("ray-exposure", "fabric-and-loopback-only", "pass", subject=A, evidence="fabric address and loopback only"),
    Case(
        "ray-exposure",
        "wildcard-listeners-without-firewall",
        "warn",
        facts={A: {"listeners": PROBE_A.listeners, "processes": PROBE_A.processes, "files": {}}},
        subject=A,
        evidence="no sparkctl firewall: *:52366, *:6379, *:6381, *:6382, 0.0.0.0:52368",
        fix="firewall",
    ),
    Case(
        "ray-exposure",
        "wildcard-listeners-behind-the-sparkctl-firewall",
        "pass",
        facts={A: {"listeners": PROBE_A.listeners, "processes": PROBE_A.processes}},
        subject=A,
        evidence="the sparkctl firewall admits them only on the fabric and loopback",
    ),
    Case(
        "ray-exposure",
        "ray-not-running",
        None,
        facts={A: RAY_OFF | {"listeners": [Listener(address="*", port=6379)]}, B: RAY_OFF},
    ),
    Case(
        "ray-exposure",
        "ipv4-mapped-fabric-and-loopback-listeners",
        "pass",
        facts={
            A: {
                "files": {},
                "listeners": [*FABRIC_LISTENERS[A], *MAPPED_LISTENERS],
            }
        },
        subject=A,
        evidence="Ray listens on the fabric address and loopback only",
    ),
    # --- runtime-versions
    Case("runtime-versions", "same-venv", "pass", subject="cluster", evidence="spark-a: python 3.12.3 ray 2.52.1 vllm"),
    Case(
        "runtime-versions",
        "ray-differs",
        "fail",
        facts={B: {"runtime": RUNTIME.model_copy(update={"ray": "2.51.1"})}},
        subject="cluster",
        evidence="spark-b: python 3.12.3 ray 2.51.1",
        fix="same runtime",
    ),
    Case(
        "runtime-versions",
        "vllm-differs",
        "fail",
        facts={A: {"runtime": RUNTIME.model_copy(update={"vllm": "0.10.2"})}},
        evidence="vllm 0.10.2",
    ),
    Case(
        "runtime-versions",
        "python-differs",
        "fail",
        facts={A: {"runtime": RUNTIME.model_copy(update={"python": "3.11.2"})}},
        evidence="python 3.11.2",
    ),
    Case(
        "runtime-versions",
        "runtime-missing",
        "fail",
        facts={B: {"runtime": Runtime()}},
        subject="cluster",
        evidence="no runtime found on spark-b",
    ),
    Case(
        "runtime-versions",
        "same-image",
        "pass",
        runtime=IMAGE,
        facts={h: {"runtime": Runtime(image_id=IMAGE_ID)} for h in (A, B)},
        evidence="image sha256:4c1e2b7a9d0f",
    ),
    Case(
        "runtime-versions",
        "images-differ",
        "fail",
        runtime=IMAGE,
        facts={
            A: {"runtime": Runtime(image_id=IMAGE_ID)},
            B: {"runtime": Runtime(image_id="sha256:9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d9c8b7a6f5e4d3c2b1a0f9e8d")},
        },
        subject="cluster",
        evidence="spark-b: python ? ray ? image sha256:9e8d7c6b5a4f",
    ),
    Case(
        "runtime-versions",
        "image-not-pulled-on-one-host",
        "fail",
        runtime=IMAGE,
        facts={A: {"runtime": Runtime(image_id=IMAGE_ID)}, B: {"runtime": Runtime()}},
        evidence="no runtime found on spark-b",
    ),
]


def context(case: Case) -> CheckContext:
    facts = {name: patched(f, **case.facts.get(name, {})) for name, f in HEALTHY.items()}
    return CheckContext(inventory(case.workloads, case.runtime), facts, case.pings)


def _param(case: Case) -> Any:
    marks = [pytest.mark.xfail(reason=case.xfail, strict=True)] if case.xfail else []
    return pytest.param(case, id=f"{case.rule}/{case.name}", marks=marks)


def _render(findings: list[Finding]) -> str:
    return "\n".join(f"  {f.level} {f.subject}: {f.evidence}" for f in findings)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_rule_case(case: Case) -> None:
    rule = RULE[case.rule]
    findings = [f for f in evaluate(context(case)) if f.rule == case.rule]
    if case.level is None:
        assert findings == [], _render(findings)
        return
    assert findings, "the rule found nothing to judge"
    worst = max((f.level for f in findings), key=SEVERITY.__getitem__)
    assert worst == case.level, _render(findings)
    hits = [f for f in findings if f.level == case.level and (not case.subject or f.subject == case.subject)]
    assert hits, f"no {case.level} finding about {case.subject!r}:\n{_render(findings)}"
    assert any(case.evidence in f.evidence for f in hits), _render(findings)
    if case.not_evidence:
        assert all(case.not_evidence not in f.evidence for f in hits), _render(findings)
    for f in findings:
        assert (f.category, f.why, f.source, f.preflight, f.force_ok) == (
            rule.category,
            rule.why,
            rule.source,
            rule.preflight,
            rule.force_ok,
        )
        assert f.fix == ("" if f.level == "pass" else rule.fix)
    assert case.fix in (hits[0].fix if case.level != "pass" else rule.fix)


# --- the table itself -----------------------------------------------------------------------------------------


def _levels_needed(rule: Rule) -> set[str]:
    return {"pass", rule.level} | ({rule.args["bad_level"]} if "bad_level" in rule.args else set())


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.id)
def test_rule_has_a_pass_and_a_violation_case(rule: Rule) -> None:
    covered = {c.level for c in CASES if c.rule == rule.id and not c.xfail}
    missing = _levels_needed(rule) - covered
    assert not missing, f"{rule.id}: add cases at level(s) {sorted(missing)} to CASES"


def test_every_rule_has_cases() -> None:
    assert {c.rule for c in CASES} == set(RULE)


def test_case_names_are_unique() -> None:
    ids = [f"{c.rule}/{c.name}" for c in CASES]
    assert len(ids) == len(set(ids))


def test_table_version_is_an_int() -> None:
    raw = yaml.safe_load(RULES_FILE.read_text())
    assert type(raw["version"]) is int
    assert load_rules().version == raw["version"]


def test_rule_ids_are_unique_and_every_check_has_an_evaluator() -> None:
    ids = [r.id for r in RULES]
    assert len(ids) == len(set(ids))
    assert {r.check for r in RULES} <= set(EVALUATORS)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.id)
def test_every_rule_says_why_how_to_fix_and_where_from(rule: Rule) -> None:
    assert rule.why.strip() and rule.fix.strip() and rule.source.strip()


def healthy_context() -> CheckContext:
    return CheckContext(inventory(), HEALTHY, ALL_PINGS_OK)


def test_healthy_pair_passes_every_rule() -> None:
    findings = evaluate(healthy_context())
    assert [f for f in findings if f.level != "pass"] == []
    assert {f.rule for f in findings} == set(RULE)


def test_findings_come_in_table_order() -> None:
    order = [f.rule for f in evaluate(healthy_context())]
    assert order == sorted(order, key=[r.id for r in RULES].index)


def test_preflight_only_selects_the_preflight_rules() -> None:
    preflight = {r.id for r in RULES if r.preflight}
    assert preflight and preflight != set(RULE)
    assert {f.rule for f in evaluate(healthy_context(), preflight_only=True)} == preflight
    # facts that break non-preflight rules (fresh twins, a hot GPU, a full page cache, a failed ping) add nothing
    broken = {
        A: patched(
            HEALTHY[A],
            interfaces=fresh_facts(inventory(), inventory().host(A)).interfaces,
            gpus=gb10(temperature=95),
            meminfo_kb=SPARK_MEMINFO | {"Cached": 100_000_000},
        ),
        B: HEALTHY[B],
    }
    pings = ALL_PINGS_OK | {(A, TWINS[0], FABRIC[B][0]): (False, "100% packet loss")}
    found = evaluate(CheckContext(inventory(), broken, pings), preflight_only=True)
    assert {f.rule for f in found} == preflight
    assert all(f.level == "pass" for f in found)
    assert {f.rule for f in evaluate(CheckContext(inventory(), broken, pings)) if f.level != "pass"} == {
        "twin-address",
        "gpu-temperature",
        "page-cache",
        "jumbo-path",
    }


@pytest.mark.parametrize("category", sorted({r.category for r in RULES}))
def test_categories_select_their_rules(category: str) -> None:
    found = evaluate(healthy_context(), categories=frozenset({category}))
    assert {f.rule for f in found} == {r.id for r in RULES if r.category == category}


def test_blocking_with_and_without_force() -> None:
    facts = {
        A: patched(
            HEALTHY[A],
            **RAY_OFF | {"listeners": [Listener(address="0.0.0.0", port=8000)]},
            gpus=gb10(driver="590.44.01"),
        ),
        B: patched(HEALTHY[B], **RAY_OFF, gpus=[]),
    }
    inv = inventory((chat(extra_args=["--load-format", "fastsafetensors"]),))
    findings = evaluate(CheckContext(inv, facts, ALL_PINGS_OK))
    fails = {(f.rule, f.subject) for f in findings if f.level == "fail"}
    assert fails == {
        ("gpu-present", B),
        ("gpu-compute-capability", B),
        ("flag-fastsafetensors", "workload chat"),
        ("ports-free", A),
    }
    assert any(f.level == "warn" for f in findings)  # 590 driver, unknown driver: warnings never block
    assert {(f.rule, f.subject) for f in blocking(findings, force=False)} == fails
    forced = blocking(findings, force=True)
    assert [(f.rule, f.subject) for f in forced] == [("ports-free", A)]
    assert all(not f.force_ok and f.level == "fail" for f in forced)


def test_force_never_overrides_rules_marked_unsafe() -> None:
    unsafe = {r.id for r in RULES if not r.force_ok}
    assert {"ports-free", "runtime-versions", "memory-utilization", "twin-present"} <= unsafe
    findings = [
        Finding(rule=r.id, level=lvl, subject="s", evidence="e", force_ok=r.force_ok)
        for r in RULES
        for lvl in ("pass", "warn", "fail")
    ]
    assert {f.rule for f in blocking(findings, force=True)} == unsafe
    assert {f.rule for f in blocking(findings, force=False)} == set(RULE)
    assert all(f.level == "fail" for f in blocking(findings, force=False))


def test_the_ipv4_mapped_case_holds_both_client_server_listeners() -> None:
    """The ray-exposure case above judges the two listeners ss printed as IPv4-mapped, parsed as IPv4."""
    assert [(ln.address, ln.port) for ln in MAPPED_LISTENERS] == [("192.168.100.10", 10001), ("127.0.0.1", 10001)]


def test_hosts_without_facts_are_skipped() -> None:
    """An unreachable host has no facts; rules judge the hosts they have facts for and do not crash."""
    findings = evaluate(CheckContext(inventory(), {A: HEALTHY[A]}, {}))
    assert findings and all(f.subject.split(" ")[0] != B for f in findings)
