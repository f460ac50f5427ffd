"""Secrets and state on the laptop: `secret: true` parameters redacted wherever secrets are, state 0700/0600,
exposed key and password files refused, and terminal control characters from any input escaped on output."""

from __future__ import annotations

import io
import json
import os
import shlex
import stat
import unicodedata
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sparkctl import state
from sparkctl.cli.app import app
from sparkctl.cli.render import Progress, escape_controls
from sparkctl.errors import EXIT_BAD_INPUT, SecretError, StateError
from sparkctl.execute.fake import RecordingTransport
from sparkctl.inventory import parse_inventory
from sparkctl.plan.context import fresh_facts
from sparkctl.runbook.load import parse_runbook, resolve_params
from sparkctl.session import door
from sparkctl.session.report import Event
from sparkctl.session.session import Session

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "inventories" / "example-pair.yaml"
SECRET = "hunter2-very-secret"

SECRET_RUNBOOK = """\
name: tokens
parameters:
  token:
    secret: true
    default: null
    description: a token the command needs
steps:
  - name: use
    action: shell
    shell: true
    hosts: head
    args: {argv: [register, --token-from-env], env: {TOKEN: "${token}"}, changes: true}
"""
ARGV_RUNBOOK = SECRET_RUNBOOK.replace(
    '[register, --token-from-env], env: {TOKEN: "${token}"}', '[register, "--token=${token}"]'
)
"""The parameter on the command line (refused while it is secret)."""


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- secret: true parameters ------------------------------------------------------------------------------


@pytest.mark.parametrize("as_json", [False, True])
def test_a_secret_parameter_is_redacted_in_the_plan(cli, tmp_path: Path, as_json: bool) -> None:
    rb = tmp_path / "rb.yaml"
    rb.write_text(SECRET_RUNBOOK)
    args = ["run", str(rb), "--dry-run", "--offline", "-i", str(EXAMPLE), "--set", f"token={SECRET}"]
    result = cli(*args, *(["--json"] if as_json else []))
    assert result.exit_code == 0, result.output
    assert SECRET not in result.output
    if as_json:
        cmd = json.loads(result.stdout)["stages"][0]["steps"][0]["commands"][0]
        assert cmd["argv"] == ["sh", "-c", SHELL_READS, "sh", "register", "--token-from-env"]
        assert cmd["stdin"] == "<redacted>\n"
    else:
        assert "run register --token-from-env (env TOKEN on stdin)" in result.output
        assert "sh register --token-from-env  < stdin" in result.output


def test_a_secret_parameter_with_a_wrong_value_is_not_echoed(cli, tmp_path: Path) -> None:
    rb = tmp_path / "rb.yaml"
    rb.write_text(SECRET_RUNBOOK.replace("default: null", "default: 12345"))
    result = cli("run", str(rb), "--dry-run", "--offline", "-i", str(EXAMPLE), "--set", f"token={SECRET}")
    assert result.exit_code == EXIT_BAD_INPUT
    assert SECRET not in result.output and "--set token" in result.output


def test_the_journal_keeps_no_secret_but_the_host_gets_the_value(isolated_state: Path) -> None:
    inv = parse_inventory(EXAMPLE.read_text())
    rb = parse_runbook(SECRET_RUNBOOK, "rb.yaml")
    params = resolve_params(rb, {"token": SECRET})
    transports = {h.name: RecordingTransport(h.name) for h in inv.hosts}
    events: list[Event] = []
    session = Session(inv, lambda i, name: transports[name], emit=events.append, transports=dict(transports))
    session.facts = {h.name: fresh_facts(inv, h) for h in inv.hosts}
    secrets = {"ray_token": "ray-token-0123456789"}
    plan = session.plan(rb, params, secrets)
    report = session.apply(rb, plan, params, secrets)
    assert report.ok, report
    # plan equals apply: the host got the real value, on stdin, never on a command line
    (call,) = [c for c in transports["spark-a"].calls if "register" in c.command]
    assert call.stdin == f"{SECRET}\n" and SECRET not in call.command
    journal = state.journal_path()
    text = journal.read_text()
    assert SECRET not in text
    record = json.loads(text)
    assert record["params"]["token"] == "<redacted>"
    assert record["executed"][0]["commands"][0]["argv"][-2:] == ["register", "--token-from-env"]
    assert record["steps"][0]["commands"][0]["command"].endswith("sh register --token-from-env  < stdin")
    assert mode(journal) == 0o600
    # ... nor the progress lines (the step's description is its command line)
    assert events and not any(SECRET in f"{e.step} {e.message}" for e in events)
    assert any("env TOKEN on stdin" in e.message for e in events)


