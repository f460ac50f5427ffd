"""Planner cases as data: each tests/unit/cases/*.yaml holds an inventory, host facts and the steps expected.

Adding a case is adding a file. A case file has:

  description: what the case shows
  inventory: example-pair            # a file under inventories/ (without .yaml), or an inline mapping
  inventory_replace: [[old, new]]    # optional exact text edits of that inventory
  runbook: up                        # a built-in runbook name
  params: {}                         # optional runbook parameters (defaults from the runbook)
  digests: {ray_token: .., worker_code: ..}   # optional; laptop-side digests the planner compares with
  facts: {host: HostFacts as YAML}   # YAML anchors/merge keys welcome
  facts_from: other-case.yaml        # or: start from another case's facts ...
  facts_patch: {host: {key: value}}  # ... and replace some top-level HostFacts fields per host
  expect:
    error: {type: PlanError, where: .., message: ..}   # or the steps below (substrings for where/message)
    stages: [fabric, env]            # optional: compare only these stages
    steps:                           # per host, in order, every step of the compared stages
      spark-a:
        - stage: fabric
          kind: fabric_profile
          target: enp1s0f1np1
          changes: true              # default true
          depends_on_earlier: false  # default false
          commands:                  # optional; if given, exact and complete
            - argv: [nmcli, ...]     # exact argv
              sudo: true             # default false
              stdin: "..."           # optional exact stdin content; stdin_contains: [..] for fragments
              stdin_secret: ray_token   # default none
            - sh_contains: [..]      # an `sh -c LINE` command whose LINE holds each fragment
    changing_steps: 0                # optional total of changing steps in the compared stages
    notes: [..]                      # optional fragments that must each appear in some plan note
    notes_exact: [..]                # optional: the plan's notes, all of them
  xfail: "reason"                    # optional: a known bug; the case must fail until it is fixed
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from sparkctl import errors, paths
from sparkctl.facts.models import HostFacts
from sparkctl.facts.parse import parse_probe
from sparkctl.facts.probe import MARK
from sparkctl.inventory import parse_inventory
from sparkctl.inventory.models import Inventory
from sparkctl.plan import ray_commands, workload_commands
from sparkctl.plan.context import PlanContext
from sparkctl.plan.models import Command, Plan, Step
from sparkctl.runbook.load import load_runbook, resolve_params
from sparkctl.runbook.planner import build_runbook_plan

REPO = Path(__file__).resolve().parents[2]
CASES = Path(__file__).resolve().parent / "cases"
DEFAULT_DIGESTS = {"ray_token": "digest-of-the-ray-token", "worker_code": "digest-of-the-worker-code"}
STEP_KEYS = {"stage", "kind", "target", "changes", "depends_on_earlier", "commands"}
COMMAND_KEYS = {"argv", "sudo", "stdin", "stdin_contains", "stdin_secret", "stdin_blob", "sh_contains"}


def load_case(path: Path) -> dict[str, Any]:
    case = yaml.safe_load(path.read_text())
    unknown = set(case) - {
        "description",
        "inventory",
        "inventory_replace",
        "runbook",
        "params",
        "digests",
        "facts",
        "facts_from",
        "facts_patch",
        "expect",
        "xfail",
    }
    assert not unknown, f"{path.name}: unknown keys {unknown}"
    if "facts_from" in case:
        base = load_case(CASES / case["facts_from"])
        case["facts"] = {host: dict(data) for host, data in base["facts"].items()}
        case.setdefault("digests", base.get("digests", DEFAULT_DIGESTS))
    for host, patch in case.get("facts_patch", {}).items():
        case["facts"][host].update(patch)
    return case


def case_inventory(case: dict[str, Any]) -> Inventory:
    ref = case.get("inventory", "example-pair")
    text = (REPO / "inventories" / f"{ref}.yaml").read_text() if isinstance(ref, str) else yaml.safe_dump(ref)
    for old, new in case.get("inventory_replace", []):
        assert text.count(old) == 1, f"inventory_replace: {old!r} must occur exactly once"
        text = text.replace(old, new)
    return parse_inventory(text, "case-inventory")


def plan_case(case: dict[str, Any]) -> Plan:
    inv = case_inventory(case)
    facts = {name: HostFacts.model_validate({"host": name, **data}) for name, data in case["facts"].items()}
    assert set(facts) == {h.name for h in inv.hosts}, "facts must cover every host of the inventory"
    rb = load_runbook(case.get("runbook", "up"))
    params = resolve_params(rb, {}) | case.get("params", {})
    ctx = PlanContext(inv, facts, params, case.get("digests", DEFAULT_DIGESTS))
    return build_runbook_plan(rb, ctx, params)


def _check_command(where: str, want: dict[str, Any], got: Command) -> None:
    assert set(want) <= COMMAND_KEYS, f"{where}: unknown command keys {set(want) - COMMAND_KEYS}"
    if "sh_contains" in want:
        assert got.argv[:2] == ["sh", "-c"] and len(got.argv) == 3, f"{where}: expected sh -c LINE, got {got.argv}"
        for fragment in want["sh_contains"]:
            assert fragment in got.argv[2], f"{where}: {fragment!r} not in:\n{got.argv[2]}"
    else:
        assert got.argv == want["argv"], f"{where}: argv"
    assert got.sudo == want.get("sudo", False), f"{where}: sudo"
    assert got.stdin_secret == want.get("stdin_secret"), f"{where}: stdin_secret"
    assert got.stdin_blob == want.get("stdin_blob"), f"{where}: stdin_blob"
    if "stdin" in want:
        assert got.stdin == want["stdin"], f"{where}: stdin"
    for fragment in want.get("stdin_contains", []):
        assert got.stdin is not None and fragment in got.stdin, f"{where}: {fragment!r} not in stdin"


def _check_step(where: str, want: dict[str, Any], stage: str, got: Step) -> None:
    assert set(want) <= STEP_KEYS, f"{where}: unknown step keys {set(want) - STEP_KEYS}"
    have = {
        "stage": stage,
        "kind": got.kind,
        "target": got.target,
        "changes": got.changes,
        "depends_on_earlier": got.depends_on_earlier,
    }
    expected = {
        "stage": want["stage"],
        "kind": want["kind"],
        "target": want.get("target", ""),
        "changes": want.get("changes", True),
        "depends_on_earlier": want.get("depends_on_earlier", False),
    }
    assert have == expected, where
    if "commands" in want:
        assert len(got.commands) == len(want["commands"]), f"{where}: {[c.render() for c in got.commands]}"
        for k, (w, g) in enumerate(zip(want["commands"], got.commands, strict=True)):
            _check_command(f"{where} command {k}", w, g)


def check_case(case: dict[str, Any]) -> None:
    expect = case["expect"]
    if "error" in expect:
        want = expect["error"]
        error_type = getattr(errors, want["type"])
        with pytest.raises(error_type) as info:
            plan_case(case)
        assert any(
            want.get("where", "") in p.where and want.get("message", "") in p.message for p in info.value.problems
        ), [p.render() for p in info.value.problems]
        return
    plan = plan_case(case)
    stages = expect.get("stages")
    picked = [(st.name, s) for st in plan.stages if stages is None or st.name in stages for s in st.steps]
    for host in plan.hosts:
        got = [(stage, s) for stage, s in picked if s.host == host]
        want = expect["steps"].get(host, [])
        summary = [f"{stage}/{s.id}{'' if s.changes else '?'}" for stage, s in got]
        assert len(got) == len(want), f"{host}: planned {summary}"
        for i, (w, (stage, s)) in enumerate(zip(want, got, strict=True)):
            _check_step(f"{host} step {i} ({stage}/{s.id})", w, stage, s)
    if "changing_steps" in expect:
        assert sum(1 for _, s in picked if s.changes) == expect["changing_steps"]
    for fragment in expect.get("notes", []):
        assert any(fragment in n for n in plan.notes), f"{fragment!r} not in notes {plan.notes}"
    if "notes_exact" in expect:
        assert plan.notes == expect["notes_exact"]


CASE_FILES = sorted(CASES.glob("*.yaml"))


def _param(path: Path) -> Any:
    case = load_case(path)
    marks = [pytest.mark.xfail(reason=case["xfail"], strict=True)] if case.get("xfail") else []
    return pytest.param(path, id=path.stem, marks=marks)


@pytest.mark.parametrize("path", [_param(p) for p in CASE_FILES])
def test_case(path: Path) -> None:
    check_case(load_case(path))


def test_there_are_cases() -> None:
    assert len(CASE_FILES) >= 10


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX sh")
@pytest.mark.parametrize(
    "path", [p for p in CASE_FILES if "error" not in load_case(p).get("expect", {})], ids=lambda p: p.stem
)
def test_every_shell_line_parses(path: Path) -> None:
    """Every `sh -c LINE` the planner builds is valid sh (quoting mistakes show up here)."""
    plan = plan_case(load_case(path))
    lines = [c.argv[2] for st in plan.stages for s in st.steps for c in s.commands if c.argv[:2] == ["sh", "-c"]]
    for line in lines:
        r = subprocess.run(["sh", "-n", "-c", line], capture_output=True, text=True, timeout=10)
        assert r.returncode == 0, f"{line}\n{r.stderr}"


@pytest.mark.parametrize(
    "path", [p for p in CASE_FILES if "error" not in load_case(p).get("expect", {})], ids=lambda p: p.stem
)
def test_plan_is_plain_data(path: Path) -> None:
    """A plan survives a JSON round trip unchanged (it holds no callables, connections or clocks)."""
    plan = plan_case(load_case(path))
    assert Plan.model_validate_json(plan.model_dump_json()) == plan


def test_planning_twice_gives_the_same_plan() -> None:
    case = load_case(CASES / "up-fresh-pair.yaml")
    assert plan_case(case) == plan_case(case)


# --- the planned shell lines, run by a real sh against stub programs -----------------------------------


# DGX OS runs `sh -c LINE` with dash as /bin/sh; bash is what a login shell may be.
SHELLS = [
    pytest.param(sh, marks=pytest.mark.skipif(shutil.which(sh) is None, reason=f"no {sh}"), id=sh)
    for sh in ("dash", "bash")
]

RECORDER = """#!/bin/sh
{{
  echo "argv=$*"
  echo "VLLM_API_KEY=$VLLM_API_KEY"
  echo "RAY_AUTH_MODE=$RAY_AUTH_MODE"
  echo "RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
  echo "NCCL_IB_GID_INDEX=$NCCL_IB_GID_INDEX"
  echo "VLLM_DISTRIBUTED_EXECUTOR_CONFIG=${{VLLM_DISTRIBUTED_EXECUTOR_CONFIG-unset}}"
  echo "RAY_ADDRESS=$RAY_ADDRESS"
  echo "pid=$$"
}} > "{record}.tmp" && mv "{record}.tmp" "{record}"
{tail}
"""


@pytest.fixture
def sandbox(tmp_path: Path):
    """An inventory whose venv holds recording stubs, a home dir, and an env file outside /etc."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for name, tail in (("ray", "exit 0"), ("vllm", "exec sleep 30")):
        stub = venv / "bin" / name
        stub.write_text(RECORDER.format(record=tmp_path / f"{name}.record", tail=tail))
        stub.chmod(0o755)
    env_file = tmp_path / "worker.env"
    env_file.write_text("NCCL_IB_GID_INDEX=5\n")
    text = (
        (REPO / "inventories" / "example-pair.yaml")
        .read_text()
        .replace("  venv: /opt/sparkctl-runtime", f"  venv: {venv}")
    )
    home = tmp_path / "home"
    home.mkdir()
    return parse_inventory(text), str(home), env_file, tmp_path


