"""A workload whose tensor-parallel group lost a rank: the probe calls it broken, the plan restarts it, the
readiness wait ends at once, and the embed worker records its health where the facts probe reads it."""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sparkctl.execute.fake import RecordingTransport
from sparkctl.execute.http import Probe, probe_workload
from sparkctl.facts.parse import parse_probe
from sparkctl.facts.probe import MARK
from sparkctl.inventory import parse_inventory
from sparkctl.plan import live_state, workload_stages
from sparkctl.plan import workload_commands as lc
from sparkctl.plan.context import PlanContext
from sparkctl.plan.models import Plan, Stage, Step, Wait
from sparkctl.session.engine import Engine

EXAMPLE = Path(__file__).resolve().parents[2] / "inventories" / "example-pair.yaml"
WHY = "tensor-parallel rank lost: group 0 rank 1 on spark-b (192.168.100.11) died (ActorDiedError)"


# chat under vLLM's Ray executor (the default is mp): a dead Ray worker ends its API server
RAY_EXECUTOR = EXAMPLE.read_text().replace(
    "    tensor_parallel_size: 2\n", "    tensor_parallel_size: 2\n    executor: ray\n"
)


def _server(status: int, body: dict[str, Any]) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{http.server_address[1]}"
    http.shutdown()
    http.server_close()


@pytest.fixture
def failed_endpoint() -> Iterator[str]:
    yield from _server(503, {"status": "failed", "error": WHY})


@pytest.fixture
def loading_endpoint() -> Iterator[str]:
    yield from _server(503, {"status": "loading"})


def test_probe_calls_a_failed_backend_broken_not_loading(failed_endpoint: str, loading_endpoint: str) -> None:
    assert probe_workload(failed_endpoint, "embed", "k", "embed", timeout=5) == Probe("broken", WHY)
    assert probe_workload(loading_endpoint, "embed", "k", "embed", timeout=5).phase == "loading"


def test_readiness_wait_ends_at_once_on_a_broken_workload() -> None:
    slept: list[float] = []
    step = Step(
        host="spark-a",
        kind="verify_workload",
        target="embed",
        description="d",
        changes=False,
        notes=["embed"],
        wait=Wait(kind="http", deadline=300, interval=1, url="http://x", model="embed"),
    )
    eng = Engine(
        transports={"spark-a": RecordingTransport("spark-a")},
        nopasswd={"spark-a": True},
        sleep=slept.append,
        probe=lambda *a: Probe("broken", WHY),
    )
    report = eng.run(
        Plan(cluster="c", runbook="up", hosts=["spark-a"], stages=[Stage(name="r", action="r", steps=[step])])
    )
    (res,) = report.results
    assert res.status == "failed" and "embed is broken" in res.error and "rank 1 on spark-b" in res.error
    assert slept == []  # not the 300 s deadline


@pytest.fixture
def embed_ctx() -> Any:
    text = EXAMPLE.read_text()
    inv = parse_inventory(text, "inv.yaml")
    inv = inv.model_copy(
        update={
            "workloads": [
                w.model_copy(update={"name": "embed", "engine": "embed", "tensor_parallel_size": 2})
                for w in inv.workloads[:1]
            ]
        }
    )
    return inv


def _facts(inv: Any, health: str | None) -> dict[str, Any]:
    w = inv.workloads[0]
    home = "/home/nvidia"
    files = {
        "embed_worker.py.sha256": "x",
        "workload-embed.pid": "4242",
        "workload-embed.spec": lc.workload_spec(inv, w, home),
    }
    if health is not None:
        files["workload-embed.health"] = health
    out = (
        f"{MARK} identity\nnvidia\n{home}\nspark-a\n{MARK} processes\n 4242 nvidia python3 embed_worker.py\n"
        f"{MARK} state_files\n" + "".join(f"{k}:{v}\n" for k, v in files.items())
    )
    head = parse_probe("spark-a", out)
    return {h.name: head.model_copy(update={"host": h.name}) for h in inv.hosts}