SHELL_READS = 'IFS= read -r TOKEN && export TOKEN && exec "$@"'


def test_a_secret_parameter_in_a_shell_argv_or_a_workload_override_is_refused(cli, tmp_path: Path) -> None:
    """On a command line any user of the host could read it in the process list: exit 2 at the step's file:line."""
    rb = tmp_path / "rb.yaml"
    rb.write_text(ARGV_RUNBOOK)
    result = cli("run", str(rb), "--dry-run", "--offline", "-i", str(EXAMPLE), "--set", f"token={SECRET}")
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    located = f"{rb}:12 steps[0].args.argv[1]: secret parameter 'token' would be on the host's command line"
    assert located in result.output
    assert "hint: pass it in the step's env:" in result.output and SECRET not in result.output
    rb.write_text(
        SECRET_RUNBOOK.replace(
            "    action: shell\n    shell: true\n    hosts: head\n"
            '    args: {argv: [register, --token-from-env], env: {TOKEN: "${token}"}, changes: true}',
            '    action: workload_start\n    args: {set: {env: {HF_TOKEN: "${token}"}}}',
        )
    )
    result = cli("run", str(rb), "--dry-run", "--offline", "-i", str(EXAMPLE), "--set", f"token={SECRET}")
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert "steps[0].args.set: secret parameter 'token' would be on the host's command line" in result.output
    assert SECRET not in result.output


def test_a_shell_steps_env_reaches_the_program_but_no_command_line(tmp_path: Path) -> None:
    """The planned command, run by a real sh: the program sees the variable, no process's argv holds its value."""
    import subprocess
    import sys

    from sparkctl.plan.context import PlanContext
    from sparkctl.runbook.actions import ACTIONS, ShellArgs

    inv = parse_inventory(EXAMPLE.read_text())
    ctx = PlanContext(inv, {h.name: fresh_facts(inv, h) for h in inv.hosts})
    probe = (
        "import os; print(os.environ['TOKEN']); print(os.environ['OTHER']); print(open('/proc/self/cmdline').read())"
    )
    args = ShellArgs(argv=[sys.executable, "-c", probe], env={"TOKEN": SECRET, "OTHER": "two words"})
    (step,) = ACTIONS["shell"].plan(ctx, inv.head, args)
    (cmd,) = step.commands
    assert SECRET not in " ".join(cmd.argv)
    out = subprocess.run(cmd.argv, input=cmd.stdin, capture_output=True, text=True, check=True, timeout=30).stdout
    token, other, cmdline = out.splitlines()[:3]
    assert (token, other) == (SECRET, "two words")
    assert SECRET not in cmdline
    with pytest.raises(ValueError, match="not a variable name"):
        ShellArgs(argv=["x"], env={"1BAD": "v"})
    with pytest.raises(ValueError, match="one line"):
        ShellArgs(argv=["x"], env={"TOKEN": "a\nb"})


# --- laptop state: every directory 0700, every file 0600 ---------------------------------------------------


def test_state_dirs_are_0700_and_files_0600_at_every_level(tmp_path: Path, monkeypatch) -> None:
    base = tmp_path / "xdg" / "state"  # neither exists yet: mkdir(parents=True) would make them 0755
    monkeypatch.setenv("XDG_STATE_HOME", str(base))
    old = os.umask(0o022)
    try:
        state.ray_token("pair")
        state.api_key("pair", "chat", None)
        state.append_journal({"id": "x"})
    finally:
        os.umask(old)
    home = state.state_home()
    assert mode(base) == 0o700
    assert mode(home) == 0o700 and mode(home / "pair") == 0o700
    for f in (home / "pair" / "ray-token", home / "pair" / "api-key-chat", home / "journal.jsonl"):
        assert mode(f) == 0o600, f


