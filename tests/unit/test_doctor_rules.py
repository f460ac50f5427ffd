"""The doctor's rule table, case by case: host facts in, the finding each rule gives out.

Every rule id in sparkctl/data/rules.yaml needs cases here: at least one where it passes and one where it is
violated at its level. A rule added to the table without cases fails `test_every_rule_has_cases`.

A case starts from a healthy converged pair (the facts of tests/unit/cases/up-converged-pair.yaml plus a GB10,
CUDA 13, the same runtime on both hosts, a Spark's /proc/meminfo and Ray listening on the fabric only), replaces
some HostFacts fields per host, and says what the rule must find: the worst level among its findings (None: the
rule has nothing to judge), the subject of a finding at that level, and fragments of its evidence and fix.

The cases are data: tests/unit/doctor_cases/<rule id>.yaml, one file per rule. Adding a case is adding an entry:

  rule: gpu-present                  # the file's name
  cases:
    - name: no-gpu-on-one-host       # unique within the rule
      level: fail                    # pass | warn | fail | null (nothing to judge)
      facts: {spark-b: {gpus: []}}   # optional: HostFacts fields replaced per host, as the probe would parse them
      workloads: [..]                # optional: the inventory's workloads (default: the example's chat)
      runtime: {image: ..}           # optional: the inventory's runtime (default: {venv: /opt/sparkctl-runtime})
      pings: [{host, interface, peer, ok, evidence}]   # optional: jumbo-ping outcomes (default: all pass)
      subject: spark-b               # optional: a finding at `level` is about this subject
      evidence: no GPU found         # optional fragment of that finding's evidence; not_evidence: must not appear
      fix: nvidia-smi                # optional fragment of the fix
      xfail: reason                  # optional: a known bug; the case must fail until it is fixed
      inventory: example-switch-8.yaml   # optional: that inventory instead of the pair (hosts start as spark-a)
      unreachable: {spark-b: {message: .., hint: ..}}   # optional: hosts not read (no facts, no pings from them)
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
from sparkctl.errors import Problem
from sparkctl.facts.models import Gpu, HostFacts, Listener, NcclLib, Process, Runtime
from sparkctl.facts.parse import parse_listeners, parse_nvidia_smi
from sparkctl.inventory import parse_inventory
from sparkctl.inventory.models import Inventory
from sparkctl.plan.context import fresh_facts

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"
CASES_DIR = HERE / "doctor_cases"
RULES_FILE = HERE.parents[1] / "sparkctl" / "data" / "rules.yaml"
RULES: list[Rule] = list(load_rules().rules)
RULE = {r.id: r for r in RULES}
A, B = "spark-a", "spark-b"
SEVERITY = {"pass": 0, "warn": 1, "fail": 2}
HOST_SPECIFIC_FIX = {"runtime-support"}
OWN_FIX = {"host-reachable"}
"""Rules whose fix is the one the failure itself gives (the connection's hint), the table's only when it gives none."""
VERSIONED_FIX = {r.id for r in RULES if r.args.get("fix_by_vllm")}

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
CHAT: dict[str, Any] = {
    "name": "chat",
    "engine": "vllm",
    "model": "Qwen/Qwen3-30B-A3B-Instruct-2507",
    "tensor_parallel_size": 2,
    "gpu_memory_utilization": 0.85,
    "port": 8000,
    "extra_args": ["--max-model-len", "32768"],
}


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
# A Spark's twins as sysfs shows them: 200 Gb/s each, each function on PCIe Gen5 x4 (NVIDIA/dgx-spark-playbooks#108).
SPARK_LINKS = {
    t: {"interface": t, "speed_mbps": 200000, "pcie_width": 4, "pcie_speed": "32.0 GT/s PCIe", "pcie_max_width": 4,
        "pcie_max_speed": "32.0 GT/s PCIe"}
    for t in ("enp1s0f1np1", "enP2p1s0f1np1")
}  # fmt: skip
# /etc/machine-id and ed25519 host keys (`cut -d' ' -f1,2 ssh_host_ed25519_key.pub`) of two separately installed hosts
MACHINE_IDS = {A: "4c6f9d3e2b1a48f0a7c5e9d2b3f1a6c8", B: "9e2d7c1b5a3f4e6d8c0b2a4f6e8d1c3b"}
HOST_KEYS = {
    A: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHq7cZk0bLx3wR2vTn8mYpQeD4sJ6uGfK1aHiNoVt9Wz",
    B: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFm2dXr8sLq5nV7cTb3wKyPzE0jH4gR6uA9oBiM1Ne2Y",
}
# The runtime's NCCL wheel file replaced by a link to DGX OS's libnccl.so.2 (the field fix of vllm#41725): one build
SYSTEM_NCCL = {
    "path": "/usr/lib/aarch64-linux-gnu/libnccl.so.2",
    "real": "/usr/lib/aarch64-linux-gnu/libnccl.so.2.28.9",
}
NCCL_LIBS = {
    "runtime": NcclLib(
        path="/opt/sparkctl-runtime/lib/python3.12/site-packages/nvidia/nccl/lib/libnccl.so.2",
        real=SYSTEM_NCCL["real"],
        size=190_000_000,
        build_id="c0db9360",
    ),
    "system": NcclLib(**SYSTEM_NCCL, size=190_000_000, build_id="c0db9360"),
}
HEALTHY: dict[str, HostFacts] = {
    name: patched(
        f,
        gpus=GB10,
        cuda_version="13.0",
        runtime=RUNTIME,
        meminfo_kb=SPARK_MEMINFO,
        listeners=FABRIC_LISTENERS[name],
        kernel="6.17.0-1032-nvidia",
        links=SPARK_LINKS,
        machine_id=MACHINE_IDS[name],
        ssh_host_key=HOST_KEYS[name],
        nccl_libs=NCCL_LIBS,
        state_free={"/home/nvidia/.local/state/sparkctl": 51_234_567_890},  # ~48 GiB free in the home filesystem
    )
    for name, f in _converged().items()
}
FABRIC = {A: ("192.168.100.10", "192.168.101.10"), B: ("192.168.100.11", "192.168.101.11")}
TWINS = ("enp1s0f1np1", "enP2p1s0f1np1")
ALL_PINGS_OK: dict[tuple[str, str, str], tuple[bool, str]] = {
    (host, TWINS[j], FABRIC[peer][j]): (True, "") for host, peer in ((A, B), (B, A)) for j in range(2)
}


def gb10(driver: str = "580.142", temperature: int | None = 41) -> list[Gpu]:
    return [Gpu(name="NVIDIA GB10", compute_cap="12.1", driver=driver, temperature=temperature)]


RAY_OFF: dict[str, Any] = {"processes": [Process(pid=1, user="root", args="/sbin/init")], "files": {}, "listeners": []}
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
    inventory: str = ""
    """An inventory of inventories/ instead of the pair (its workloads unless the case gives some); every host
    starts from the healthy spark-a's facts."""
    unreachable: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    """Hosts that could not be read: their connection error (message, hint); they have no facts and send no pings."""


CASE_KEYS = {"name", "level", "facts", "workloads", "runtime", "pings", "subject", "evidence", "not_evidence", "fix"}
CASE_KEYS |= {"xfail", "inventory", "unreachable"}


def load_cases(path: Path) -> list[Case]:
    """One rule's cases from a doctor_cases/*.yaml file (see the README there for the keys)."""
    data = yaml.safe_load(path.read_text())
    assert set(data) == {"rule", "cases"}, f"{path.name}: expected rule and cases"
    assert data["rule"] == path.stem, f"{path.name}: the file is named after its rule"
    cases = []
    for raw in data["cases"]:
        unknown = set(raw) - CASE_KEYS
        assert not unknown, f"{path.name} {raw.get('name')}: unknown keys {unknown}"
        pings = ALL_PINGS_OK
        if "pings" in raw:
            pings = {(p["host"], p["interface"], p["peer"]): (p["ok"], p["evidence"]) for p in raw["pings"]}
        runtime = raw.get("runtime")
        cases.append(
            Case(
                rule=data["rule"],
                name=raw["name"],
                level=raw["level"],
                facts=raw.get("facts", {}),
                workloads=tuple(raw.get("workloads", [] if "inventory" in raw else [CHAT])),
                runtime=yaml.safe_dump(runtime, default_flow_style=True).strip() if runtime else VENV,
                pings=pings,
                **{
                    k: raw[k]
                    for k in ("subject", "evidence", "not_evidence", "fix", "xfail", "inventory", "unreachable")
                    if k in raw
                },
            )
        )
    return cases


CASES: list[Case] = [c for path in sorted(CASES_DIR.glob("*.yaml")) for c in load_cases(path)]


def context(case: Case) -> CheckContext:
    if case.inventory:
        raw = yaml.safe_load((HERE.parents[1] / "inventories" / case.inventory).read_text())
        if case.workloads:
            raw["workloads"] = list(case.workloads)
        inv = parse_inventory(yaml.safe_dump(raw, sort_keys=False), case.inventory)
        base = {h.name: patched(HEALTHY[A], host=h.name) for h in inv.hosts}
        facts = {name: patched(f, **case.facts.get(name, {})) for name, f in base.items()}
        return CheckContext(inv, facts, case.pings)
    read = {name: f for name, f in HEALTHY.items() if name not in case.unreachable}
    facts = {name: patched(f, **case.facts.get(name, {})) for name, f in read.items()}
    lost = {name: [Problem(name, e["message"], e.get("hint", ""))] for name, e in case.unreachable.items()}
    pings = {k: v for k, v in case.pings.items() if k[0] not in case.unreachable}
    return CheckContext(inventory(case.workloads, case.runtime), facts, pings, lost)


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
        if f.level == "pass":
            assert f.fix == ""
        elif rule.id in HOST_SPECIFIC_FIX:  # the fix names the host and what to install there
            assert f.fix and f.subject in f.fix, f
        elif rule.id in OWN_FIX:
            assert f.fix, f
        elif rule.id in VERSIONED_FIX:  # one of the fixes for the head's vLLM version (flags that exist there)
            assert f.fix in [v["fix"] for v in rule.args["fix_by_vllm"]], f
        else:
            assert f.fix == rule.fix
    assert case.fix in (hits[0].fix if case.level != "pass" else rule.fix)


# --- the table itself -----------------------------------------------------------------------------------------


def _levels_needed(rule: Rule) -> set[str]:
    return {"pass", rule.level}


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
            gpus=gb10(driver="580.65.06"),
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
    assert any(f.level == "warn" for f in findings)  # an old driver, an unknown one: warnings never block
    assert {(f.rule, f.subject) for f in blocking(findings, force=False)} == fails
    forced = blocking(findings, force=True)
    assert [(f.rule, f.subject) for f in forced] == [("ports-free", A)]
    assert all(not f.force_ok and f.level == "fail" for f in forced)


def test_force_never_overrides_rules_marked_unsafe() -> None:
    unsafe = {r.id for r in RULES if not r.force_ok}
    assert {"ports-free", "runtime-versions", "runtime-support", "twin-present"} <= unsafe
    findings = [
        Finding(rule=r.id, level=lvl, subject="s", evidence="e", force_ok=r.force_ok)
        for r in RULES
        for lvl in ("pass", "warn", "fail")
    ]
    assert {f.rule for f in blocking(findings, force=True)} == unsafe
    assert {f.rule for f in blocking(findings, force=False)} == set(RULE)
    assert all(f.level == "fail" for f in blocking(findings, force=False))


def test_the_ipv4_mapped_case_holds_both_client_server_listeners() -> None:
    """doctor_cases/ray-exposure.yaml judges the two listeners ss printed as IPv4-mapped, parsed as IPv4."""
    assert [(ln.address, ln.port) for ln in MAPPED_LISTENERS] == [("192.168.100.10", 10001), ("127.0.0.1", 10001)]


def test_hosts_without_facts_are_skipped() -> None:
    """An unreachable host has no facts; rules judge the hosts they have facts for and do not crash."""
    findings = evaluate(CheckContext(inventory(), {A: HEALTHY[A]}, {}))
    assert findings and all(f.subject.split(" ")[0] != B for f in findings)


def test_a_ring_needs_the_nccl_that_reads_subnet_aware_routing() -> None:
    """In a ring sparkctl writes NCCL_IB_SUBNET_AWARE_ROUTING=1; NCCL reads it from 2.30.7 on (its source), so an
    older runtime is a warning there, while the same NCCL passes in a pair."""
    ring = parse_inventory((HERE.parents[1] / "inventories" / "example-ring.yaml").read_text(), "example-ring.yaml")
    versions = {"spark-1": "2.30.7", "spark-2": "2.28.9", "spark-3": "2.31.1"}
    facts = {h: HostFacts(host=h, runtime=Runtime(nccl=v)) for h, v in versions.items()}
    rule = RULE["nccl-version"]
    found = {f.subject: f for f in EVALUATORS[rule.check](CheckContext(ring, facts), rule)}
    assert {h: f.level for h, f in found.items()} == {"spark-1": "pass", "spark-2": "warn", "spark-3": "pass"}
    assert found["spark-2"].evidence == "NCCL 2.28.9 ignores NCCL_IB_SUBNET_AWARE_ROUTING (read from 2.30.7)"
    assert found["spark-2"].fix == rule.fix
    pair = [f for f in evaluate(healthy_context()) if f.rule == "nccl-version"]
    assert [f.evidence for f in pair] == ["NCCL 2.28.9", "NCCL 2.28.9"] and {f.level for f in pair} == {"pass"}


def test_up_refuses_a_host_whose_state_filesystem_is_full_naming_host_path_and_free_space() -> None:
    from sparkctl.doctor.preflight import preflight

    full = {**HEALTHY, B: patched(HEALTHY[B], state_free={"/home/nvidia/.local/state/sparkctl": 1_048_576})}
    for force in (False, True):  # writing records on a full filesystem leaves them cut short: --force does not help
        _, stop = preflight(CheckContext(inventory(), full, ALL_PINGS_OK), force)
        assert stop is not None
        (problem,) = stop.problems
        assert problem.where == "spark-b [state-dir-free]"
        assert problem.message == (
            "/home/nvidia/.local/state/sparkctl: 1048576 bytes (1.0 MiB) free, below the 64.0 MiB a run needs there"
        )
        assert "df -h" in problem.hint and "nothing was changed" in problem.hint
    _, stop = preflight(CheckContext(inventory(), HEALTHY, ALL_PINGS_OK), False)
    assert stop is None
