"""endpoint and ask through the CLI: the URL, the eval-able lines with the stored key, no secret created, one
request summarised (no host contacted)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from sparkctl.cli.app import app
from sparkctl.errors import EXIT_BAD_INPUT
from sparkctl.inventory import parse_inventory
from sparkctl.session import door
from sparkctl.session.access import ask, summarize_embedding

KEY = "sk-test-'quoted' $value"


@pytest.fixture
def inv_file(tmp_path: Path, example: Any) -> Path:
    text = str(example).rstrip("\n") + (
        "\n  - name: embed\n    engine: embed\n    model: all-MiniLM-L6-v2\n"
        "    tensor_parallel_size: 2\n    port: 8100\n"
    )
    path = tmp_path / "inv.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def run(isolated_state: Path, mocker: Any) -> Any:
    mocker.patch.object(door, "CONNECTOR", side_effect=AssertionError("the CLI tried to connect"))
    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args))


def test_endpoint_prints_the_base_url_and_needs_a_name_when_there_are_several(run: Any, inv_file: Path) -> None:
    r = run("endpoint", "chat", "-i", str(inv_file))
    assert (r.exit_code, r.output) == (0, "http://10.0.0.11:8000/v1\n")
    r = run("endpoint", "-i", str(inv_file))
    assert r.exit_code == EXIT_BAD_INPUT and "name one of: chat, embed" in r.output
    r = run("endpoint", "chta", "-i", str(inv_file))
    assert r.exit_code == EXIT_BAD_INPUT and "no workload named chta" in r.output


def test_endpoint_env_prints_the_stored_key_and_never_creates_one(
    run: Any, inv_file: Path, isolated_state: Path
) -> None:
    r = run("endpoint", "embed", "--env", "-i", str(inv_file))
    assert r.exit_code == EXIT_BAD_INPUT  # a missing secret is an input error (errors.SecretError)
    assert "no API key on this laptop" in r.output and "sparkctl up" in r.output
    assert not (isolated_state / "sparkctl" / "spark-pair").exists()  # a read-only command makes no secret
    keyfile = isolated_state / "sparkctl" / "spark-pair" / "api-key-embed"
    keyfile.parent.mkdir(parents=True)
    keyfile.write_text(KEY + "\n")
    r = run("endpoint", "embed", "--env", "-i", str(inv_file))
    assert r.exit_code == 0
    # the lines are for eval in a POSIX shell: the values come back exactly
    shown = subprocess.run(
        ["sh", "-c", 'eval "$1"; printf "%s\\n%s" "$OPENAI_BASE_URL" "$OPENAI_API_KEY"', "sh", r.output],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert shown == f"http://10.0.0.11:8100/v1\n{KEY}"
    assert KEY not in run("endpoint", "embed", "-i", str(inv_file)).output  # the key only when asked


def test_the_env_lines_configure_the_official_openai_client(inv_file: Path, isolated_state: Path) -> None:
    """openai reads OPENAI_BASE_URL and OPENAI_API_KEY itself (openai/_client.py): eval the lines, build a client."""
    pytest.importorskip("openai")
    keyfile = isolated_state / "sparkctl" / "spark-pair" / "api-key-embed"
    keyfile.parent.mkdir(parents=True)
    keyfile.write_text(KEY + "\n")
    env = {**os.environ, "XDG_STATE_HOME": str(isolated_state)}
    probe = "import openai; c = openai.OpenAI(); print(c.base_url); print(c.api_key)"
    line = f'eval "$({shlex.quote(sys.executable)} -m sparkctl endpoint embed --env -i {shlex.quote(str(inv_file))})"'
    out = subprocess.run(
        ["sh", "-c", f"{line} && exec {shlex.quote(sys.executable)} -c {shlex.quote(probe)}"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    ).stdout
    assert out == f"http://10.0.0.11:8100/v1/\n{KEY}\n"


class Recorder:
    """What ask uses of a Session: the inventory and post_json (answers recorded per URL)."""

    def __init__(self, inv: Any, answers: dict[str, tuple[int, Any]]) -> None:
        self.inventory, self.answers, self.sent = inv, answers, []

    def post_json(self, url: str, key: str | None, body: dict[str, Any], timeout: float = 60) -> tuple[int, Any]:
        self.sent.append((url, key, body))
        return self.answers[url]


def test_ask_a_chat_model_and_an_embedding_model(example: Any) -> None:
    inv = parse_inventory(example, "inv.yaml")
    chat = inv.workloads[0]
    answer = {
        "choices": [{"message": {"role": "assistant", "content": "Hello!"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 3},
    }
    s = Recorder(inv, {"http://10.0.0.11:8000/v1/chat/completions": (200, answer)})
    ticks = iter([1.0, 1.25])
    out = ask(s, chat, "hi", "k", clock=lambda: next(ticks))  # type: ignore[arg-type]
    assert (out["kind"], out["answer"], out["finish_reason"], out["latency_s"]) == ("chat", "Hello!", "stop", 0.25)
    assert s.sent == [
        (
            "http://10.0.0.11:8000/v1/chat/completions",
            "k",
            {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 128},
        )
    ]
    # vLLM serving a pooling model has no chat route: one embedding instead
    s = Recorder(
        inv,
        {
            "http://10.0.0.11:8000/v1/chat/completions": (404, {"detail": "Not Found"}),
            "http://10.0.0.11:8000/v1/embeddings": (200, {"data": [{"embedding": [3.0, 4.0]}], "usage": {}}),
        },
    )
    ticks = iter([0.0, 1.0, 1.5])
    out = ask(s, chat, "hi", "k", clock=lambda: next(ticks))  # type: ignore[arg-type]
    assert (out["kind"], out["embedding"], out["latency_s"]) == (
        "embedding",
        {"dimension": 2, "norm": 5.0, "first": [3.0, 4.0]},
        0.5,
    )


def test_a_refused_key_names_the_workload_and_the_fix(example: Any) -> None:
    from sparkctl.errors import HostError

    inv = parse_inventory(example, "inv.yaml")
    s = Recorder(inv, {"http://10.0.0.11:8000/v1/chat/completions": (401, {"error": "Unauthorized"})})
    with pytest.raises(HostError) as err:
        ask(s, inv.workloads[0], "hi", "wrong")  # type: ignore[arg-type]
    p = err.value.problems[0]
    assert "chat" in p.where and "answered 401: Unauthorized" in p.message and "sparkctl up" in p.hint


def test_an_embedding_summary() -> None:
    e = summarize_embedding([0.6, -0.8, 0.0, 0.0, 0.0, 0.0, 1e-7])
    assert e == {"dimension": 7, "norm": pytest.approx(1.0), "first": [0.6, -0.8, 0.0, 0.0, 0.0]}


def test_the_new_commands_help_loads_no_terminal_http_or_metrics_library() -> None:
    from tests.unit.test_cli import _loaded_after

    watched = ("rich", "prometheus_client", "openai", "httpx", "urllib.request", "sparkctl.session.session")
    for argv in (["status", "--help"], ["endpoint", "--help"], ["ask", "--help"]):
        assert _loaded_after(argv, watched) == [], argv