def test_state_left_open_by_an_older_version_is_narrowed(isolated_state: Path) -> None:
    home = state.state_home()
    (home / "pair").mkdir(parents=True)
    home.chmod(0o755)
    (home / "pair").chmod(0o755)
    (home / "journal.jsonl").write_text("")
    (home / "journal.jsonl").chmod(0o644)
    (home / "pair" / "ray-token").write_text("old-token-value\n")
    (home / "pair" / "ray-token").chmod(0o644)
    assert state.ray_token("pair") == "old-token-value"
    state.append_journal({"id": "y"})
    assert mode(home) == 0o700 and mode(home / "pair") == 0o700
    assert mode(home / "journal.jsonl") == 0o600 and mode(home / "pair" / "ray-token") == 0o600


# --- the laptop's disk full: loud errors, nothing half-written ----------------------------------------------

FULL_DISK = """
import errno, json, os, resource, signal, sys
from sparkctl import state
from sparkctl.errors import StateError
from sparkctl.session import door

state.append_journal({"id": "before", "ok": True})
journal = state.journal_path()
size = journal.stat().st_size
# The files of this process may not grow past `limit` bytes: a write beyond it fails with EFBIG (SIGXFSZ ignored),
# as a write to a full filesystem fails with ENOSPC, after writing what fits.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = 40
assert size < limit
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
out = {}
for what, write in (
    ("journal", lambda: state.append_journal({"id": "after", "steps": ["x" * 200]})),
    ("token", lambda: state.ray_token("pair")),
    ("peer", lambda: state.peer_key("pair")),
):
    try:
        write()
        out[what] = "written"
    except StateError as exc:
        out[what] = [p.where, p.message, p.hint] if (p := exc.problems[0]) else None
    except BaseException as exc:
        out[what] = "unexpected " + type(exc).__name__
print(json.dumps(out))
"""


