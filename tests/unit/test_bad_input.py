"""Hostile and mistaken input: every case ends in exit 2 with `file:line key.path`, what is wrong, and a hint.

The cases run through the real command line (typer's CliRunner, nothing contacted): `plan --offline` for
inventories, `run --dry-run --offline` for runbooks. The size and alias cases are also the bounds in
docs/promises.md; their cost is measured in benchmarks/bench_input.py, not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from sparkctl.errors import EXIT_BAD_INPUT
from sparkctl.inventory import reader

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = (REPO / "inventories" / "example-pair.yaml").read_text()


@dataclass(frozen=True)
class Case:
    """One bad input: the text (or bytes), and what the one error must say."""

    id: str
    text: str | bytes
    line_of: str | int  # a fragment on the blamed line, or the line number itself
    path: str  # the key path after `file:line ` ("" when the problem is the file itself)
    message: str
    hint: str


def edit(old: str, new: str, text: str = EXAMPLE) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


def line_number(text: str | bytes, fragment: str | int) -> int:
    if isinstance(fragment, int):
        return fragment
    lines = (text.decode("utf-8", "replace") if isinstance(text, bytes) else text).splitlines()
    hits = [n for n, line in enumerate(lines, 1) if fragment in line]
    assert len(hits) == 1, (fragment, hits)
    return hits[0]


def alias_bomb() -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    prev = "a"
    for name in "bcdefghi":
        lines.append(f"{name}: &{name} [{','.join(['*' + prev] * 9)}]")
        prev = name
    return "\n".join(lines) + "\n"


_HEAD = EXAMPLE.split("workloads:")[0]
HUGE = _HEAD + "workloads:\n" + "  - x\n" * (5 * 1024 * 1024 // 6)

INVENTORY_CASES = [
    Case(
        "alias-bomb",
        alias_bomb(),
        "e: &e",
        "e[0]",
        f"alias '*d' expands to 7381 values: more than {reader.MAX_VALUES} in all",
        "share smaller blocks",
    ),
    Case(
        "alias-without-anchor",
        edit("  port: 6379\n", "  port: *p\n"),
        "port: *p",
        "ray.port",
        "alias '*p' names no anchor before it",
        "define the anchor (&p) on the value before using it",
    ),
    Case(
        "alias-inside-its-anchor",
        edit("  port: 6379\n", "  port: 6379\n  ports: &p {node_manager: *p}\n"),
        "ports: &p",
        "ray.ports.node_manager",
        "alias '*p' is inside the value it names",
        "a value cannot contain itself",
    ),
    Case(
        "alias-as-a-key",
        edit("  port: 6379\n", "  port: &p 6379\n  *p : 1\n"),
        "*p : 1",
        "ray",
        "keys must be plain text, not an alias",
        "write the key out",
    ),
    Case(
        "alias-deeper-than-the-limit",
        "a: &a " + "[" * 20 + "]" * 20 + "\nb: " + "[" * 15 + "*a" + "]" * 15 + "\n",
        "b: ",
        "b" + "[0]" * 15,
        f"alias '*a' nests more than {reader.MAX_DEPTH} levels deep",
        "flatten",
    ),
    Case(
        "huge-file-5MB",
        HUGE,
        HUGE[: reader.MAX_BYTES].count("\n") + 1,
        "",
        "larger than 1024 KiB",
        "check the file name",
    ),
    Case(
        "many-values-under-the-size-limit",
        "- x\n" * (reader.MAX_VALUES + 10),
        reader.MAX_VALUES,
        f"[{reader.MAX_VALUES - 1}]",
        f"more than {reader.MAX_VALUES} values",
        "check the file name",
    ),
    Case(
        "not-utf8",
        edit("cluster: spark-pair", "cluster: caf\xe9").encode("latin-1"),
        "cluster: caf",
        "",
        "not UTF-8",
        "save the file as UTF-8",
    ),
    Case("utf-16", EXAMPLE.encode("utf-16"), 1, "", "UTF-16 text", "save the file as UTF-8"),
    Case("binary", b"\x7fELF\x02\x01\x01\x00\x00\x00\x00", 1, "", "binary data", "expected YAML text"),
    Case(
        "deep-flow-nesting", "cluster: " + "[" * 40 + "]" * 40 + "\n", 1, "cluster[0]", "nested more than 32", "flatten"
    ),
    Case(
        "deep-block-nesting",
        "".join("  " * n + f"k{n}:\n" for n in range(40)) + "  " * 40 + "v\n",
        "k32:",
        "k0.k1",
        "nested more than 32",
        "flatten",
    ),
    Case(
        "python-tag",
        edit("cluster: spark-pair", 'cluster: !!python/object/apply:os.system ["id"]'),
        "cluster:",
        "cluster",
        "tag !!python/object/apply:os.system is not allowed",
        "plain values only",
    ),
    Case(
        "control-character",
        edit("cluster: spark-pair", "cluster: spark\x1b[31m"),
        "cluster:",
        "",
        "0x001b is not allowed",
        "remove control characters",
    ),
    Case(
        "two-documents",
        EXAMPLE + "---\ncluster: other\n",
        "---",
        "",
        "a second YAML document",
        "one document per file",
    ),
    Case(
        "unclosed-bracket",
        edit("  port: 6379", "  port: [6379"),
        "workloads:",  # libyaml notices the missing ']' at the next token; the hint says "or just above it"
        "ray.port",
        "not valid YAML",
        "indentation and quoting",
    ),
    Case(
        "tab-indentation",
        edit("  mtu: 9000", "\tmtu: 9000"),
        "mtu: 9000",
        "",
        "not valid YAML",
        "indent with spaces",
    ),
    Case(
        "quoted-number",
        edit("mtu: 9000", 'mtu: "9000"'),
        "mtu:",
        "network.mtu",
        "valid integer (found '9000')",
        "write it without quotes: mtu: 9000",
    ),
    Case(
        "text-for-a-list",
        edit('    extra_args: ["--max-model-len", "32768"]', "    extra_args: --max-model-len 32768"),
        "extra_args",
        "workloads[0].extra_args",
        "valid list",
        "write a list",
    ),
    Case(
        "duplicate-key",
        edit("  port: 6379\n", "  port: 6379\n  port: 6380\n"),
        "port: 6380",
        "ray.port",
        f"key 'port' appears twice (first on line {line_number(EXAMPLE, '  port: 6379')})",
        "silently use the last",
    ),
    Case(
        "yaml-boolean-for-a-string",
        edit("cluster: spark-pair", "cluster: no"),
        "cluster: no",
        "cluster",
        "valid string (found False)",
        'quote it, e.g. cluster: "no"',
    ),
    Case(
        "yaml-null-for-a-string",
        edit("    model: Qwen/Qwen3-30B-A3B-Instruct-2507", "    model: ~"),
        "model: ~",
        "workloads[0].model",
        "valid string",
        "YAML reads ~ as null",
    ),
    Case(
        "gpus-yes",
        edit("    address: 10.0.0.12\n", "    address: 10.0.0.12\n    gpus: yes\n"),
        "gpus: yes",
        "hosts[1].gpus",
        "valid integer (found True)",
        "YAML reads yes as a boolean: write a whole number",
    ),
    Case(
        "ipv4-out-of-range",
        edit("10.0.0.12", "10.0.0.300"),
        "10.0.0.300",
        "hosts[1].address",
        "'10.0.0.300' is not an IP address",
        "four numbers from 0 to 255",
    ),
    Case(
        "numeric-dns-name",
        edit("10.0.0.12", "10.0.0.12.5"),
        "10.0.0.12.5",
        "hosts[1].address",
        "not an IP address",
        "four numbers",
    ),
    Case(
        "timeout-inf",
        edit("command_timeout: 120", "command_timeout: .inf"),
        "command_timeout",
        "ssh.command_timeout",
        "finite number",
        "finite number",
    ),
    Case(
        "timeout-nan",
        edit("connect_timeout: 10", "connect_timeout: .nan"),
        "connect_timeout",
        "ssh.connect_timeout",
        "finite number",
        "finite number",
    ),
    Case(
        "api-key-env-is-a-key",
        edit("    port: 8000\n", "    port: 8000\n    api_key_env: sk-live-0123456789abcdef\n"),
        "api_key_env",
        "workloads[0].api_key_env",
        "is not an environment variable name",
        "never put the secret itself",
    ),
    Case(
        "password-env-not-a-name",
        edit("ssh:\n", "sudo:\n  password_env: my password\nssh:\n"),
        "password_env",
        "sudo.password_env",
        "not an environment variable name",
        "e.g. VLLM_API_KEY",
    ),
    Case(
        "env-key-not-a-name",
        edit("    port: 8000\n", "    port: 8000\n    env:\n      NCCL_DEBUG: INFO\n      1BAD: x\n"),
        "1BAD",
        "workloads[0].env.1BAD",
        "'1BAD' is not an environment variable name",
        "NCCL_DEBUG",
    ),
    Case(
        "env-value-multiline",
        edit("    port: 8000\n", '    port: 8000\n    env:\n      NCCL_DEBUG: "INFO\\nrm -rf /"\n'),
        "NCCL_DEBUG",
        "workloads[0].env.NCCL_DEBUG",
        "must be a single line",
        "remove the line breaks",
    ),
    Case(
        "env-value-a-number",
        edit("    port: 8000\n", "    port: 8000\n    env:\n      NCCL_IB_GID_INDEX: 3\n"),
        "NCCL_IB_GID_INDEX",
        "workloads[0].env.NCCL_IB_GID_INDEX",
        "valid string (found 3)",
        'quote it, e.g. NCCL_IB_GID_INDEX: "3"',
    ),
    Case(
        "ray-worker-range-inverted",
        edit("  port: 6379\n", "  port: 6379\n  ports:\n    min_worker: 10199\n    max_worker: 10100\n"),
        "min_worker",
        "ray.ports.min_worker",
        "10199-10100 is inverted",
        "min_worker <= max_worker",
    ),
    Case(
        "ray-port-in-worker-range",
        edit("  port: 6379\n", "  port: 6379\n  ports:\n    dashboard: 10150\n"),
        "dashboard",
        "ray.ports.dashboard",
        "inside the worker port range 10100-10199",
        "move it out of the range",
    ),
    Case(
        "ray-ports-collide",
        edit("  port: 6379\n", "  port: 6379\n  ports:\n    dashboard: 6381\n"),
        "dashboard",
        "ray.ports.dashboard",
        "port 6381 is also ray.ports.node_manager",
        "its own number",
    ),
    Case(
        "slash-32",
        edit("192.168.100.11/24", "192.168.100.11/32"),
        "192.168.100.11/32",
        "hosts[1].fabric[0].address",
        "is a /32",
        "e.g. 192.168.100.11/24",
    ),
    Case(
        "link-subnet-mismatch",
        edit("192.168.100.11/24", "192.168.102.11/24"),
        "192.168.102.11",
        "hosts[1].fabric[0].address",
        "not in 192.168.100.0/24",
        "e.g. 192.168.100.1/24",
    ),
    Case("key-not-plain", "? [a, b]\n: c\n", 1, "", "keys must be plain text", "plain key"),
    Case(
        "cluster-name-too-long",
        edit("cluster: spark-pair", "cluster: " + "c" * 300),
        "cluster:",
        "cluster",
        "is 300 characters long; a plain name has at most 63",
        "shorten it",
    ),
    Case(
        "workload-name-too-long",
        edit("  - name: chat", "  - name: " + "w" * 64),
        "- name: www",
        "workloads[0].name",
        "is 64 characters long",
        "shorten it",
    ),
]


def _only_error(output: str) -> tuple[str, str]:
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    hints = [line for line in output.splitlines() if line.startswith("hint: ")]
    assert len(errors) == 1 and len(hints) == 1, output
    return errors[0].removeprefix("error: "), hints[0].removeprefix("hint: ")


def _assert_located(output: str, file: str, line: int, path: str, message: str, hint: str) -> None:
    error, got_hint = _only_error(output)
    where = f"{file}:{line} {path}" if path else f"{file}:{line}"
    assert error.startswith(f"{where}: "), f"expected {where!r} in {error!r}"
    assert message in error, error
    assert hint in got_hint, got_hint
    assert "Traceback" not in output and "unexpected" not in output


@pytest.mark.parametrize("case", INVENTORY_CASES, ids=[c.id for c in INVENTORY_CASES])
def test_bad_inventory_is_exit_2_located_with_a_hint(case: Case, cli, tmp_path: Path) -> None:
    path = tmp_path / "inv.yaml"
    if isinstance(case.text, bytes):
        path.write_bytes(case.text)
    else:
        path.write_text(case.text)
    result = cli("plan", "--offline", "-i", str(path))
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    _assert_located(result.output, str(path), line_number(case.text, case.line_of), case.path, case.message, case.hint)


# --- runbooks: at load time, and at plan time against the inventory --------------------------------------

RUNBOOK = """\
name: check
parameters:
  mb:
    default: 64
  mode:
    default: fast
  who:
    default: chat
