"""Shell completion: the callbacks on good, bad and missing inventories, and Typer's protocol end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from sparkctl.cli.complete import (
    complete_host,
    complete_log_name,
    complete_runbook,
    complete_workload,
    complete_yaml_file,
)

REPO = Path(__file__).resolve().parents[2]
INVENTORY = """\
cluster: lab
hosts:
  - name: spark-a
    address: 10.0.0.11
  - name: spark-b
    address: 10.0.0.12
  - name: gpu-c
    address: 10.0.0.13
workloads:
  - name: chat
    engine: vllm
    model: Qwen/Qwen3-8B
  - name: embed
    engine: embed
    model: all-MiniLM-L6-v2
"""


def ctx(inventory: object = None) -> SimpleNamespace:
    return SimpleNamespace(params={"inventory": inventory})


@pytest.fixture
def inv(tmp_path: Path) -> Path:
    p = tmp_path / "lab.yaml"
    p.write_text(INVENTORY)
    return p


def test_names_come_from_the_inventory_given_with_i(inv: Path) -> None:
    assert complete_workload(ctx(inv), "") == ["chat", "embed"]
    assert complete_workload(ctx(str(inv)), "e") == ["embed"]
    assert complete_host(ctx(inv), "spark") == ["spark-a", "spark-b"]
    assert complete_host(ctx(inv), "") == ["spark-a", "spark-b", "gpu-c"]
    assert complete_log_name(ctx(inv), "") == ["ray", "chat", "embed"]


def test_without_i_the_environment_then_the_bundled_example(inv: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARKCTL_INVENTORY", str(inv))
    assert complete_workload(ctx(), "") == ["chat", "embed"]
    monkeypatch.delenv("SPARKCTL_INVENTORY")
    import yaml

    example = yaml.safe_load((REPO / "sparkctl" / "data" / "example-pair.yaml").read_text())
    assert complete_host(ctx(), "") == [h["name"] for h in example["hosts"]]


@pytest.mark.parametrize(
    "content",
    [
        "hosts: [unclosed\n",  # YAML syntax error
        "- just\n- a list\n",
        "hosts: 3\nworkloads: {a: 1}\n",
        "hosts:\n  - 42\n  - {name: [x]}\n  - {name: 'bad name'}\n  - {name: \"esc\\e\"}\n",
        "\x00\xff binary",
        "",
    ],
)
def test_a_broken_inventory_completes_nothing_and_raises_nothing(tmp_path: Path, content: str) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text(content, errors="surrogateescape")
    assert complete_host(ctx(p), "") == []
    assert complete_workload(ctx(p), "") == []
    assert complete_log_name(ctx(p), "") == ["ray"]


def test_a_missing_or_unreadable_inventory_completes_nothing(tmp_path: Path) -> None:
    assert complete_host(ctx(tmp_path / "nope.yaml"), "") == []
    assert complete_host(ctx(tmp_path), "") == []  # a directory
    big = tmp_path / "big.yaml"
    big.write_text("hosts:\n" + "  - {name: h}\n" * 200_000)  # > 1 MiB: not read
    assert complete_host(ctx(big), "") == []


def test_yaml_files_and_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "inventories").mkdir()
    (tmp_path / "inventories" / "lab.yaml").write_text("")
    (tmp_path / "inventories" / "lab.yml").write_text("")
    (tmp_path / "inventories" / "notes.txt").write_text("")
    (tmp_path / "pair.yaml").write_text("")
    (tmp_path / ".hidden.yaml").write_text("")
    monkeypatch.chdir(tmp_path)
    assert complete_yaml_file("") == ["inventories/", "pair.yaml"]
    assert complete_yaml_file("inv") == ["inventories/"]
    assert complete_yaml_file("inventories/") == ["inventories/lab.yaml", "inventories/lab.yml"]
    assert complete_yaml_file(".h") == [".hidden.yaml"]
    assert complete_yaml_file(f"{tmp_path}/p") == [f"{tmp_path}/pair.yaml"]
    assert complete_yaml_file("missing/dir/") == []


def test_runbooks_builtin_names_then_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "drain.yaml").write_text("")
    monkeypatch.chdir(tmp_path)
    assert complete_runbook("") == [
        "bench-fabric",
        "bench-serve",
        "down",
        "models-sync",
        "restore-network",
        "up",
        "drain.yaml",
    ]
    assert complete_runbook("d") == ["down", "drain.yaml"]


def _complete(words: str, env: dict[str, str] | None = None) -> list[str]:
    """What bash would offer: Typer's completion protocol (the script --show-completion prints drives it)."""
    parts = words.split(" ")
    run_env = {
        **os.environ,
        **(env or {}),
        "_SPARKCTL_COMPLETE": "complete_bash",
        "COMP_WORDS": words,
        "COMP_CWORD": str(len(parts) - 1),
        "PYTHONPATH": str(REPO),
    }
    code = "import sys; sys.argv = ['sparkctl']; from sparkctl.cli.app import main; main()"
    r = subprocess.run([sys.executable, "-c", code], env=run_env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    return r.stdout.split()


def test_typer_protocol_end_to_end(inv: Path, tmp_path: Path) -> None:
    assert _complete(f"sparkctl up -i {inv} -w ") == ["chat", "embed"]
    assert _complete(f"sparkctl logs -i {inv} --host sp") == ["spark-a", "spark-b"]
    assert _complete(f"sparkctl logs -i {inv} e") == ["embed"]
    assert _complete(f"sparkctl up -i {tmp_path}/l") == [str(inv)]
    assert _complete(f"sparkctl ask -i {inv} c") == ["chat"]
    assert _complete(f"sparkctl endpoint -i {inv} ") == ["chat", "embed"]
    bad = tmp_path / "broken.yaml"
    bad.write_text("hosts: [")
    assert _complete(f"sparkctl up -i {bad} -w ") == []


def test_install_completion_is_offered() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "sparkctl", "--show-completion", "bash"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    # typer's bash script sets the variable the protocol above reads, with the program's name
    assert r.returncode == 0 and "_SPARKCTL_COMPLETE=complete_bash" in r.stdout, r.stdout + r.stderr