def test_a_full_laptop_disk_fails_loudly_and_leaves_nothing_half_written(isolated_state: Path) -> None:
    import subprocess
    import sys

    env = {**os.environ, "XDG_STATE_HOME": str(isolated_state), "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    r = subprocess.run([sys.executable, "-c", FULL_DISK], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    home = state.state_home()
    journal, token = home / "journal.jsonl", home / "pair" / "ray-token"
    # each write fails naming its file and the fix, never a traceback
    assert out["journal"][0] == str(journal) and out["journal"][1] == "cannot write: File too large"
    assert out["token"][0] == str(token) and out["token"][1] == "cannot write: File too large"
    assert out["peer"][0] == str(home / "pair" / "peer-key")
    assert all(f"`df -h {p.parent}`" in out[k][2] for k, p in (("journal", journal), ("token", token)))
    # the journal keeps its whole records only: the half record was cut off again
    assert [r["id"] for r in state.read_journal()] == ["before"]
    assert journal.read_text().endswith("}\n")
    # no secret file, half or empty, nor a temporary one, is left
    assert sorted(p.name for p in (home / "pair").iterdir()) == []
    # with room again, every write succeeds whole, and the journal reads on
    state.append_journal({"id": "after"})
    assert [r["id"] for r in state.read_journal()] == ["before", "after"]
    assert len(state.ray_token("pair") or "") == 64
    assert sorted(p.name for p in (home / "pair").iterdir()) == ["ray-token"]


def test_a_secret_write_failing_midway_leaves_no_file(isolated_state: Path, monkeypatch) -> None:
    import errno

    real_write = os.write

    def full(fd: int, data: bytes) -> int:
        if len(data) > 8:
            real_write(fd, bytes(data)[:8])  # what fits, then the disk is full
            return 8
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(StateError) as info:
        state.api_key("pair", "chat", None)
    (problem,) = info.value.problems
    path = state.state_home() / "pair" / "api-key-chat"
    assert (problem.where, problem.message) == (str(path), "cannot write: No space left on device")
    assert "XDG_STATE_HOME" in problem.hint
    assert list(path.parent.iterdir()) == []
    monkeypatch.setattr(os, "write", real_write)
    key = state.api_key("pair", "chat", None)
    assert key is not None and path.read_text() == key + "\n"


def test_an_empty_secret_left_by_a_failed_write_is_made_anew(isolated_state: Path) -> None:
    home = state.state_home()
    (home / "pair").mkdir(parents=True)
    (home / "pair" / "ray-token").write_text("")  # what an older version left when the disk was full
    token = state.ray_token("pair")
    assert token and len(token) == 64 and (home / "pair" / "ray-token").read_text() == token + "\n"
    assert state.ray_token("pair", create=False) == token


def test_a_run_whose_journal_cannot_be_written_reports_it_and_exits_1(isolated_state: Path, mocker) -> None:
    import errno

    from sparkctl.execute.base import Result
    from sparkctl.execute.fake import FailingConnect

    probe = "@@sparkctl identity\nspark\n/home/spark\nspark-x\n@@sparkctl end\n"
    took_lock = Result(0, "@@sparkctl-lock taken\n" + probe, "")  # and the probe run right after it
    fake = FailingConnect(unreachable=[], responses={"sh -s": Result(0, probe, ""), "t=$(mktemp": took_lock})
    mocker.patch.object(door, "CONNECTOR", return_value=fake)
    mocker.patch("sparkctl.state._write_all", side_effect=OSError(errno.ENOSPC, "No space left on device"))
    r = CliRunner().invoke(app, ["down", "--plain", "-i", str(EXAMPLE)])
    assert r.exit_code == 1, r.output
    journal = state.journal_path()
    assert f"error: this run is not in the journal: {journal}: cannot write: No space left on device" in r.stdout
    assert f"df -h {journal.parent}" in r.stdout
    assert "down on spark-pair: done" in r.stdout  # the run itself is reported as it went
    assert "Traceback" not in r.output and "unexpected" not in r.output
    assert state.read_journal() == []


# --- key and password files others can read -----------------------------------------------------------------


@pytest.mark.parametrize(("key", "expect"), [("ssh.identity_file", 0o644), ("sudo.password_file", 0o640)])
def test_an_exposed_secret_file_is_refused_before_connecting(cli, tmp_path: Path, key: str, expect: int) -> None:
    secret = tmp_path / "secret"
    secret.write_text("x\n")
    secret.chmod(expect)
    section, field = key.split(".")
    inv = tmp_path / "inv.yaml"
    inv.write_text(EXAMPLE.read_text().replace("ssh:\n", f"{section}:\n  {field}: {secret}\nssh:\n", 1))
    if section == "ssh":  # the example already has an ssh: section
        inv.write_text(EXAMPLE.read_text().replace("  user: nvidia\n", f"  user: nvidia\n  {field}: {secret}\n"))
    result = cli("down", "-i", str(inv))  # the connector fails the test if it is reached
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert f"error: {key} {secret}: permissions {expect:04o} are too open" in result.output
    assert f"hint: chmod 600 {secret}" in result.output
    secret.chmod(0o600)
    state.refuse_exposed(secret, key)  # 0600 passes


OFFLINE_PLANS = [("plan", "--offline"), ("run", "up", "--dry-run", "--offline")]


@pytest.mark.parametrize("command", OFFLINE_PLANS, ids=["plan", "run"])
def test_an_offline_plan_refuses_the_laptop_files_an_online_run_refuses(cli, tmp_path: Path, command) -> None:
    key = tmp_path / "id_missing"
    inv = tmp_path / "inv.yaml"
    inv.write_text(EXAMPLE.read_text().replace("  user: nvidia\n", f"  user: nvidia\n  identity_file: {key}\n"))
    result = cli(*command, "-i", str(inv))
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert f"error: ssh.identity_file {key}: no such file" in result.output
    assert "hint: " in result.output and "identity_file" in result.output.split("hint: ")[1]
    key.write_text("x\n")
    key.chmod(0o644)  # exposed: refused offline as online
    assert "permissions 0644 are too open" in cli(*command, "-i", str(inv)).output
    key.chmod(0o600)
    assert cli(*command, "-i", str(inv)).exit_code == 0
    inv.write_text(inv.read_text().replace("known_hosts: ~/.ssh/known_hosts", f"known_hosts: {tmp_path}"))
    result = cli(*command, "-i", str(inv))
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert f"error: ssh.known_hosts {tmp_path}: is a directory" in result.output


@pytest.mark.parametrize("command", [("plan",), ("status",), ("doctor",), ("up", "--yes")])
def test_a_missing_key_file_is_named_before_connecting(cli, tmp_path: Path, command) -> None:
    key = tmp_path / "id_missing"
    inv = tmp_path / "inv.yaml"
    host_b = "    address: 10.0.0.12\n"
    inv.write_text(EXAMPLE.read_text().replace(host_b, f"{host_b}    ssh: {{identity_file: {key}}}\n"))
    result = cli(*command, "-i", str(inv))  # the connector fails the test if it is reached
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert f"error: ssh.identity_file {key}: no such file" in result.output
    assert "hint: set ssh.identity_file in the inventory to your private key" in result.output
    assert "cannot connect" not in result.output and "network" not in result.output


def test_an_exposed_file_of_another_owner_is_left_to_the_os(tmp_path: Path, mocker) -> None:
    secret = tmp_path / "secret"
    secret.write_text("x\n")
    secret.chmod(0o644)
    mocker.patch("sparkctl.state.os.getuid", return_value=os.getuid() + 1)  # as OpenSSH: only the user's own files
    state.refuse_exposed(secret, "ssh.identity_file")
    mocker.stopall()
    with pytest.raises(SecretError):
        state.refuse_exposed(secret, "ssh.identity_file")


# --- control characters on output ------------------------------------------------------------------------

HOSTILE = ["\x1b[2J\x1b[31m", "\u202eevil", "\x9b31m", "a\rb", "\x07", "\u2066x\u2069", "\x7f"]


@pytest.mark.parametrize("text", HOSTILE)
def test_control_characters_are_escaped(text: str) -> None:
    shown = escape_controls(text)
    assert shown.isprintable(), repr(shown)
    assert "\\u" in shown


def test_every_invisible_format_and_separator_character_is_escaped() -> None:
    hidden = [chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) in ("Cc", "Cf", "Zl", "Zp")]
    assert "\u200b" in hidden and "\U000e0041" in hidden  # zero width space; a tag character (outside the BMP)
    for ch in hidden:
        if ch in "\t\n":
            continue
        shown = escape_controls(f"a{ch}b")
        assert shown.isascii() and shown.isprintable(), repr(shown)
        assert json.loads(f'"{shown}"') == f"a{ch}b", "the escape is a JSON escape of the same character"
    assert escape_controls("caf\u00e9 \u4e2d\u6587 \U0001f600 ok") == "caf\u00e9 \u4e2d\u6587 \U0001f600 ok"


