"""Runbooks: validation with file:line, parameters (--set, substitution, when), --from / --only, built-ins."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sparkctl.errors import EXIT_BAD_INPUT
from sparkctl.inventory import parse_inventory
from sparkctl.plan.context import PlanContext, fresh_facts
from sparkctl.runbook.actions import ACTIONS
from sparkctl.runbook.load import (
    RunbookError,
    builtin_names,
    load_runbook,
    parse_runbook,
    resolve_params,
    step_index,
)
from sparkctl.runbook.planner import build_runbook_plan, select_hosts, when_holds
from sparkctl.session import door

EXAMPLE = Path(__file__).resolve().parents[2] / "inventories" / "example-pair.yaml"

GOOD = """\
name: maintenance
description: Re-check the fabric and restart Ray.
parameters:
  tag:
    default: weekly
  restart:
    default: true
  mode:
    default: fast
  anything:
    default: null
    description: no default, so no type either
steps:
  - name: check
    action: verify_fabric
  - name: note
    action: shell
    shell: true
    hosts: head
    args: {argv: [logger, -t, sparkctl, "run ${tag} on ${mode}"], changes: false}
  - name: stop-ray
    action: ray_stop
    when: restart
    on_failure: continue
  - name: start-ray
    action: ray_start
    when: mode == fast
    on_failure: [cleanup-ray]
  - name: slow-only
    action: pause
    when: mode != fast
cleanup:
  - name: cleanup-ray
    action: ray_stop