def test_the_probe_reads_the_recorded_health(embed_ctx: Any) -> None:
    facts = _facts(embed_ctx, f"failed {WHY}")
    assert facts["spark-a"].files["workload-embed.health"] == f"failed {WHY}"


def test_a_broken_workload_is_planned_for_a_restart(embed_ctx: Any) -> None:
    inv = embed_ctx
    ok = PlanContext(inv, _facts(inv, "ok"), {}, {"worker_code": "x"})
    assert live_state.workload_state(ok, inv.workloads[0]) == "ok"
    assert workload_stages.plan_workloads(ok, inv.head) == []
    broken = PlanContext(inv, _facts(inv, f"failed {WHY}"), {}, {"worker_code": "x"})
    assert live_state.workload_state(broken, inv.workloads[0]) == "broken"
    steps = [s for s in workload_stages.plan_workloads(broken, inv.head) if s.kind == "workload"]
    (restart,) = steps
    stop, start = restart.commands
    assert "kill -TERM" in stop.argv[2] and "setsid" in start.argv[2]
    assert any("broken" in d and "rank 1 on spark-b" in d for d in restart.diff)


def test_the_embed_argv_names_the_health_file_and_stop_removes_it(embed_ctx: Any) -> None:
    inv, home = embed_ctx, "/home/nvidia"
    argv = lc.workload_argv(inv, inv.workloads[0], home)
    assert argv[argv.index("--health-file") + 1] == lc.health_file(home, "embed")
    assert lc.health_file(home, "embed") in lc.build_workload_stop(inv, "embed", home)


def test_worker_records_loading_ok_and_failed(tmp_path: Path) -> None:
    embed = pytest.importorskip("sparkctl.workers.embed")

    class Tok:
        pad_id, max_seq_length = 0, 8

        def tokenize(self, texts: Any) -> list[list[int]]:
            return [[1] for _ in texts]

    class Broken:
        def embed_batches(self, batches: Any) -> Any:
            raise embed.BackendFailure("tensor-parallel group 0 failed: the actor died")

        def close(self) -> None:
            pass

    config = embed.BertConfig(
        vocab_size=10,
        hidden_size=4,
        num_hidden_layers=1,
        num_attention_heads=1,
        intermediate_size=4,
        max_position_embeddings=8,
    )
    service = embed.EmbeddingService("embed", "key", Tok(), config)
    service.health_file = tmp_path / "workload-embed.health"
    service.record("loading")
    assert service.health_file.read_text() == "loading\n"
    service.attach(Broken())
    assert service.health_file.read_text() == "ok\n"
    with pytest.raises(embed.RequestError):
        service.create_embeddings({"model": "embed", "input": "hi"})
    assert service.health_file.read_text().startswith("failed tensor-parallel group 0 failed")
    assert service.health() == (503, {"status": "failed", "error": "tensor-parallel group 0 failed: the actor died"})
    service.fail("a second reason")  # the first failure stays
    assert "group 0" in service.health_file.read_text()