def test_invisible_characters_from_the_inventory_are_escaped_in_the_plan(cli, tmp_path: Path) -> None:
    inv = tmp_path / "inv.yaml"
    hidden = "\u200b\u2060\u00ad\ufeff\U000e0041\u202e"
    inv.write_text(
        EXAMPLE.read_text().replace('"32768"]', f'"32768", "--x=a{hidden}b"]\n    env:\n      FOO: "v{hidden}w"')
    )
    text = cli("plan", "--offline", "-i", str(inv))
    assert text.exit_code == 0, text.output
    assert not any(ch in text.output for ch in hidden)
    assert "FOO=v\\u200b\\u2060\\u00ad\\ufeff\\udb40\\udc41\\u202ew" in text.output
    as_json = cli("plan", "--offline", "--json", "-i", str(inv))
    assert not any(ch in as_json.stdout for ch in hidden)
    assert f"--x=a{hidden}b" in json.dumps(json.loads(as_json.stdout), ensure_ascii=False)


def test_newlines_and_tabs_are_kept() -> None:
    assert escape_controls("a\tb\nc") == "a\tb\nc"


def test_host_output_in_progress_lines_is_escaped() -> None:
    out = io.StringIO()
    Progress(out)(Event("step_end", host="spark-a", step="x", status="failed", message="boom \x1b[2J\u202e"))
    assert "\x1b" not in out.getvalue() and "\u202e" not in out.getvalue()
    assert "\\u001b[2J\\u202e" in out.getvalue()