def _localize(line: str, env_file: Path) -> str:
    assert paths.ENV_FILE in line
    return line.replace(paths.ENV_FILE, str(env_file))


def _record(path: Path, deadline: float = 3.0) -> dict[str, str]:
    end = time.monotonic() + deadline
    while not path.exists():
        assert time.monotonic() < end, f"{path.name}: the program never started"
        time.sleep(0.02)
    return dict(line.split("=", 1) for line in path.read_text().splitlines())


@pytest.mark.skipif(shutil.which("setsid") is None, reason="needs util-linux setsid")
@pytest.mark.parametrize("shell", SHELLS)
def test_ray_start_line_loads_the_env_file_and_token_auth(sandbox, shell: str) -> None:
    inv, home, env_file, tmp = sandbox
    line = _localize(ray_commands.build_ray_start(inv, inv.host("spark-b"), home), env_file)
    r = subprocess.run([shell, "-c", line], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    rec = _record(tmp / "ray.record")
    argv = rec["argv"].split()
    assert argv[0] == "start"
    assert "--node-ip-address=192.168.100.11" in argv and "--address=192.168.100.10:6379" in argv
    assert "--head" not in argv
    assert rec["NCCL_IB_GID_INDEX"] == "5"
    assert rec["RAY_AUTH_MODE"] == "token"
    assert rec["RAY_AUTH_TOKEN_PATH"] == paths.token_path(home)
    assert Path(paths.log_path(home, "ray")).exists()


@pytest.mark.skipif(shutil.which("setsid") is None, reason="needs util-linux setsid")
@pytest.mark.parametrize("shell", SHELLS)
def test_workload_start_line_reads_the_key_from_stdin_and_records_the_pid(sandbox, shell: str) -> None:
    inv, home, env_file, tmp = sandbox
    w = inv.workload("chat")
    line = _localize(workload_commands.build_workload_start(inv, w, home), env_file)
    r = subprocess.run([shell, "-c", line], input="sk-unit-test\n", capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    try:
        rec = _record(tmp / "vllm.record", deadline=2.0)
    finally:
        pid_file = Path(workload_commands.pid_file(home, "chat"))
        if pid_file.exists() and pid_file.read_text().strip().isdigit():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
    assert rec["VLLM_API_KEY"] == "sk-unit-test"
    assert rec["argv"].startswith("serve Qwen/Qwen3-30B-A3B-Instruct-2507 ")
    # not a vLLM variable (absent from vllm/envs.py): placement comes from vLLM's own PACK group and one GPU per node
    assert rec["VLLM_DISTRIBUTED_EXECUTOR_CONFIG"] == "unset"
    # the default executor, vLLM's multiprocessing one, never joins Ray: node rank 0 of 2, meeting at the head
    assert rec["RAY_ADDRESS"] == ""
    assert "--nnodes 2 --node-rank 0 --master-addr 192.168.100.10" in rec["argv"]
    assert rec["NCCL_IB_GID_INDEX"] == "5"
    assert pid_file.read_text().strip() == rec["pid"]
    assert (
        Path(workload_commands.spec_file(home, "chat")).read_text()
        == workload_commands.workload_spec(inv, w, home) + "\n"
    )
    assert "sk-unit-test" not in line


@pytest.mark.parametrize(
    "shell",
    [
        pytest.param(
            "dash",
            id="dash",
            marks=[
                *SHELLS[0].marks,
            ],
        ),
        SHELLS[1],
    ],
)
def test_workload_stop_line_stops_the_process_group_and_forgets_it(sandbox, shell: str) -> None:
    inv, home, _, _ = sandbox
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    reaper = threading.Thread(target=proc.wait, daemon=True)
    reaper.start()
    try:
        pid_file, spec_file = (
            Path(workload_commands.pid_file(home, "chat")),
            Path(workload_commands.spec_file(home, "chat")),
        )
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        pid_file.write_text(f"{proc.pid}\n")
        spec_file.write_text("spec\n")
        line = workload_commands.build_workload_stop(inv, "chat", home)
        r = subprocess.run([shell, "-c", line], capture_output=True, text=True, timeout=40)
        assert r.returncode == 0, r.stderr
        reaper.join(timeout=1)
        assert not pid_file.exists() and not spec_file.exists()
        assert proc.returncode == -signal.SIGTERM, "the recorded process is still running"
        # safe to run again when nothing is recorded
        assert subprocess.run([shell, "-c", line], timeout=10).returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_files_sparkctl_writes_read_back_as_converged() -> None:
    """The env file and vLLM's list, as the probe prints them back, need no rewrite."""
    case = load_case(CASES / "up-gid-detected.yaml")
    written = {
        (s.host, s.kind): s.commands[0].stdin
        for st in plan_case(case).stages
        for s in st.steps
        if s.kind in ("worker_env", "worker_env_ray_list")
    }
    assert len(written) == 4
    for host in ("spark-a", "spark-b"):
        output = (
            f"{MARK} env_file\n{written[(host, 'worker_env')]}\n{MARK} present\n"
            f"{MARK} non_carry_over\n{written[(host, 'worker_env_ray_list')]}\n{MARK} present\n{MARK} end\n"
        )
        read = parse_probe(host, output)
        case["facts"][host] |= {"env_file": read.env_file, "non_carry_over": read.non_carry_over}
    again = [s for st in plan_case(case).stages if st.name == "env" for s in st.steps]
    assert again == []


def test_container_case_facts_read_back_from_probe_output() -> None:
    """The converged container pair's facts are what the probe prints, as its parsers read it.

    The head's sections as the tools print them: `docker ps --format '{{.Names}} {{.Image}}'`, the probe's
    `docker exec sparkctl-ray` loop over the recorded pids, `sha256sum`/`grep -H ''` of the mounted state dir (the
    spec file is the one line `printf '%s\\n'` wrote), `ps -eo pid=,user=,args=` and `ss -tnH state established`.
    """
    case = load_case(CASES / "container-up-converged-pair.yaml")
    spec = (
        "image=nvcr.io/nvidia/vllm:25.11-py3 RAY_ADDRESS=192.168.100.10:6379 vllm serve "
        "Qwen/Qwen3-30B-A3B-Instruct-2507 --served-model-name chat --tensor-parallel-size 2 "
        "--distributed-executor-backend ray --gpu-memory-utilization 0.85 --host 10.0.0.11 --port 8000 "
        "--max-model-len 32768"
    )
    for host in ("spark-a", "spark-b"):
        facts = HostFacts.model_validate({"host": host, **case["facts"][host]})
        head = host == "spark-a"
        state = "ray-token.sha256:5f2b6c1d0a9e8f7c\n" + (
            f"workload-chat.pid:1466\nworkload-chat.spec:{spec}\n" if head else ""
        )
        ps = "".join(f"{p.pid:>7} {p.user:<8} {p.args}\n" for p in facts.processes)
        ss = "".join(
            f"0      0      {link.local}:{link.local_port}      {link.peer}:{link.peer_port}\n"
            for link in facts.gcs_links
        )
        output = (
            f"{MARK} state_files\n{state}"
            f"{MARK} containers\nsparkctl-ray nvcr.io/nvidia/vllm:25.11-py3\n"
            f"{MARK} container_workloads\n{'workload-chat' if head else ''}\n"
            f"{MARK} processes\n{ps}"
            f"{MARK} gcs_links\n{ss}"
            f"{MARK} end\n"
        )
        read = parse_probe(host, output)
        assert read.containers == facts.containers == {"sparkctl-ray": "nvcr.io/nvidia/vllm:25.11-py3"}
        assert read.container_workloads == facts.container_workloads == (["chat"] if head else [])
        assert read.processes == facts.processes
        assert read.gcs_links == facts.gcs_links
        files = {k: v for k, v in facts.files.items() if k != "firewall.nft"}  # firewall: its own section
        assert read.files == files
        if head:
            inv = case_inventory(case)
            assert read.files["workload-chat.spec"] == workload_commands.workload_spec(
                inv, inv.workload("chat"), "/home/nvidia"
            )
