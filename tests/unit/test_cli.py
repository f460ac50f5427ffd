"""The command line through typer's CliRunner (no host contacted), plus one real subprocess for exit codes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from sparkctl import state
from sparkctl.errors import EXIT_BAD_INPUT, EXIT_FAILED
from sparkctl.plan.models import Plan
from sparkctl.runbook.load import parse_runbook

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "inventories" / "example-pair.yaml"


def test_help_lists_the_commands(cli) -> None:
    result = cli("--help")
    assert result.exit_code == 0
    for command in ("plan", "up", "down", "run", "runbook", "history", "restore-network", "status"):
        assert command in result.output


def test_no_arguments_shows_usage(cli) -> None:
    result = cli()
    assert result.exit_code in (0, 2)
    assert "Usage" in result.output


def test_unknown_command_is_a_usage_error(cli) -> None:
    assert cli("nosuchcommand").exit_code == EXIT_BAD_INPUT


def test_version(cli) -> None:
    from sparkctl import __version__

    result = cli("--version")
    assert result.exit_code == 0 and __version__ in result.output


def test_importing_the_cli_loads_no_heavy_module() -> None:
    code = (
        "import sys, sparkctl.cli.app\n"
        "heavy = ('ray', 'torch', 'paramiko', 'fabric', 'invoke', 'vllm', 'sentence_transformers', 'numpy')\n"
        "print(' '.join(m for m in heavy if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"imported at startup: {r.stdout.strip()}"


def _loaded_after(argv: list[str], watched: tuple[str, ...]) -> list[str]:
    """Which of `watched` a real `python -m sparkctl <argv>` process has imported when it exits."""
    code = (
        "import atexit, sys, runpy\n"
        f"watched = {watched!r}\n"
        "def report():\n"
        "    hit = [m for m in watched if m in sys.modules]\n"
        "    sys.__stderr__.write('LOADED:' + ' '.join(hit) + '\\n')\n"
        "atexit.register(report)\n"
        f"sys.argv = ['sparkctl', *{argv!r}]\n"
        "runpy.run_module('sparkctl', run_name='__main__')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stderr.splitlines() if x.startswith("LOADED:"))
    return line.removeprefix("LOADED:").split()


def test_help_and_offline_plan_load_neither_ssh_nor_ray_nor_rich() -> None:
    watched = ("paramiko", "fabric", "invoke", "ray", "torch", "rich", "sparkctl.execute.ssh")
    assert _loaded_after(["--help"], watched) == []
    assert _loaded_after(["plan", "--offline", "-i", str(EXAMPLE)], watched) == []


def test_help_loads_typer_and_the_command_signatures_only() -> None:
    watched = (
        "pydantic",
        "pydantic_core",
        "yaml",
        "sparkctl.inventory",
        "sparkctl.inventory.models",
        "sparkctl.plan.models",
        "sparkctl.runbook.load",
        "sparkctl.session.engine",
        "sparkctl.session.session",
        "sparkctl.doctor.rules",
        "sparkctl.cli.render",
        "urllib.request",
    )
    assert _loaded_after(["--help"], watched) == []
    # Below the top level, Typer coerces the root's options first, and that loads pydantic (typer/_adapters.py).
    ours = tuple(m for m in watched if not m.startswith("pydantic"))
    assert _loaded_after(["plan", "--help"], ours) == []
    assert _loaded_after(["runbook", "--help"], ours) == []


def test_offline_plan_loads_neither_the_session_nor_the_rules_nor_http() -> None:
    watched = (
        "sparkctl.session.session",
        "sparkctl.session.engine",
        "sparkctl.doctor.rules",
        "sparkctl.doctor.preflight",
        "sparkctl.execute.http",
        "urllib.request",
        "http.client",
    )
    assert _loaded_after(["plan", "--offline", "-i", str(EXAMPLE)], watched) == []


def test_the_session_loads_urllib_only_when_a_command_talks_http() -> None:
    code = (
        "import sys\n"
        "import sparkctl.session.session\n"
        "print('urllib.request' in sys.modules, 'http.client' in sys.modules)\n"
        "from sparkctl.execute.http import probe_workload\n"
        "print(probe_workload('http://127.0.0.1:9', 'm', None, 'embed', timeout=1).phase)\n"
        "print('urllib.request' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    # port 9 (discard) on loopback: nothing listens, the probe answers "down" after loading urllib
    assert r.stdout.split() == ["False", "False", "down", "True"], r.stdout + r.stderr


# --- plan --offline --------------------------------------------------------------------------------------


def test_plan_offline_json_is_a_plan_with_fabric_and_env_steps(cli, isolated_state: Path) -> None:
    result = cli("plan", "--offline", "--json", "-i", str(EXAMPLE))
    assert result.exit_code == 0, result.output
    plan = Plan.model_validate_json(result.stdout)
    assert plan.offline and plan.runbook == "up" and plan.hosts == ["spark-a", "spark-b"]
    assert [st.name for st in plan.stages][:4] == ["fabric", "fabric-check", "fabric-commit", "env"]
    fabric = {(s.host, s.kind, s.target) for s in plan.stages[0].steps}
    for host in ("spark-a", "spark-b"):
        for twin in ("enp1s0f1np1", "enP2p1s0f1np1"):
            assert (host, "fabric_profile", twin) in fabric
            assert (host, "fabric_active", twin) in fabric
    adds = [s.commands[0] for s in plan.stages[0].steps if s.kind == "fabric_profile"]
    assert all(c.sudo and c.argv[:3] == ["nmcli", "connection", "add"] for c in adds)
    assert "192.168.101.11/24" in adds[-1].argv
    env = {s.host: s for s in plan.stages[3].steps if s.kind == "worker_env"}
    assert set(env) == {"spark-a", "spark-b"}
    # offline, no GID table is read: no index is invented (NCCL >= 2.21 picks per HCA), and the plan says so
    assert "NCCL_IB_GID_INDEX" not in (env["spark-a"].commands[0].stdin or "")
    assert any("left unset" in n for n in env["spark-a"].notes), env["spark-a"].notes
    assert "VLLM_HOST_IP=192.168.100.11\n" in env["spark-b"].commands[0].stdin
    # planning offline reads and writes no laptop secret
    assert not isolated_state.exists() or not any(isolated_state.rglob("*"))


def test_plan_offline_text_shows_the_commands(cli) -> None:
    result = cli("plan", "--offline", "-i", str(EXAMPLE))
    assert result.exit_code == 0, result.output
    assert "sudo nmcli connection add type ethernet con-name sparkctl-enp1s0f1np1" in result.stdout
    assert "ping -M do -s 8972" in result.stdout
    assert result.stdout.count("spark-a:") >= 1 and result.stdout.count("spark-b:") >= 1


def test_plan_offline_for_one_workload(cli, tmp_path: Path) -> None:
    inv = tmp_path / "inv.yaml"
    inv.write_text(
        EXAMPLE.read_text()
        + "  - name: embed\n    engine: embed\n    model: all-MiniLM-L6-v2\n"
        + "    port: 8001\n    tensor_parallel_size: 2\n"
    )
    result = cli("plan", "--offline", "--json", "-i", str(inv), "-w", "embed")
    assert result.exit_code == 0, result.output
    plan = Plan.model_validate_json(result.stdout)
    started = [s.target for st in plan.stages for s in st.steps if s.kind == "workload"]
    assert started == ["embed"]


def test_plan_uses_sparkctl_inventory_env_var(cli, tmp_path: Path, monkeypatch) -> None:
    inv = tmp_path / "lab.yaml"
    inv.write_text(EXAMPLE.read_text().replace("cluster: spark-pair", "cluster: lab"))
    monkeypatch.setenv("SPARKCTL_INVENTORY", str(inv))
    result = cli("plan", "--offline", "--json")
    assert result.exit_code == 0, result.output
    assert Plan.model_validate_json(result.stdout).cluster == "lab"


def test_plan_with_bad_inventory_exits_2(cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(EXAMPLE.read_text().replace("  mtu: 9000", "  mut: 9000"))
    result = cli("plan", "--offline", "-i", str(bad))
    assert result.exit_code == EXIT_BAD_INPUT
    assert f"error: {bad}:13 network.mut: unknown key 'mut'" in result.stderr
    assert "hint: did you mean 'mtu'?" in result.stderr
    assert result.stdout == ""


# --- run FILE --dry-run --offline --------------------------------------------------------------------------

PLAYBOOK = """\
name: tune
description: Fabric, env, then a command of our own.
parameters:
  greeting:
    default: hello
  with_env:
    default: true