def test_an_inventory_value_with_escapes_is_printed_escaped(cli, tmp_path: Path) -> None:
    inv = tmp_path / "inv.yaml"
    # YAML's double-quoted escapes make real control characters out of plain ASCII text
    inv.write_text(EXAMPLE.read_text().replace("cluster: spark-pair", 'cluster: "pair\\e[31m\\u202e"'))
    result = cli("plan", "--offline", "-i", str(inv))
    assert result.exit_code == EXIT_BAD_INPUT
    assert "\x1b" not in result.output and "\u202e" not in result.output
    inv.write_text(EXAMPLE.read_text().replace("ssh:\n", '"bad\\e[2Jkey\\u202e": 1\nssh:\n'))
    result = cli("plan", "--offline", "-i", str(inv))
    assert result.exit_code == EXIT_BAD_INPUT
    assert "unknown key 'bad\\u001b[2Jkey\\u202e'" in result.output


def test_a_runbook_value_with_escapes_is_escaped_in_the_plan_and_valid_json(cli, tmp_path: Path) -> None:
    rb = tmp_path / "rb.yaml"
    rb.write_text(ARGV_RUNBOOK.replace("secret: true", "secret: false"))
    args = ["run", str(rb), "--dry-run", "--offline", "-i", str(EXAMPLE), "--set", 'token="x\\e[2J\\u202e\\x85"']
    text = cli(*args)
    assert text.exit_code == 0, text.output
    assert not any(ch in text.output for ch in "\x1b\u202e\x85")
    as_json = cli(*args, "--json")
    assert not any(ch in as_json.stdout for ch in "\x1b\u202e\x85")
    argv = json.loads(as_json.stdout)["stages"][0]["steps"][0]["commands"][0]["argv"]
    # inside a longer argv string of a shell step the value is shell-quoted (docs/runbooks.md)
    expected = ["register", "--token=" + shlex.quote("x\x1b[2J\u202e\x85")]
    assert argv == expected, "the escapes are JSON escapes: the data is intact"


def test_discover_refuses_an_exposed_identity_file(cli, tmp_path: Path, mocker) -> None:
    key = tmp_path / "id_ed25519"
    key.write_text("x\n")
    key.chmod(0o604)
    connect = mocker.patch("sparkctl.execute.ssh.connect", side_effect=AssertionError("connected"))
    result = cli("discover", "127.0.0.1", "--identity-file", str(key))
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert "permissions 0604 are too open" in result.output and f"hint: chmod 600 {key}" in result.output
    connect.assert_not_called()


HOST_COMMANDS = [
    ("plan",),
    ("up", "--yes"),
    ("down",),
    ("unlock", "--yes"),
    ("restore-network", "--yes"),
    ("run", "up", "--yes"),
    ("status",),
    ("logs", "ray"),
    ("doctor",),
    ("bench", "fabric"),
    ("models", "sync", "--yes"),
]


@pytest.mark.parametrize("command", HOST_COMMANDS, ids=[" ".join(c) for c in HOST_COMMANDS])
def test_every_command_that_reaches_hosts_refuses_a_world_readable_key(cli, tmp_path: Path, command) -> None:
    """They all open their session through the one door (session/door.py), which checks the laptop's files
    before any connection: `unlock` included."""
    key = tmp_path / "id_ed25519"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nx\n-----END OPENSSH PRIVATE KEY-----\n")
    key.chmod(0o644)
    inv = tmp_path / "inv.yaml"
    inv.write_text(EXAMPLE.read_text().replace("  user: nvidia\n", f"  user: nvidia\n  identity_file: {key}\n"))
    result = cli(*command, "-i", str(inv))  # the connector fails the test if it is reached
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert f"error: ssh.identity_file {key}: permissions 0644 are too open" in result.output