"""


def line_of(text: str, fragment: str) -> int:
    hits = [n for n, line in enumerate(text.splitlines(), 1) if fragment in line]
    assert len(hits) == 1, hits
    return hits[0]


def problems_of(text: str) -> list:
    with pytest.raises(RunbookError) as info:
        parse_runbook(text, "rb.yaml")
    assert info.value.exit_code == EXIT_BAD_INPUT
    return info.value.problems


def edit(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


@pytest.fixture
def ctx() -> PlanContext:
    inv = parse_inventory(EXAMPLE.read_text())
    facts = {h.name: fresh_facts(inv, h) for h in inv.hosts}
    return PlanContext(inv, facts, {}, {"ray_token": "t", "worker_code": "w"})


# --- validation ------------------------------------------------------------------------------------------


def test_good_runbook_parses() -> None:
    rb = parse_runbook(GOOD, "rb.yaml")
    assert [s.name for s in rb.steps] == ["check", "note", "stop-ray", "start-ray", "slow-only"]
    assert rb.steps[3].on_failure == ["cleanup-ray"]


def test_unknown_action_with_did_you_mean() -> None:
    text = edit(GOOD, "action: ray_stop\n    when", "action: ray_stopp\n    when")
    (p,) = problems_of(text)
    assert p.where == f"rb.yaml:{line_of(text, 'ray_stopp')} steps[2].action"
    assert "ray_stopp" in p.message
    assert p.hint == "did you mean 'ray_stop'?"


def test_unknown_action_without_close_match_lists_actions() -> None:
    (p,) = problems_of(edit(GOOD, "action: verify_fabric", "action: xyzzy"))
    assert "verify_fabric" in p.hint and "shell" in p.hint


def test_shell_action_needs_the_opt_in() -> None:
    text = edit(GOOD, "    shell: true\n", "")
    (p,) = problems_of(text)
    assert p.where.startswith("rb.yaml:") and p.where.endswith(" steps[1].shell")
    assert "shell: true" in p.hint


def test_on_failure_naming_a_missing_cleanup_step() -> None:
    text = edit(GOOD, "on_failure: [cleanup-ray]", "on_failure: [cleanup-rey]")
    (p,) = problems_of(text)
    assert p.where == f"rb.yaml:{line_of(text, 'cleanup-rey')} steps[3].on_failure"
    assert "cleanup-rey" in p.message


def test_on_failure_must_be_stop_continue_or_a_list() -> None:
    text = edit(GOOD, "on_failure: continue", "on_failure: ignore")
    (p,) = problems_of(text)
    assert p.where.endswith(" steps[2].on_failure") and "ignore" in p.message


def test_when_on_an_unknown_parameter() -> None:
    text = edit(GOOD, "when: restart", "when: restrat")
    (p,) = problems_of(text)
    assert p.where == f"rb.yaml:{line_of(text, 'restrat')} steps[2].when"
    assert "restrat" in p.message


@pytest.mark.parametrize("expr", ["restart and mode", "mode >= 3", "$(id)", "mode == "])
def test_when_expressions_outside_the_grammar_are_rejected(expr: str) -> None:
    text = edit(GOOD, "when: restart", f"when: '{expr}'")
    (p,) = problems_of(text)
    assert p.where.endswith(" steps[2].when")


def test_unknown_step_key_with_did_you_mean() -> None:
    text = edit(GOOD, "    when: restart\n", "    wehn: restart\n")
    (p,) = problems_of(text)
    assert p.where == f"rb.yaml:{line_of(text, 'wehn')} steps[2].wehn"
    assert p.hint == "did you mean 'when'?"


def test_action_arguments_are_validated() -> None:
    text = edit(
        GOOD,
        'args: {argv: [logger, -t, sparkctl, "run ${tag} on ${mode}"], changes: false}',
        "args: {argv: [], chnages: false}",
    )
    found = problems_of(text)
    assert sorted(p.where.split(" ")[1] for p in found) == ["steps[1].args.argv", "steps[1].args.chnages"]


def test_duplicate_step_names() -> None:
    found = problems_of(edit(GOOD, "- name: slow-only", "- name: check"))
    assert any("check" in p.message and "duplicate" in p.message for p in found)


def test_every_problem_at_once() -> None:
    text = edit(
        edit(edit(GOOD, "action: verify_fabric", "action: verify_fabrik"), "    shell: true\n", ""),
        "when: restart",
        "when: nope",
    )
    assert len(problems_of(text)) == 3


def test_not_yaml_and_not_a_runbook() -> None:
    (p,) = problems_of("name: x\nsteps: [\n")
    assert p.where.startswith("rb.yaml:")
    found = problems_of("name: x\n")
    assert [q.where for q in found] == ["rb.yaml:1 steps"]


def test_invalid_runbook_through_the_cli_exits_2(tmp_path: Path, isolated_state, mocker) -> None:
    from sparkctl.cli.app import app

    connect = mocker.patch.object(door, "CONNECTOR")
    path = tmp_path / "rb.yaml"
    text = edit(GOOD, "action: verify_fabric", "action: verify_fabirc")
    path.write_text(text)
    result = CliRunner().invoke(app, ["run", str(path), "--dry-run", "-i", str(EXAMPLE)])
    assert result.exit_code == EXIT_BAD_INPUT
    assert f"error: {path}:{line_of(text, 'verify_fabirc')} steps[0].action" in result.stderr
    assert "did you mean 'verify_fabric'" in result.stderr
    connect.assert_not_called()


def test_missing_runbook_file_exits_2(tmp_path: Path) -> None:
    with pytest.raises(RunbookError) as info:
        load_runbook(str(tmp_path / "absent.yaml"))
    assert "cannot read" in info.value.problems[0].message


# --- parameters ------------------------------------------------------------------------------------------


def test_set_on_an_unknown_parameter() -> None:
    rb = parse_runbook(GOOD, "rb.yaml")
    with pytest.raises(RunbookError) as info:
        resolve_params(rb, {"tga": "x", "mode": "slow"})
    (p,) = info.value.problems
    assert p.where == "--set tga"
    assert "tag" in p.hint and "restart" in p.hint


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("3", 3),
        ("false", False),
        ("[a, b]", ["a", "b"]),
        ("plain words", "plain words"),
        ("", ""),
        ("0.85", 0.85),
    ],
)
def test_set_values_are_yaml_scalars(raw: str, value: object) -> None:
    rb = parse_runbook(GOOD, "rb.yaml")
    params = resolve_params(rb, {"anything": raw})
    assert params["anything"] == value
    assert params["mode"] == "fast" and params["restart"] is True


def test_params_are_substituted_into_action_args(ctx: PlanContext) -> None:
    rb = parse_runbook(GOOD, "rb.yaml")
    params = resolve_params(rb, {"tag": "monthly"})
    plan = build_runbook_plan(rb, ctx, params)
    note = next(st for st in plan.stages if st.name == "note")
    assert [s.commands[0].argv for s in note.steps] == [["logger", "-t", "sparkctl", "run monthly on fast"]]
    assert [s.host for s in note.steps] == ["spark-a"], "hosts: head"


def test_a_whole_value_parameter_keeps_its_type(ctx: PlanContext) -> None:
    up = load_runbook("up")
    for chosen, expected in ((None, ["chat"]), (["chat"], ["chat"])):
        params = resolve_params(up, {}) | {"workloads": chosen}
        plan = build_runbook_plan(up, ctx, params)
        started = [s.target for st in plan.stages for s in st.steps if s.kind == "workload" and s.host == "spark-a"]
        assert started == expected, chosen
    with pytest.raises(RunbookError, match="no workload named other"):  # a typo is an error, not a no-op
        build_runbook_plan(up, ctx, resolve_params(up, {}) | {"workloads": ["other"]})


SHELL_STRING = """\
name: say
parameters:
  msg:
    default: hello
  script:
    default: "echo from the author"
    raw: true