def test_a_request_meeting_a_dead_rank_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray raises RayActorError for calls to a dead actor (ray.exceptions); the failure names rank and node."""
    embed = pytest.importorskip("sparkctl.workers.embed")
    import types

    class RayActorError(Exception):
        pass

    class GetTimeoutError(Exception):
        pass

    class Ref:
        def __init__(self, value: Any, error: Exception | None = None) -> None:
            self.value, self.error = value, error

    def get(refs: Any, timeout: float | None = None) -> Any:
        for ref in refs if isinstance(refs, list) else [refs]:
            if ref.error:
                raise ref.error
        return [r.value for r in refs] if isinstance(refs, list) else refs.value

    class Method:
        def __init__(self, value: Any, dead: bool) -> None:
            self.value, self.dead = value, dead

        def remote(self, *args: Any) -> Ref:
            return Ref(self.value, RayActorError("The actor died unexpectedly") if self.dead else None)

    class Actor:
        def __init__(self, rank: int, dead: bool) -> None:
            self.forward = Method("vectors", dead)
            self.ping = Method(rank, dead)

    fake = types.SimpleNamespace(
        get=get, exceptions=types.SimpleNamespace(RayActorError=RayActorError, GetTimeoutError=GetTimeoutError)
    )
    monkeypatch.setattr(embed, "_ray", lambda: fake)
    backend = embed.RayBackend(embed.RayOptions(model="m", max_seq_length=None, tp=2))
    backend.groups = [[Actor(0, False), Actor(1, True)]]
    backend.where = {(0, 0): "spark-a (192.168.100.10)", (0, 1): "spark-b (192.168.100.11)"}
    with pytest.raises(embed.BackendFailure) as err:
        backend._forward(0, ("ids", "mask"))
    assert str(err.value).startswith("tensor-parallel rank lost: group 0 rank 1 on spark-b (192.168.100.11) died")
    assert backend.dead_ranks() == ["group 0 rank 1 on spark-b (192.168.100.11) died (The actor died unexpectedly)"]
    backend.groups = [[Actor(0, False), Actor(1, False)]]
    assert backend.dead_ranks() == []


# --- a vLLM workload whose Ray worker died ------------------------------------------------------------------------

DIED = "ERROR 11-30 13:05:01 [ray_executor_v2.py:522] RayWorkerProc rank=[1] died unexpectedly, shutting down executor."


def _vllm_facts(inv: Any, *, running: bool, exit_line: str | None) -> dict[str, Any]:
    """Facts of a pair whose head recorded the chat workload (pid 4242), its process running or gone."""
    w = inv.workloads[0]
    home = "/home/nvidia"
    files = {"workload-chat.pid": "4242", "workload-chat.spec": lc.workload_spec(inv, w, home)}
    if exit_line is not None:
        files["workload-chat.exit"] = exit_line
    procs = " 4242 nvidia /opt/venv/bin/vllm serve\n" if running else " 17 nvidia bash\n"
    out = f"{MARK} identity\nnvidia\n{home}\nspark-a\n{MARK} processes\n{procs}{MARK} state_files\n" + "".join(
        f"{k}:{v}\n" for k, v in files.items()
    )
    head = parse_probe("spark-a", out)
    return {h.name: head.model_copy(update={"host": h.name}) for h in inv.hosts}


def test_the_probe_names_a_workload_whose_process_is_gone_with_the_why_from_its_log(tmp_path: Path) -> None:
    """The probe's loop, run by sh in a state dir: a dead recorded pid gives `workload-<name>.exit:<why>` (vLLM's
    'died unexpectedly' line first, else the last error); a live one gives nothing."""
    import subprocess

    from sparkctl.facts.probe import EXITED_WORKLOADS

    (tmp_path / "logs").mkdir()
    child = subprocess.Popen(["true"])  # a pid that is gone: a finished (and reaped) child's
    child.wait()
    (tmp_path / "workload-chat.pid").write_text(f"{child.pid}\n")
    (tmp_path / "logs" / "chat.log").write_text(f"INFO loading\n{DIED}\nERROR EngineCore encountered a fatal error.\n")
    (tmp_path / "workload-embed.pid").write_text(f"{child.pid}\n")
    (tmp_path / "logs" / "embed.log").write_text("ERROR first\nRuntimeError: last\n")
    # a live workload: its command line names `vllm serve`, as the recorded process's does
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "vllm", "serve", "m"])
    (tmp_path / "workload-live.pid").write_text(f"{live.pid}\n")
    # a pid that runs something else now (after a reboot the number may be another process's)
    (tmp_path / "workload-reused.pid").write_text(f"{os.getpid()}\n")
    try:
        r = subprocess.run(["sh", "-c", EXITED_WORKLOADS], cwd=tmp_path, capture_output=True, text=True, check=True)
    finally:
        live.kill()
        live.wait()
    assert sorted(r.stdout.splitlines()) == sorted(
        [f"workload-chat.exit:{DIED}", "workload-embed.exit:RuntimeError: last", "workload-reused.exit:"]
    )


def test_a_vllm_workload_that_exited_by_itself_is_broken_and_restarted_without_a_signal() -> None:
    inv = parse_inventory(RAY_EXECUTOR, "inv.yaml")
    w = inv.workloads[0]
    running = PlanContext(inv, _vllm_facts(inv, running=True, exit_line=None), {}, {})
    assert live_state.workload_state(running, w) == "ok"
    gone = PlanContext(inv, _vllm_facts(inv, running=False, exit_line=DIED), {}, {})
    assert live_state.workload_state(gone, w) == "broken"
    assert live_state.workload_health(gone, w) == f"failed exited by itself: {DIED}"
    (restart,) = [s for s in workload_stages.plan_workloads(gone, inv.head) if s.kind == "workload"]
    forget, start = restart.commands
    # the pid of a process that is gone is never signalled: its records are removed, then it starts again
    assert "kill" not in forget.argv[2] and forget.argv[2] == lc.build_workload_forget("/home/nvidia", "chat")
    assert "setsid" in start.argv[2]
    assert restart.diff[0] == f"- chat: broken (failed exited by itself: {DIED})"
    # without an exit record (an older probe) the same facts read as stopped, and it is only started
    old = PlanContext(inv, _vllm_facts(inv, running=False, exit_line=None), {}, {})
    assert live_state.workload_state(old, w) == "stopped"


def test_doctor_and_status_name_a_vllm_workload_that_exited_by_itself() -> None:
    from sparkctl.cli.render import render_status
    from sparkctl.doctor.evaluate import evaluate
    from sparkctl.doctor.evaluators import CheckContext
    from sparkctl.session.views import ClusterStatus, WorkloadStatus

    inv = parse_inventory(RAY_EXECUTOR, "inv.yaml")
    facts = _vllm_facts(inv, running=False, exit_line=DIED)
    (finding,) = [f for f in evaluate(CheckContext(inv, facts)) if f.rule == "workload-health"]
    assert finding.level == "fail" and "died unexpectedly" in finding.evidence
    ok = _vllm_facts(inv, running=True, exit_line=None)
    assert [f.level for f in evaluate(CheckContext(inv, ok)) if f.rule == "workload-health"] == ["pass"]
    text = render_status(
        ClusterStatus(
            cluster="c",
            topology="direct",
            hosts={},
            workloads={
                "chat": WorkloadStatus(
                    engine="vllm",
                    endpoint="http://x/v1",
                    head="spark-a",
                    process="broken",
                    health="down",
                    detail="[Errno 111] Connection refused",
                    recorded=f"failed exited by itself: {DIED}",
                )
            },
        )
    )
    assert f"broken: exited by itself: {DIED}; hint: sparkctl up restarts it" in text


def test_a_recorded_pid_that_now_runs_something_else_is_not_the_workload() -> None:
    """After a reboot the recorded number may belong to another process: it is not taken for the workload."""
    inv = parse_inventory(RAY_EXECUTOR, "inv.yaml")
    w = inv.workloads[0]
    facts = _vllm_facts(inv, running=True, exit_line=None)
    other = [p.model_copy(update={"args": "/usr/sbin/cron -f"}) for p in facts["spark-a"].processes]
    facts = {n: f.model_copy(update={"processes": other}) for n, f in facts.items()}
    assert live_state.workload_state(PlanContext(inv, facts, {}, {}), w) == "stopped"
    facts = {n: f.model_copy(update={"files": {**f.files, "workload-chat.exit": ""}}) for n, f in facts.items()}
    assert live_state.workload_state(PlanContext(inv, facts, {}, {}), w) == "broken"