steps:
  - name: bench
    action: bench_fabric
    args: {mb: "${mb}"}
  - name: note
    action: shell
    shell: true
    hosts: head
    args: {argv: [logger, "mode ${mode}"], changes: false}
  - name: start
    action: workload_start
    hosts: head
    args: {workloads: ["${who}"]}
"""


@dataclass(frozen=True)
class RunbookCase:
    id: str
    text: str
    sets: tuple[str, ...]
    where: str  # "rb.yaml:<line> <path>" with {line} taken from `line_of`, or a fixed subject like "--set mb"
    line_of: str
    message: str
    hint: str


def rb_edit(old: str, new: str) -> str:
    return edit(old, new, RUNBOOK)


RUNBOOK_CASES = [
    RunbookCase(
        "unknown-parameter",
        rb_edit('"mode ${mode}"', '"mode ${mdoe}"'),
        (),
        "rb.yaml:{line} steps[1].args.argv[1]",
        "mdoe",
        "unknown parameter '${mdoe}'",
        "did you mean 'mode'?",
    ),
    RunbookCase(
        "set-wrong-type",
        RUNBOOK,
        ("mb=lots",),
        "--set mb",
        "",
        "expected a whole number like the default 64, found 'lots'",
        "e.g. --set mb=3",
    ),
    RunbookCase(
        "set-not-yaml", RUNBOOK, ("mode=[fast",), "--set mode", "", "cannot read the value", "read as YAML: quote"
    ),
    RunbookCase(
        "set-python-tag",
        RUNBOOK,
        ("mode=!!python/object/apply:os.system [id]",),
        "--set mode",
        "",
        "tag !!python/object/apply:os.system is not allowed",
        "plain values only",
    ),
    RunbookCase(
        "set-out-of-range-for-the-step",
        RUNBOOK,
        ("mb=0",),
        "rb.yaml:{line} steps[0].args.mb",
        'args: {mb: "${mb}"}',
        "greater than or equal to 1 (from --set mb)",
        "MB sent per link",
    ),
    RunbookCase(
        "unknown-host-group",
        rb_edit("    hosts: head\n    args: {argv", "    hosts: heads\n    args: {argv"),
        (),
        "rb.yaml:{line} steps[1].hosts",
        "hosts: heads",
        "'heads' is not a host of spark-pair",
        "did you mean 'head'?",
    ),
    RunbookCase(
        "unknown-workload",
        RUNBOOK,
        ("who=chta",),
        "rb.yaml:{line} steps[2].args.workloads",
        'args: {workloads: ["${who}"]}',
        "no workload named chta",
        "did you mean 'chat'?",
    ),
    RunbookCase(
        "bad-workload-override",
        rb_edit('args: {workloads: ["${who}"]}', 'args: {workloads: ["${who}"], set: {gpu_memory_utilization: 0.99}}'),
        (),
        "rb.yaml:{line} steps[2].args.set.gpu_memory_utilization",
        "gpu_memory_utilization: 0.99",
        "less than or equal to 0.9",
        "SM121: 0.90 at most",
    ),
    RunbookCase(
        "unknown-workload-field",
        rb_edit('args: {workloads: ["${who}"]}', 'args: {workloads: ["${who}"], set: {modle: x}}'),
        (),
        "rb.yaml:{line} steps[2].args.set.modle",
        "modle: x",
        "unknown workload field 'modle'",
        "did you mean 'model'?",
    ),
    RunbookCase(
        "duplicate-key",
        rb_edit("    action: bench_fabric\n", "    action: bench_fabric\n    action: pause\n"),
        (),
        "rb.yaml:{line} steps[0].action",
        "action: pause",
        "key 'action' appears twice",
        "silently use the last",
    ),
    RunbookCase(
        "when-unreadable",
        rb_edit("    hosts: head\n    args: {argv", "    when: mode = fast\n    hosts: head\n    args: {argv"),
        (),
        "rb.yaml:{line} steps[1].when",
        "when: mode = fast",
        "cannot read when",
        "'param == value'",
    ),
]


@pytest.mark.parametrize("case", RUNBOOK_CASES, ids=[c.id for c in RUNBOOK_CASES])
def test_bad_runbook_is_exit_2_located_with_a_hint(case: RunbookCase, cli, tmp_path: Path) -> None:
    rb = tmp_path / "rb.yaml"
    rb.write_text(case.text)
    sets = [a for s in case.sets for a in ("--set", s)]
    result = cli("run", str(rb), "--dry-run", "--offline", "-i", str(REPO / "inventories" / "example-pair.yaml"), *sets)
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    error, hint = _only_error(result.output)
    where = case.where.format(line=line_number(case.text, case.line_of) if case.line_of else 0)
    where = where.replace("rb.yaml:", f"{rb}:")
    assert error.startswith(f"{where}: "), f"expected {where!r} in {error!r}"
    assert case.message in error, error
    assert case.hint in hint, hint


def test_when_without_spaces_reads_like_with_spaces(cli, tmp_path: Path) -> None:
    for when in ("mode==fast", "mode == fast", "mode=='fast'"):
        rb = tmp_path / "rb.yaml"
        rb.write_text(
            rb_edit("    hosts: head\n    args: {argv", f'    when: "{when}"\n    hosts: head\n    args: {{argv')
        )
        inv = str(REPO / "inventories" / "example-pair.yaml")
        ran = cli("run", str(rb), "--dry-run", "--offline", "-i", inv)
        skipped = cli("run", str(rb), "--dry-run", "--offline", "-i", inv, "--set", "mode=slow")
        assert ran.exit_code == 0 and skipped.exit_code == 0, ran.output + skipped.output
        assert "logger 'mode fast'" in ran.output and "skipped" not in ran.output, when
        assert "step 'note' skipped" in skipped.output, when


def test_a_text_parameter_takes_digits_as_text(cli, tmp_path: Path) -> None:
    rb = tmp_path / "rb.yaml"
    rb.write_text(RUNBOOK)
    inv = str(REPO / "inventories" / "example-pair.yaml")
    result = cli("run", str(rb), "--dry-run", "--offline", "-i", inv, "--set", "mode=3")
    assert result.exit_code == 0, result.output
    assert "logger 'mode 3'" in result.output


def test_discover_with_a_bad_address_is_bad_input(cli) -> None:
    result = cli("discover", "10.0.0.300")
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert "not an IP address" in result.output and "hint: " in result.output
    assert "unexpected" not in result.output


# --- the same answers from the pure-Python parser (PyYAML without libyaml) -------------------------------

FALLBACK_CASES = [
    c
    for c in INVENTORY_CASES
    if c.id
    in {
        "alias-bomb",
        "deep-flow-nesting",
        "python-tag",
        "control-character",
        "duplicate-key",
        "two-documents",
        "gpus-yes",
        "yaml-boolean-for-a-string",
    }
]


@pytest.mark.parametrize("case", FALLBACK_CASES, ids=[c.id for c in FALLBACK_CASES])
def test_without_libyaml_the_answers_are_the_same(case: Case, cli, tmp_path: Path, monkeypatch) -> None:
    import yaml

    monkeypatch.setattr(reader, "_PARSER", yaml.SafeLoader)
    path = tmp_path / "inv.yaml"
    path.write_text(case.text if isinstance(case.text, str) else "")
    result = cli("plan", "--offline", "-i", str(path))
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    _assert_located(result.output, str(path), line_number(case.text, case.line_of), case.path, case.message, case.hint)


def test_a_control_character_after_multibyte_text_is_on_its_line(cli, tmp_path: Path) -> None:
    path = tmp_path / "inv.yaml"
    text = EXAMPLE.replace("# Every field", "# Ünïcödé ✓✓✓✓✓✓✓✓\n# Every field").replace(
        "cluster: spark-pair", "cluster: a\x07"
    )
    path.write_text(text)
    result = cli("plan", "--offline", "-i", str(path))
    assert result.exit_code == EXIT_BAD_INPUT
    _assert_located(result.output, str(path), line_number(text, "cluster: a"), "", "0x0007 is not allowed", "remove")


def test_an_unknown_workload_option_is_blamed_on_the_option(cli) -> None:
    result = cli("plan", "--offline", "-w", "chta")
    assert result.exit_code == EXIT_BAD_INPUT
    assert _only_error(result.output) == (
        "--workload chta: spark-pair has no workload named chta",
        "did you mean 'chat'?",
    )


def test_runbook_validate_holds_workload_overrides_to_the_defaults(cli, tmp_path: Path) -> None:
    text = (REPO / "playbooks" / "recover-oom.yaml").read_text()
    rb = tmp_path / "rb.yaml"
    rb.write_text(edit("    default: 0.75\n", "    default: 0.95\n", text))
    result = cli("runbook", "validate", str(rb))
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    error, hint = _only_error(result.output)  # three steps use the default: one problem
    first = text.splitlines().index('      set: {gpu_memory_utilization: "${gpu_memory_utilization}"}') + 1
    assert error.startswith(f"{rb}:{first} steps[2].args.set.gpu_memory_utilization: "), error
    assert "less than or equal to 0.9" in error and "SM121: 0.90 at most" in hint
    rb.write_text(edit("set: {gpu_memory_utilization:", "set: {gpu_memory_utilisation:", text.replace(
        '      set: {gpu_memory_utilization: "${gpu_memory_utilization}"}\n    on_failure', "    on_failure"
    )))  # fmt: skip
    error, hint = _only_error(cli("runbook", "validate", str(rb)).output)
    assert "unknown workload field 'gpu_memory_utilisation'" in error and "gpu_memory_utilization" in hint
    # a parameter without a default (null, or required) leaves the inventory's value: nothing to check yet
    assert cli("runbook", "validate", str(REPO / "playbooks" / "swap-model.yaml")).exit_code == 0


SHARED = (
    edit(
        "    address: 10.0.0.12\n",
        "    address: 10.0.0.12\n    ssh: {user: *user}\n",
        edit(
            "  - name: chat\n    engine: vllm\n",
            "  - &chat\n    name: chat\n    engine: vllm\n",
            edit("  user: nvidia\n", "  user: &user nvidia\n"),
        ),
    )
    + "  - <<: *chat\n    name: chat-small\n    port: 8001\n    gpu_memory_utilization: 0.05\n"
)


def test_an_inventory_sharing_blocks_with_anchors_loads(cli, tmp_path: Path) -> None:
    from sparkctl.inventory import parse_inventory

    inv = parse_inventory(SHARED, "shared.yaml")
    assert inv.hosts[1].ssh.user == "nvidia"
    chat, small = inv.workloads
    assert small.name == "chat-small" and small.port == 8001 and small.gpu_memory_utilization == 0.05
    assert (small.model, small.extra_args, small.tensor_parallel_size) == (chat.model, chat.extra_args, 2)
    # what yaml.safe_load makes of the same text, merge key included
    import yaml

    assert reader.read_yaml(SHARED).data == yaml.safe_load(SHARED)
    path = tmp_path / "shared.yaml"
    path.write_text(SHARED)
    assert cli("plan", "--offline", "-i", str(path)).exit_code == 0


def test_an_error_inside_an_aliased_block_is_located_where_it_is_used(cli, tmp_path: Path) -> None:
    text = edit("network:\n", "network: &bad\n", edit("    ssh: {user: *user}\n", "    ssh: {user: *bad}\n", SHARED))
    path = tmp_path / "inv.yaml"
    path.write_text(text)
    result = cli("plan", "--offline", "-i", str(path))
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    error, _ = _only_error(result.output)  # the mapping behind *bad is not a user name
    assert error.startswith(f"{path}:{line_number(text, 'user: *bad')} hosts[1].ssh.user: "), error
    assert "valid string" in error


def test_merge_keys_take_mappings_only(cli, tmp_path: Path) -> None:
    path = tmp_path / "inv.yaml"
    text = SHARED.replace("  - <<: *chat\n", "  - <<: *user\n")
    path.write_text(text)
    result = cli("plan", "--offline", "-i", str(path))
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    error, hint = _only_error(result.output)
    assert error.startswith(f"{path}:{line_number(text, '<<: *user')} workloads[1].<<: "), error
    assert "merges mappings" in error and "a mapping" in hint