steps:
  - name: say
    action: shell
    shell: true
    hosts: head
    args:
      argv: [sh, -c, "echo ${msg} > said; ${script} >> said", sh, "${msg}"]
      env: {MSG: "<${msg}>"}
      description: "say ${msg}"
"""


def _said(ctx: PlanContext, sets: dict[str, str]) -> tuple[list[str], str | None, str]:
    """The step's own argv (after the shell that reads `env:` from stdin), its stdin and description."""
    rb = parse_runbook(SHELL_STRING, "rb.yaml")
    step = build_runbook_plan(rb, ctx, resolve_params(rb, sets)).stages[0].steps[0]
    argv = step.commands[0].argv
    return argv[argv.index("sh", 1) + 1 :], step.commands[0].stdin, step.description


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX sh")
def test_a_value_inside_a_shell_string_is_quoted_not_run(ctx: PlanContext, tmp_path: Path) -> None:
    argv, stdin, description = _said(ctx, {"msg": "$(touch pwned); touch pwned2"})
    script = argv[argv.index("-c") + 1]
    assert script.startswith("echo '$(touch pwned); touch pwned2' > said; "), script
    assert argv[-1] == "$(touch pwned); touch pwned2", "a whole argument is that argument, as given"
    assert stdin == "<$(touch pwned); touch pwned2>\n", "env values reach the program on stdin, unquoted"
    assert description == "say $(touch pwned); touch pwned2"
    subprocess.run(["sh", "-c", script], cwd=tmp_path, check=True, timeout=10)  # what the host's sh does with it
    assert (tmp_path / "said").read_text() == "$(touch pwned); touch pwned2\nfrom the author\n"
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "pwned2").exists()


def test_a_raw_parameter_is_inserted_as_shell_code(ctx: PlanContext) -> None:
    argv, _, _ = _said(ctx, {"msg": "hi", "script": "uname -r | tr a-z A-Z"})
    assert argv[argv.index("-c") + 1] == "echo hi > said; uname -r | tr a-z A-Z >> said"
    with pytest.raises(RunbookError) as info:  # `raw` is a yes or no, like `secret`
        parse_runbook(SHELL_STRING.replace("raw: true", "raw: sometimes"), "rb.yaml")
    assert "parameters.script.raw" in info.value.problems[0].where


@pytest.mark.parametrize(
    ("expr", "params", "holds"),
    [
        (None, {}, True),
        ("restart", {"restart": True}, True),
        ("restart", {"restart": False}, False),
        ("restart", {"restart": None}, False),
        ("not restart", {"restart": False}, True),
        ("not restart", {"restart": True}, False),
        ("mode == fast", {"mode": "fast"}, True),
        ("mode == fast", {"mode": "slow"}, False),
        ("mode != fast", {"mode": "slow"}, True),
        ("mtu == 9000", {"mtu": 9000}, True),
        ("flag == True", {"flag": True}, True),
        ("missing", {}, False),
    ],
)
def test_when_evaluation(expr: str | None, params: dict, holds: bool) -> None:
    assert when_holds(expr, params) is holds