steps:
  - name: net
    action: fabric
  - name: commit
    action: fabric_commit
  - name: env
    action: worker_env
    when: with_env
  - name: say
    action: shell
    shell: true
    hosts: head
    args: {argv: [echo, "${greeting}"], changes: false}
"""


@pytest.fixture
def playbook(tmp_path: Path) -> Path:
    path = tmp_path / "playbooks" / "tune.yaml"
    path.parent.mkdir()
    path.write_text(PLAYBOOK)
    return path


def _dry(cli, *args: str) -> Plan:
    result = cli("run", *args, "--dry-run", "--offline", "--json", "-i", str(EXAMPLE))
    assert result.exit_code == 0, result.output
    return Plan.model_validate_json(result.stdout)


def test_run_playbook_dry_run_offline(cli, playbook: Path) -> None:
    plan = _dry(cli, str(playbook))
    assert plan.runbook == "tune"
    assert [st.name for st in plan.stages] == ["net", "commit", "env", "say"]
    say = plan.stages[-1].steps
    assert [(s.host, s.commands[0].argv, s.changes) for s in say] == [("spark-a", ["echo", "hello"], False)]


def test_run_with_set_and_when(cli, playbook: Path) -> None:
    plan = _dry(cli, str(playbook), "--set", "greeting=bonjour", "--set", "with_env=false")
    assert [st.name for st in plan.stages] == ["net", "commit", "say"]
    assert plan.stages[-1].steps[0].commands[0].argv == ["echo", "bonjour"]
    assert any("env" in n and "skipped" in n for n in plan.notes)


def test_run_set_unknown_parameter_exits_2(cli, playbook: Path) -> None:
    result = cli("run", str(playbook), "--set", "greting=x", "--dry-run", "--offline", "-i", str(EXAMPLE))
    assert result.exit_code == EXIT_BAD_INPUT
    assert "greting" in result.stderr and "greeting" in result.stderr


def test_run_set_without_equals_exits_2(cli, playbook: Path) -> None:
    result = cli("run", str(playbook), "--set", "greeting", "--dry-run", "--offline", "-i", str(EXAMPLE))
    assert result.exit_code == EXIT_BAD_INPUT


def test_run_from_unknown_step_exits_2(cli, playbook: Path) -> None:
    result = cli("run", str(playbook), "--from", "nope", "--dry-run", "--offline", "-i", str(EXAMPLE))
    assert result.exit_code == EXIT_BAD_INPUT
    assert "net, commit, env, say" in result.stderr


def test_run_from_and_only_shape_the_offline_plan(cli, playbook: Path) -> None:
    assert [st.name for st in _dry(cli, str(playbook), "--from", "env").stages] == ["env", "say"]
    assert [st.name for st in _dry(cli, str(playbook), "--only", "say").stages] == ["say"]
    # a fabric change is rolled back by the hosts unless committed: --only its step runs the commit too
    assert [st.name for st in _dry(cli, str(playbook), "--only", "net").stages] == ["net", "commit"]


def test_runbook_without_a_commit_after_fabric_is_refused(cli, tmp_path: Path) -> None:
    bad = tmp_path / "nocommit.yaml"
    bad.write_text(PLAYBOOK.replace("  - name: commit\n    action: fabric_commit\n", ""))
    result = cli("runbook", "validate", str(bad))
    assert result.exit_code == EXIT_BAD_INPUT
    line = PLAYBOOK.splitlines().index("    action: fabric") + 1
    assert f"{bad}:{line} steps[0].action" in result.stderr
    assert "rolled back" in result.stderr and "fabric_commit" in result.stderr


def test_run_builtin_by_name(cli) -> None:
    plan = _dry(cli, "down")
    assert plan.runbook == "down"
    assert [st.name for st in plan.stages] == ["workloads", "strays", "ray", "check"]
    assert plan.changes == 0, "fresh hosts have nothing to stop"


# --- runbook list / show / validate ------------------------------------------------------------------------


def test_runbook_list_names_builtins_and_actions(cli) -> None:
    result = cli("runbook", "list")
    assert result.exit_code == 0
    names = {line.split(":")[0] for line in result.stdout.splitlines() if line and not line.startswith(" ")}
    assert {"up", "down", "restore-network"} <= names
    actions = {line.split(":")[0].strip() for line in result.stdout.splitlines() if line.startswith("  ")}
    assert {"fabric", "worker_env", "ray_start", "shell", "workload_stop"} <= actions


def test_runbook_show_up_is_a_valid_runbook(cli) -> None:
    result = cli("runbook", "show", "up")
    assert result.exit_code == 0
    rb = parse_runbook(result.stdout, "shown")
    assert rb.name == "up"
    assert [s.name for s in rb.steps][:4] == ["fabric", "fabric-check", "fabric-commit", "env"]


def test_runbook_show_unknown_exits_2(cli) -> None:
    result = cli("runbook", "show", "upp")
    assert result.exit_code == EXIT_BAD_INPUT
    assert "up" in result.stderr


def test_runbook_validate(cli, playbook: Path, tmp_path: Path) -> None:
    ok = cli("runbook", "validate", str(playbook))
    assert ok.exit_code == 0 and f"{playbook}: ok" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(PLAYBOOK.replace("action: worker_env", "action: worker_envv"))
    result = cli("runbook", "validate", str(playbook), str(bad))
    assert result.exit_code == EXIT_BAD_INPUT
    line = PLAYBOOK.splitlines().index("    action: worker_env") + 1
    assert f"error: {bad}:{line} steps[2].action: unknown action 'worker_envv'" in result.stderr
    assert "did you mean 'worker_env'" in result.stderr


# --- history ---------------------------------------------------------------------------------------------


def test_history_on_an_empty_state_dir(cli, isolated_state: Path) -> None:
    result = cli("history")
    assert result.exit_code == 0
    assert result.stdout.strip() == ""
    as_json = cli("history", "--json")
    assert as_json.exit_code == 0 and json.loads(as_json.stdout) == []


def test_history_lists_and_shows_a_recorded_run(cli, isolated_state: Path) -> None:
    state.append_journal(
        {
            "id": "20250101-120000-ab12",
            "cluster": "spark-pair",
            "runbook": "up",
            "ok": False,
            "started": 1.0,
            "ended": 2.0,
            "planned_changes": 3,
            "steps": [
                {
                    "host": "spark-b",
                    "stage": "fabric",
                    "step": "fabric_profile:enp1s0f1np1",
                    "status": "failed",
                    "error": "exit 4",
                    "commands": [{"command": "sudo nmcli connection add", "exit_code": 4}],
                }
            ],
        }
    )
    listed = cli("history", "--json")
    assert listed.exit_code == 0
    assert [r["id"] for r in json.loads(listed.stdout)] == ["20250101-120000-ab12"]
    shown = cli("history", "show", "20250101-120000-ab12", "--json")
    assert shown.exit_code == 0
    assert json.loads(shown.stdout)["steps"][0]["status"] == "failed"
    missing = cli("history", "show", "nope")
    assert missing.exit_code == EXIT_BAD_INPUT


def test_history_skips_a_corrupt_journal_line(cli, isolated_state: Path) -> None:
    path = state.journal_path()
    path.parent.mkdir(parents=True)
    path.write_text('{"id": "a", "cluster": "c", "runbook": "up", "ok": true}\nnot json\n')
    result = cli("history", "--json")
    assert result.exit_code == 0
    assert [r["id"] for r in json.loads(result.stdout)] == ["a"]


# --- a real process ----------------------------------------------------------------------------------------


def _sparkctl(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    env.pop("SPARKCTL_INVENTORY", None)
    return subprocess.run(
        [sys.executable, "-m", "sparkctl", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=tmp_path,
    )


def test_exit_codes_of_the_real_program(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(EXAMPLE.read_text().replace("head: spark-a", "head: spark-x"))
    r = _sparkctl("plan", "--offline", "-i", str(bad), tmp_path=tmp_path)
    assert r.returncode == EXIT_BAD_INPUT
    assert "Traceback" not in r.stderr
    assert f"error: {bad}:" in r.stderr and "ray.head" in r.stderr
    good = _sparkctl("plan", "--offline", "--json", "-i", str(EXAMPLE), tmp_path=tmp_path)
    assert good.returncode == 0, good.stderr
    assert Plan.model_validate_json(good.stdout).hosts == ["spark-a", "spark-b"]


def test_bundled_example_is_the_default_inventory(cli) -> None:
    result = cli("plan", "--offline", "--json")
    assert result.exit_code == 0
    assert Plan.model_validate_json(result.stdout).cluster == yaml.safe_load(EXAMPLE.read_text())["cluster"]


def _leave(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """A real process that ends through sparkctl's exit (`leave`), after an atexit handler and much output."""
    script = (
        "import atexit, sys, threading, time\n"
        "from sparkctl.cli.app import leave\n"
        "atexit.register(lambda: print('atexit handler ran', file=sys.stderr))\n"
        "sys.stdout.write('x' * 200000)\n"
        "def late():\n"
        "    time.sleep(0.3)\n"
        "    print('thread finished', file=sys.stderr)\n"
        f"{code}\n"
    )
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip


def test_the_fast_exit_keeps_what_an_exit_promises(tmp_path: Path) -> None:
    r = _leave("leave(3)", tmp_path)
    assert r.returncode == 3
    assert len(r.stdout) == 200000  # buffered output is flushed, not lost with the skipped teardown
    assert "atexit handler ran" in r.stderr
    r = _leave("leave(None)", tmp_path)
    assert r.returncode == 0 and "atexit handler ran" in r.stderr
    r = _leave("leave('error: gone')", tmp_path)
    assert r.returncode == 1 and "error: gone" in r.stderr
    # a thread the interpreter would wait for: the normal exit, which waits for it
    r = _leave("threading.Thread(target=late).start()\nleave(4)", tmp_path)
    assert r.returncode == 4 and "thread finished" in r.stderr and len(r.stdout) == 200000


class _Hangup:
    """A loopback TCP port that accepts every connection and closes it at once (no SSH banner)."""

    def __init__(self, address: str) -> None:
        self.sock = socket.create_server((address, 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed by the test
                return
            conn.close()


@pytest.mark.parametrize("command", [["plan"], ["status"], ["doctor"], ["up", "--yes"]])
def test_ssh_library_logs_stay_off_the_terminal(command: list[str], tmp_path: Path) -> None:
    ports = {name: _Hangup(addr) for name, addr in (("spark-a", "127.0.0.1"), ("spark-b", "127.0.0.2"))}
    inv = tmp_path / "inv.yaml"
    text = EXAMPLE.read_text().replace("  port: 22\n", "").replace("~/.ssh/known_hosts", str(tmp_path / "kh"))
    for name, old in (("spark-a", "10.0.0.11"), ("spark-b", "10.0.0.12")):
        new = f"{ports[name].sock.getsockname()[0]}\n    ssh: {{port: {ports[name].port}}}"
        text = text.replace(f"address: {old}", f"address: {new}")
    inv.write_text(text)
    try:
        r = _sparkctl(*command, "-i", str(inv), tmp_path=tmp_path)
    finally:
        for p in ports.values():
            p.sock.close()
    assert r.returncode == EXIT_FAILED, r.stderr
    assert "error: spark-a: SSH session with 127.0.0.1:" in r.stderr
    assert "Error reading SSH protocol banner" in r.stderr
    for noise in ("Traceback", "Exception (client)", "paramiko", "EOFError"):
        assert noise not in r.stderr, r.stderr
    debug = _sparkctl(*command, "-i", str(inv), "--debug", tmp_path=tmp_path)
    assert "paramiko.transport" in debug.stderr  # the library's own log lines are there on request
