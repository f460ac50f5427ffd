"""doctor and discover on real hosts: a healthy pair passes, each injected fault yields its named finding."""

from __future__ import annotations

import contextlib
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.helpers import cli_env, ip_addrs, ipv4, sparkctl
from tests.testbed import Testbed
from tests.testbed.inventory import write_inventory
from tests.testbed.layout import RUNTIME_VENV

pytestmark = pytest.mark.testbed


@pytest.fixture(scope="module")
def configured(
    testbed: Testbed, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Testbed, Path, dict[str, str]]]:
    """A pair after `up` (fabric, env, Ray; no workload)."""
    testbed.reset_hosts()
    state = tmp_path_factory.mktemp("doctor-state")
    env = cli_env({**os.environ, "SPARKCTL_SUDO_PASSWORD": testbed.sudo_password}, state)
    inv = testbed.inventory_path()
    r = sparkctl("up", "--yes", "-i", str(inv), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    yield testbed, inv, env
    sparkctl("down", "-i", str(inv), env=env)
    testbed.reset_hosts()


def doctor(inv: Path, env: dict[str, str]) -> tuple[int, list[dict[str, Any]]]:
    r = sparkctl("doctor", "--json", "-i", str(inv), env=env)
    assert r.stdout.startswith("["), r.stderr
    return r.returncode, json.loads(r.stdout)


def levels(findings: list[dict[str, Any]], rule: str) -> dict[str, str]:
    return {f["subject"]: f["level"] for f in findings if f["rule"] == rule}


def test_a_healthy_pair_passes(configured: tuple[Testbed, Path, dict[str, str]]) -> None:
    _, inv, env = configured
    code, findings = doctor(inv, env)
    failed = [f for f in findings if f["level"] == "fail"]
    assert code == 0 and failed == []
    assert set(levels(findings, "jumbo-path").values()) == {"pass"} and len(levels(findings, "jumbo-path")) == 4
    assert set(levels(findings, "twin-address").values()) == {"pass"}
    assert levels(findings, "gpu-driver-580") == {"spark-a": "pass", "spark-b": "pass"}
    assert levels(findings, "runtime-versions") == {"cluster": "pass"}
    assert set(levels(findings, "ray-exposure").values()) == {"pass"}


def test_link_speed_cma_and_host_identity_are_read_from_the_hosts(
    configured: tuple[Testbed, Path, dict[str, str]],
) -> None:
    """The rules reading sysfs, /proc/meminfo and /etc/machine-id judge what the fake hosts really show: their twins
    are veths (no PCI device: not judged), their kernel is this machine's, each has its own machine-id and host
    key until one is cloned."""
    tb, inv, env = configured
    _, findings = doctor(inv, env)
    speed = {f["subject"]: (f["level"], f["evidence"]) for f in findings if f["rule"] == "twin-link-speed"}
    assert set(speed) == {f"{h} {t}" for h in tb.hosts for t in ("enp1s0f1np1", "enP2p1s0f1np1")}, speed
    assert all(level == "pass" and "not judged: no PCI device" in why for level, why in speed.values()), speed
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    kernel = os.uname().release
    cma = {f["subject"]: (f["level"], f["evidence"]) for f in findings if f["rule"] == "kernel-kho-cma"}
    for host in tb.hosts:
        level, why = cma[host]
        assert why.startswith(f"kernel {kernel}"), why
        if "CmaTotal" in meminfo:
            total, free = (int(meminfo[k].split()[0]) for k in ("CmaTotal", "CmaFree"))
            assert f"CmaTotal {total} kB" in why and level == ("warn" if free > total else "pass"), why
        else:
            assert "no CMA in /proc/meminfo" in why and level == "pass", why
    assert levels(findings, "host-identity-unique") == {"cluster": "pass"}
    # spark-b cloned from spark-a's disk: the same /etc/machine-id
    own = tb.exec("spark-b", ["cat", "/etc/machine-id"]).stdout
    cloned = tb.exec("spark-a", ["cat", "/etc/machine-id"]).stdout
    tb.exec("spark-b", ["sh", "-c", "cat > /etc/machine-id"], input=cloned)
    try:
        _, findings = doctor(inv, env)
    finally:
        tb.exec("spark-b", ["sh", "-c", "cat > /etc/machine-id"], input=own)
    clone = [f for f in findings if f["rule"] == "host-identity-unique"]
    assert [f["level"] for f in clone] != ["pass"] and "spark-a" in clone[0]["evidence"], clone
    assert "spark-b" in clone[0]["evidence"], clone


def test_one_twin_at_mtu_1500_is_named(configured: tuple[Testbed, Path, dict[str, str]]) -> None:
    tb, inv, env = configured
    tb.set_mtu("spark-b", "enp1s0f1np1", 1500)
    try:
        code, findings = doctor(inv, env)
    finally:
        tb.set_mtu("spark-b", "enp1s0f1np1", 9000)
    assert code == 1
    assert levels(findings, "twin-address")["spark-b enp1s0f1np1"] == "fail"
    assert levels(findings, "twin-address")["spark-a enp1s0f1np1"] == "pass"
    assert levels(findings, "jumbo-path")["spark-a enp1s0f1np1 -> spark-b enp1s0f1np1 192.168.100.11"] == "fail"
    assert levels(findings, "jumbo-path")["spark-a enP2p1s0f1np1 -> spark-b enP2p1s0f1np1 192.168.101.11"] == "pass"


def test_a_removed_address_is_named(configured: tuple[Testbed, Path, dict[str, str]]) -> None:
    tb, inv, env = configured
    tb.exec("spark-a", ["ip", "addr", "del", "192.168.101.10/24", "dev", "enP2p1s0f1np1"])
    try:
        code, findings = doctor(inv, env)
    finally:
        tb.exec("spark-a", ["ip", "addr", "add", "192.168.101.10/24", "dev", "enP2p1s0f1np1"])
    assert code == 1
    assert levels(findings, "twin-address")["spark-a enP2p1s0f1np1"] == "fail"
    assert "no IPv4" in next(
        f["evidence"] for f in findings if f["rule"] == "twin-address" and f["subject"] == "spark-a enP2p1s0f1np1"
    )


def test_hosts_with_different_gid_indices_are_named(configured: tuple[Testbed, Path, dict[str, str]]) -> None:
    tb, inv, env = configured
    tb.set_gid_index("spark-b", 5)
    try:
        _, findings = doctor(inv, env)
    finally:
        tb.set_gid_index("spark-b", tb.spec("spark-b").gid_index)
    gid = {f["subject"]: f for f in findings if f["rule"] == "gid-index"}
    assert gid["cluster"]["level"] == "warn" and "spark-a=3" in gid["cluster"]["evidence"]
    assert "spark-b=5" in gid["cluster"]["evidence"]
    # spark-b's env file still says 3 from the last up: the finding names the stale value
    assert gid["spark-b rocep1s0f1"]["level"] == "warn" and "env file says 3" in gid["spark-b rocep1s0f1"]["evidence"]


@contextlib.contextmanager
def driver_on_spark_a(tb: Testbed, version: str) -> Iterator[None]:
    """spark-a's simulated nvidia-smi reports `version` meanwhile, then the testbed's 580.142 again."""
    tb.set_driver_version("spark-a", version)
    try:
        yield
    finally:
        tb.set_driver_version("spark-a", "580.142")


def test_a_driver_older_than_nvidias_minimum_is_named(configured: tuple[Testbed, Path, dict[str, str]]) -> None:
    tb, inv, env = configured
    with driver_on_spark_a(tb, "580.65.06"):
        _, findings = doctor(inv, env)
    drv = {f["subject"]: f for f in findings if f["rule"] == "gpu-driver-580"}
    assert drv["spark-a"]["level"] == "warn" and "580.65.06 (older than 580.95.05)" in drv["spark-a"]["evidence"]
    assert "580.95.05 or newer" in drv["spark-a"]["fix"]
    assert drv["spark-b"]["level"] == "pass"


def test_a_590_driver_passes_with_the_community_note(configured: tuple[Testbed, Path, dict[str, str]]) -> None:
    tb, inv, env = configured
    with driver_on_spark_a(tb, "590.44.01"):
        _, findings = doctor(inv, env)
    drv = {f["subject"]: f for f in findings if f["rule"] == "gpu-driver-580"}
    assert drv["spark-a"]["level"] == "pass" and "note: community reports" in drv["spark-a"]["evidence"]


def test_the_cuda_version_of_an_r610_driver_is_read(configured: tuple[Testbed, Path, dict[str, str]]) -> None:
    """R610 drivers print "CUDA UMD Version" where older ones printed "CUDA Version" (the simulated nvidia-smi
    follows the driver version it is given)."""
    tb, inv, env = configured
    with driver_on_spark_a(tb, "610.43.02"):
        _, findings = doctor(inv, env)
    cuda = {f["subject"]: f for f in findings if f["rule"] == "cuda-13"}
    assert cuda["spark-a"]["level"] == "pass" and cuda["spark-a"]["evidence"] == "CUDA 13.3"
    assert cuda["spark-b"]["level"] == "pass" and cuda["spark-b"]["evidence"] == "CUDA 13.0"


def test_discover_writes_an_inventory_that_up_uses(
    fresh_testbed: Testbed, tmp_path: Path, sudo_env: dict[str, str]
) -> None:
    tb = fresh_testbed
    env = cli_env(sudo_env, tmp_path)
    out = tmp_path / "discovered.yaml"
    r = sparkctl(
        "discover",
        "10.77.0.11",
        "10.77.0.12",
        "--user",
        "spark",
        "--identity-file",
        str(tb.identity_file),
        "--known-hosts",
        str(tb.known_hosts),
        "--cluster",
        "found",
        "-o",
        str(out),
        env=env,
    )
    assert r.returncode == 0, r.stderr
    data = yaml.safe_load(out.read_text())
    assert [h["name"] for h in data["hosts"]] == ["spark-a", "spark-b"]
    twins = [[(t["interface"], t["rdma_device"], t["address"]) for t in h["fabric"]] for h in data["hosts"]]
    assert twins[0] == [
        ("enp1s0f1np1", "rocep1s0f1", "192.168.100.10/24"),
        ("enP2p1s0f1np1", "roceP2p1s0f1", "192.168.101.10/24"),
    ]
    assert [t[2] for t in twins[1]] == ["192.168.100.11/24", "192.168.101.11/24"]
    r = sparkctl("up", "--yes", "-i", str(out), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    for host, third in (("spark-a", 10), ("spark-b", 11)):
        links = ip_addrs(tb, host)
        assert ipv4(links["enp1s0f1np1"]) == [f"192.168.100.{third}/24"] and links["enp1s0f1np1"]["mtu"] == 9000
    sparkctl("down", "-i", str(out), env=env)


def test_bench_fabric_measures_every_link_through_the_engine(configured: tuple[Testbed, Path, dict[str, str]]) -> None:
    tb, inv, env = configured
    r = sparkctl("bench", "fabric", "--json", "--mb", "16", "-i", str(inv), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(r.stdout[r.stdout.index("{") :])
    links = {(x["host"], x["link"]): x for x in result["links"]}
    assert len(links) == 4 and all(x["jumbo"] for x in links.values())  # both twins, both directions
    sent = [x for x in links.values() if "mbytes_per_s" in x]
    assert {x["link"] for x in sent} == {"enp1s0f1np1->spark-b", "enP2p1s0f1np1->spark-b"}
    assert all(x["mbytes_per_s"] > 0 for x in sent)
    # no perftest on the testbed: the TCP fallback, and the result says so
    assert result["method"] == "tcp-fallback" and any("TCP fallback" in n for n in result["notes"])
    state = Path(env["XDG_STATE_HOME"]) / "sparkctl" / "journal.jsonl"
    record = json.loads(state.read_text().splitlines()[-1])
    assert record["id"] == result["journal"] and record["runbook"] == "bench-fabric"
    tb.set_mtu("spark-b", "enP2p1s0f1np1", 1500)
    try:
        r = sparkctl("bench", "fabric", "--json", "--mb", "16", "-i", str(inv), env=env)
    finally:
        tb.set_mtu("spark-b", "enP2p1s0f1np1", 9000)
    assert r.returncode == 1
    links = {(x["host"], x["link"]): x for x in json.loads(r.stdout[r.stdout.index("{") :])["links"]}
    assert links[("spark-a", "enP2p1s0f1np1->spark-b")]["jumbo"] is False
    assert links[("spark-a", "enp1s0f1np1->spark-b")]["jumbo"] is True


CHAT = {
    "name": "chat",
    "engine": "vllm",
    "model": "Qwen/Qwen3-0.6B",
    "tensor_parallel_size": 2,
    "port": 8000,
    "sync_weights": False,
}  # executor: the default, mp; doctor only reads, nothing is started


@contextlib.contextmanager
def two_nccl_builds(tb: Testbed, host: str) -> Iterator[None]:
    """Inside `host` only (overlays in its mount namespace; this machine's files untouched): the runtime venv gets
    an nvidia-nccl-cu13 2.28.9 wheel's libnccl.so.2, and the host DGX OS's /usr/lib/aarch64-linux-gnu/libnccl.so.2
    -> libnccl.so.2.28.9. Two builds of one version: the files are two different shared objects of this machine's
    Python (its _json and _bz2 modules), each with its own GNU build id, which is all the probe reads of them (it
    never loads them)."""
    site = next(Path(RUNTIME_VENV, "lib").glob("python3*/site-packages"))
    dynload = Path(str(sysconfig.get_config_var("DESTSHARED")))
    wheel_lib, system_lib = next(dynload.glob("_json*.so")), next(dynload.glob("_bz2*.so"))
    s = f"/tmp/nccl-builds-{host}"
    sp, lib = f"{s}/sp-up", f"{s}/lib-up"
    script = "\n".join(
        [
            "set -e",
            f"mkdir -p {sp}/nvidia/nccl/lib {sp}/nvidia_nccl_cu13-2.28.9.dist-info {s}/sp-work",
            f"mkdir -p {lib}/aarch64-linux-gnu {s}/lib-work",
            f"cp {wheel_lib} {sp}/nvidia/nccl/lib/libnccl.so.2",
            f"cp {system_lib} {lib}/aarch64-linux-gnu/libnccl.so.2.28.9",
            f"ln -sf libnccl.so.2.28.9 {lib}/aarch64-linux-gnu/libnccl.so.2",
            f"mount -t overlay overlay -o lowerdir={site},upperdir={sp},workdir={s}/sp-work {site}",
            f"mount -t overlay overlay -o lowerdir=/usr/lib,upperdir={lib},workdir={s}/lib-work /usr/lib",
        ]
    )
    tb.exec(host, ["sh", "-c", script])
    try:
        yield
    finally:
        tb.exec(host, ["sh", "-c", f"umount -l {site}; umount -l /usr/lib; rm -rf {s}"], check=False)


def test_two_nccl_builds_of_one_version_are_named(
    configured: tuple[Testbed, Path, dict[str, str]], tmp_path: Path
) -> None:
    """nccl-two-builds on what the probe reads from the hosts: spark-a's runtime and its system hold NCCL 2.28.9
    with different build ids, for a vLLM workload across both Sparks: a warning naming both; with
    `runtime.nccl: system` the same host passes (vLLM's collectives load the system's). spark-b has no NCCL at all:
    nothing to judge."""
    tb, _, env = configured
    data = tb.inventory_data([CHAT])
    inv = write_inventory(tmp_path / "chat.yaml", data)
    with two_nccl_builds(tb, "spark-a"):
        _, findings = doctor(inv, env)
        system = write_inventory(tmp_path / "system.yaml", {**data, "runtime": {**data["runtime"], "nccl": "system"}})
        _, with_system = doctor(system, env)
    found = {f["subject"]: f for f in findings if f["rule"] == "nccl-two-builds"}
    assert set(found) == {"spark-a"} and found["spark-a"]["level"] == "warn", found
    why = found["spark-a"]["evidence"]
    assert "NCCL 2.28.9" in why and "/usr/lib/aarch64-linux-gnu/libnccl.so.2" in why, why
    assert "the same version, another build, for chat across Sparks" in why, why
    chosen = {f["subject"]: (f["level"], f["evidence"]) for f in with_system if f["rule"] == "nccl-two-builds"}
    assert chosen["spark-a"][0] == "pass" and "VLLM_NCCL_SO_PATH" in chosen["spark-a"][1], chosen
    # and spark-a is back as it was: no NCCL read there any more
    _, after = doctor(inv, env)
    assert [f for f in after if f["rule"] == "nccl-two-builds"] == [], after