def test_when_skips_steps_and_says_so(ctx: PlanContext) -> None:
    rb = parse_runbook(GOOD, "rb.yaml")
    plan = build_runbook_plan(rb, ctx, resolve_params(rb, {"restart": "false", "mode": "slow"}))
    assert [st.name for st in plan.stages] == ["check", "note", "slow-only"]
    assert any("stop-ray" in n and "skipped" in n for n in plan.notes)
    assert any("start-ray" in n and "skipped" in n for n in plan.notes)


# --- --from and --only -----------------------------------------------------------------------------------


def test_from_starts_at_the_named_step(ctx: PlanContext) -> None:
    rb = parse_runbook(GOOD, "rb.yaml")
    params = resolve_params(rb, {})
    start = step_index(rb, "stop-ray")
    assert start == 2
    plan = build_runbook_plan(rb, ctx, params, start=start)
    assert [st.name for st in plan.stages] == ["stop-ray", "start-ray"]


def test_only_plans_one_step(ctx: PlanContext) -> None:
    rb = parse_runbook(GOOD, "rb.yaml")
    plan = build_runbook_plan(rb, ctx, resolve_params(rb, {}), only="note")
    assert [st.name for st in plan.stages] == ["note"]


def test_from_an_unknown_step_lists_the_steps() -> None:
    rb = parse_runbook(GOOD, "rb.yaml")
    with pytest.raises(RunbookError) as info:
        step_index(rb, "stop-rey")
    assert info.value.problems[0].where == "--from stop-rey"
    assert "stop-ray" in info.value.problems[0].hint


def test_from_up_the_ray_stage_knows_nothing_changed_before(ctx: PlanContext) -> None:
    up = load_runbook("up")
    params = resolve_params(up, {})
    plan = build_runbook_plan(up, ctx, params, start=step_index(up, "ray-head"))
    assert plan.stages[0].name == "ray-head"
    head = plan.stages[0].steps[0]
    assert head.kind == "ray_node" and head.depends_on_earlier is False


# --- hosts selection and built-ins -----------------------------------------------------------------------


def test_host_selectors(ctx: PlanContext) -> None:
    assert [h.name for h in select_hosts(ctx, "all")] == ["spark-a", "spark-b"]
    assert [h.name for h in select_hosts(ctx, "head")] == ["spark-a"]
    assert [h.name for h in select_hosts(ctx, "workers")] == ["spark-b"]
    assert [h.name for h in select_hosts(ctx, "spark-b")] == ["spark-b"]
    with pytest.raises(RunbookError) as info:
        select_hosts(ctx, "spark-z")
    assert "spark-a" in info.value.problems[0].hint


@pytest.mark.parametrize("name", ["up", "down", "restore-network"])
def test_builtin_runbooks_are_valid(name: str) -> None:
    assert name in builtin_names()
    rb = load_runbook(name)
    assert rb.name == name
    for s in [*rb.steps, *rb.cleanup]:
        assert s.action in ACTIONS
        assert not ACTIONS[s.action].needs_shell_opt_in


def test_up_runs_in_the_documented_order() -> None:
    up = load_runbook("up")
    assert [s.action for s in up.steps] == [
        "fabric",
        "verify_fabric",
        "fabric_commit",
        "worker_env",
        "peer_access",
        "image_sync",
        "verify_image",
        "ray_image",
        "weights_fetch",
        "weights_copy",
        "weights_verify",
        "ray_firewall",
        "ray_token",
        "ray_start",
        "ray_start",
        "ray_ready",
        "drop_caches",
        "workload_start",
        "workload_ready",
        "verify_placement",
    ]
    assert [s.hosts for s in up.steps if s.action == "ray_start"] == ["head", "workers"]


def test_a_file_named_like_a_builtin_is_read_as_a_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("up").write_text(GOOD)
    assert load_runbook("up").name == "maintenance"
