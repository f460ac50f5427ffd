"""The bundled playbooks: they validate, their plans match data cases, and bad runbooks fail with file:line.

Each tests/unit/playbook_cases/*.yaml is one case:

  description: what the case shows
  playbook: swap-model               # playbooks/<name>.yaml
  set: [model=Qwen/Qwen3-8B]         # optional --set arguments, verbatim
  args: [--from, start]              # optional further CLI arguments (--from / --only)
  inventory: example-pair            # inventories/<name>.yaml (default example-pair)
  inventory_replace: [[old, new]]    # optional exact text edits of that inventory
  facts_from: up-converged-pair.yaml # optional: plan against these hosts (tests/unit/cases/<file>, its facts
                                     #   and digests) in-process, instead of the CLI's offline dry-run
  facts_patch: {host: {key: value}}  # optional, with facts_from: replace top-level HostFacts fields per host
  expect:
    exit: 2                          # optional: the CLI must exit with this (then only stderr is compared)
    stderr: [fragment, ..]           # optional fragments of the CLI's error output
    stages: [name, ..]               # the plan's stage names, in order (a stage may plan no step)
    changes: 3                       # optional: changing steps in the whole plan
    notes: [fragment, ..]            # optional: fragments each found in some plan note
    steps:                           # per host, in order, every step of the plan
      spark-a:
        - stage: start
          kind: workload
          target: chat               # default ""
          changes: true              # default true
          commands: [fragment, ..]   # optional fragments of the rendered commands (`sudo ` prefix included)
          absent: [fragment, ..]     # optional fragments that must NOT be in them
          verdict: true              # optional: the step carries (true) or not (false) a failed check
          notes: [fragment, ..]      # optional fragments each found in some note of the step

Offline plans run `python -m sparkctl run playbooks/X.yaml --dry-run --offline --json`, exactly what an
operator types; facts_from cases run the same loader and planner the CLI uses, against recorded hosts.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from sparkctl.errors import EXIT_BAD_INPUT
from sparkctl.facts.models import HostFacts
from sparkctl.inventory import parse_inventory
from sparkctl.plan.context import PlanContext, fresh_facts
from sparkctl.plan.models import Plan
from sparkctl.runbook.load import load_runbook, resolve_params, step_index
from sparkctl.runbook.planner import build_runbook_plan

REPO = Path(__file__).resolve().parents[2]
PLAYBOOKS = REPO / "playbooks"
CASES = Path(__file__).resolve().parent / "playbook_cases"
PLANNER_CASES = Path(__file__).resolve().parent / "cases"
EXAMPLE = REPO / "inventories" / "example-pair.yaml"
BOOKS = sorted(PLAYBOOKS.glob("*.yaml"))
CASE_FILES = sorted(CASES.glob("*.yaml"))
CASE_KEYS = {
    "description",
    "playbook",
    "set",
    "args",
    "inventory",
    "inventory_replace",
    "facts_from",
    "facts_patch",
    "expect",
}
EXPECT_KEYS = {"exit", "stderr", "stages", "changes", "notes", "steps"}
STEP_KEYS = {"stage", "kind", "target", "changes", "commands", "absent", "verdict", "notes"}


def sparkctl(*args: str, state: Path) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess, with its laptop state in a temp dir (offline runs must not need it)."""
    env = {**os.environ, "XDG_STATE_HOME": str(state), "PYTHONPATH": str(REPO)}
    env.pop("SPARKCTL_INVENTORY", None)
    return subprocess.run(
        [sys.executable, "-m", "sparkctl", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


# --- every playbook ---------------------------------------------------------------------------------------


def test_the_playbooks_are_bundled() -> None:
    assert [p.stem for p in BOOKS] == [
        "bringup",
        "compare-layouts",
        "fabric-check",
        "pin-driver",
        "recover-oom",
        "swap-model",
        "teardown",
    ]


def test_every_playbook_validates_through_the_cli(tmp_path: Path) -> None:
    result = sparkctl("runbook", "validate", *map(str, BOOKS), state=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{p}: ok" for p in BOOKS]


@pytest.mark.parametrize("book", BOOKS, ids=lambda p: p.stem)
def test_every_playbook_documents_itself(book: Path) -> None:
    """A description, every parameter with a default (or required) and a description, a comment above every step."""
    rb = load_runbook(str(book))
    assert rb.name == book.stem
    assert len(rb.description) > 40
    raw = yaml.safe_load(book.read_text())
    for name, param in raw.get("parameters", {}).items():
        assert "default" in param or param.get("required"), f"{book.name}: parameter {name} has no default"
        assert param.get("description"), f"{book.name}: parameter {name} has no description"
    lines = book.read_text().splitlines()
    in_steps = False
    for n, line in enumerate(lines):
        if re.match(r"^\w", line):
            in_steps = line.startswith("steps:")
        if in_steps and line.startswith("  - name:"):
            above = next(prev for prev in reversed(lines[:n]) if prev.strip())
            assert above.strip().startswith("#"), f"{book.name}:{n + 1}: step without a comment above it"


def test_every_playbook_has_a_plan_case() -> None:
    covered = {yaml.safe_load(f.read_text())["playbook"] for f in CASE_FILES}
    assert covered == {p.stem for p in BOOKS}


def _stages(plan: Plan) -> list[tuple[str, str, str, list[dict[str, Any]]]]:
    return [(st.name, st.action, st.on_failure, [s.model_dump() for s in st.steps]) for st in plan.stages]


@pytest.mark.parametrize("facts_from", [None, "up-converged-pair.yaml", "up-half-converged.yaml"])
@pytest.mark.parametrize(("book", "builtin", "first"), [("bringup", "up", "fabric"), ("teardown", "down", None)])
def test_playbook_spells_out_its_builtin(book: str, builtin: str, first: str | None, facts_from: str | None) -> None:
    """bringup after its preflight plans exactly what `up` plans; teardown exactly what `down` plans."""
    inv = parse_inventory(EXAMPLE.read_text(), str(EXAMPLE))
    if facts_from:
        raw, digests = _planner_facts(facts_from)
        facts = {name: HostFacts.model_validate({"host": name, **data}) for name, data in raw.items()}
    else:
        facts, digests = (
            {h.name: fresh_facts(inv, h) for h in inv.hosts},
            {"ray_token": "t", "worker_code": "w"},
        )
    plans = []
    for ref, start in ((str(PLAYBOOKS / f"{book}.yaml"), first), (builtin, None)):
        rb = load_runbook(ref)
        params = resolve_params(rb, {})
        plans.append(
            build_runbook_plan(
                rb,
                PlanContext(inv, facts, params, digests),
                params,
                start=step_index(rb, start) if start else 0,
            )
        )
    mine, theirs = plans
    assert _stages(mine) == _stages(theirs)
    assert mine.changes == theirs.changes


# --- the plan cases ---------------------------------------------------------------------------------------


def _inventory_file(case: dict[str, Any], tmp_path: Path) -> Path:
    path = REPO / "inventories" / f"{case.get('inventory', 'example-pair')}.yaml"
    if not case.get("inventory_replace"):
        return path
    text = path.read_text()
    for old, new in case["inventory_replace"]:
        assert text.count(old) == 1, f"inventory_replace: {old!r} must occur exactly once"
        text = text.replace(old, new)
    out = tmp_path / "inventory.yaml"
    out.write_text(text)
    return out


def _planner_facts(name: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Facts and digests of a planner case (tests/unit/cases), following its facts_from / facts_patch."""
    case = yaml.safe_load((PLANNER_CASES / name).read_text())
    if "facts_from" in case:
        facts, digests = _planner_facts(case["facts_from"])
        facts = {host: dict(data) for host, data in facts.items()}
        digests = case.get("digests", digests)
    else:
        facts, digests = case["facts"], case.get("digests", {})
    for host, patch in case.get("facts_patch", {}).items():
        facts[host].update(patch)
    return facts, digests


def _plan_against_facts(case: dict[str, Any], inventory: Path) -> Plan:
    """What `sparkctl run` plans for these hosts: the same loader, --set parsing and planner."""
    rb = load_runbook(str(PLAYBOOKS / f"{case['playbook']}.yaml"))
    inv = parse_inventory(inventory.read_text(), str(inventory))
    raw, digests = _planner_facts(case["facts_from"])
    for host, patch in case.get("facts_patch", {}).items():
        raw[host] = {**raw[host], **patch}
    facts = {name: HostFacts.model_validate({"host": name, **data}) for name, data in raw.items()}
    params = resolve_params(rb, dict(s.split("=", 1) for s in case.get("set", [])))
    args = case.get("args", [])
    start = step_index(rb, args[args.index("--from") + 1]) if "--from" in args else 0
    only = args[args.index("--only") + 1] if "--only" in args else None
    return build_runbook_plan(rb, PlanContext(inv, facts, params, digests), params, start=start, only=only)


def _check_steps(plan: Plan, expected: dict[str, list[dict[str, Any]]]) -> None:
    assert set(expected) == set(plan.hosts), "list every host (an empty list for a host with no step)"
    for host, want in expected.items():
        got = plan.steps_for(host)
        stage_of = {id(s): st.name for st in plan.stages for s in st.steps}
        shown = [(stage_of[id(s)], s.kind, s.target) for s in got]
        assert [(w["stage"], w["kind"], w.get("target", "")) for w in want] == shown, f"{host} steps"
        for w, s in zip(want, got, strict=True):
            assert set(w) <= STEP_KEYS, f"unknown step keys {set(w) - STEP_KEYS}"
            where = f"{host} {w['stage']}/{s.id}"
            assert s.changes == w.get("changes", True), f"{where}: changes"
            rendered = "\n".join(c.render() for c in s.commands)
            for fragment in w.get("commands", []):
                assert fragment in rendered, f"{where}: {fragment!r} not in:\n{rendered}"
            for fragment in w.get("absent", []):
                assert fragment not in rendered, f"{where}: {fragment!r} unexpectedly in:\n{rendered}"
            if "verdict" in w:
                assert bool(s.verdict) == w["verdict"], f"{where}: verdict {s.verdict!r}"
            for fragment in w.get("notes", []):
                assert any(fragment in n for n in s.notes), f"{where}: {fragment!r} not in notes {s.notes}"


@pytest.mark.parametrize("path", CASE_FILES, ids=lambda p: p.stem)
def test_playbook_plan_case(path: Path, tmp_path: Path) -> None:
    case = yaml.safe_load(path.read_text())
    assert set(case) <= CASE_KEYS, f"unknown case keys {set(case) - CASE_KEYS}"
    expect = case["expect"]
    assert set(expect) <= EXPECT_KEYS, f"unknown expect keys {set(expect) - EXPECT_KEYS}"
    inventory = _inventory_file(case, tmp_path)
    if "facts_from" in case:
        plan = _plan_against_facts(case, inventory)
    else:
        argv = [
            "run",
            str(PLAYBOOKS / f"{case['playbook']}.yaml"),
            "--dry-run",
            "--offline",
            "--json",
            "-i",
            str(inventory),
        ]
        for item in case.get("set", []):
            argv += ["--set", item]
        result = sparkctl(*argv, *case.get("args", []), state=tmp_path / "state")
        assert result.returncode == expect.get("exit", 0), result.stdout + result.stderr
        for fragment in expect.get("stderr", []):
            assert fragment in result.stderr, f"{fragment!r} not in:\n{result.stderr}"
        if result.returncode:
            assert "stages" not in expect and "steps" not in expect
            return
        plan = Plan.model_validate_json(result.stdout)
        assert plan.offline and plan.runbook == case["playbook"]
        assert not (tmp_path / "state").exists(), "an offline dry-run wrote laptop state"
    assert [st.name for st in plan.stages] == expect["stages"]
    if "changes" in expect:
        assert plan.changes == expect["changes"]
    for fragment in expect.get("notes", []):
        assert any(fragment in n for n in plan.notes), f"{fragment!r} not in notes {plan.notes}"
    _check_steps(plan, expect["steps"])


# --- bad input through the CLI: exit 2, nothing planned, the problem at file:line ------------------------


def _line_of(text: str, fragment: str) -> int:
    hits = [n for n, line in enumerate(text.splitlines(), 1) if fragment in line]
    assert len(hits) == 1, (fragment, hits)
    return hits[0]


BAD = [
    # (playbook, exact text to replace, replacement, fragment of the line the error is at, message fragment)
    (
        "fabric-check",
        "action: bench_fabric",
        "action: bench_fabrik",
        "bench_fabrik",
        "did you mean 'bench_fabric'?",
    ),
    (
        "pin-driver",
        "  - name: hold\n    action: shell\n    shell: true\n",
        "  - name: hold\n    action: shell\n",
        "name: hold",
        "shell: true",
    ),
    (
        "teardown",
        "    when: restore_network",
        "    when: restore_netwrk",
        "restore_netwrk",
        "not a parameter",
    ),
    (
        "swap-model",
        "on_failure: [stop-again]\n\n  # Read-only",
        "on_failure: [stop-agian]\n\n  # Read-only",
        "stop-agian",
        "not a cleanup step",
    ),
    (
        "recover-oom",
        "  - name: stop\n    action: workload_stop\n",
        "  - name: stop\n    action: workload_stop\n    host: head\n",
        "host: head",
        "did you mean 'hosts'?",
    ),
    # duplicate names are a problem of the whole list: reported at `steps:`
    (
        "bringup",
        "  - name: ray-workers\n",
        "  - name: ray-head\n",
        "steps:",
        "duplicate step names: ray-head",
    ),
]


@pytest.mark.parametrize(("book", "old", "new", "at", "message"), BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_broken_playbook_exits_2_with_file_and_line(
    book: str, old: str, new: str, at: str, message: str, command: str, tmp_path: Path
) -> None:
    text = (PLAYBOOKS / f"{book}.yaml").read_text()
    assert text.count(old) == 1, old
    bad = text.replace(old, new)
    path = tmp_path / "bad.yaml"
    path.write_text(bad)
    if command == "validate":
        result = sparkctl("runbook", "validate", str(path), state=tmp_path / "state")
    else:
        sets = ["--set", "model=m"] if book == "swap-model" else []
        result = sparkctl(
            "run", str(path), "--dry-run", "--offline", "-i", str(EXAMPLE), *sets, state=tmp_path / "state"
        )
    assert result.returncode == EXIT_BAD_INPUT, result.stdout + result.stderr
    assert result.stdout.strip() == "" or "plan:" not in result.stdout
    assert message in result.stderr, result.stderr
    assert f"{path}:{_line_of(bad, at)} " in result.stderr, result.stderr


def test_yaml_syntax_error_points_at_the_line(tmp_path: Path) -> None:
    text = (
        (PLAYBOOKS / "fabric-check.yaml")
        .read_text()
        .replace('args: {mb: "${mb}", port: "${port}"}', 'args: {mb: "${mb}", port: "${port}"')
    )
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = sparkctl("runbook", "validate", str(path), state=tmp_path / "state")
    assert result.returncode == EXIT_BAD_INPUT
    assert re.search(rf"{re.escape(str(path))}:\d+", result.stderr), result.stderr


def test_validate_reports_every_bad_file_and_still_lists_the_good_ones(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((PLAYBOOKS / "teardown.yaml").read_text().replace("action: verify_clean", "action: nope"))
    result = sparkctl("runbook", "validate", str(PLAYBOOKS / "bringup.yaml"), str(bad), state=tmp_path / "s")
    assert result.returncode == EXIT_BAD_INPUT
    assert f"{PLAYBOOKS / 'bringup.yaml'}: ok" in result.stdout
    assert f"{bad}:{_line_of(bad.read_text(), 'action: nope')} steps[3].action" in result.stderr


@pytest.mark.parametrize(
    ("book", "args", "message"),
    [
        (
            "recover-oom",
            ["--set", "gpu_memory_utilisation=0.7"],
            "'recover-oom' has no parameter 'gpu_memory_utilisation'",
        ),
        (
            "swap-model",
            ["--set", "model=m", "--set", "tp=1"],
            "parameters: workload, model, tensor_parallel_size, replicas",
        ),
        ("fabric-check", ["--set", "mb"], "expected name=value"),
        ("bringup", ["--from", "ray-heads"], "--from ray-heads: no such step"),
        ("bringup", ["--only", "ray-heads"], "no such step"),
    ],
    ids=["unknown-parameter", "lists-the-parameters", "no-equals", "from-unknown", "only-unknown"],
)
def test_bad_command_line_exits_2(book: str, args: list[str], message: str, tmp_path: Path) -> None:
    result = sparkctl(
        "run",
        str(PLAYBOOKS / f"{book}.yaml"),
        "--dry-run",
        "--offline",
        "-i",
        str(EXAMPLE),
        *args,
        state=tmp_path / "state",
    )
    assert result.returncode == EXIT_BAD_INPUT, result.stdout + result.stderr
    assert message in result.stderr, result.stderr
    assert "plan:" not in result.stdout
