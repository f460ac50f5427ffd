"""What sparkctl asks of vLLM: the `vllm serve` argv per rank count, and readiness of generative and pooling models."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from sparkctl.execute.http import probe_workload
from sparkctl.inventory.checks import check_inventory
from sparkctl.inventory.models import Inventory
from sparkctl.plan.layout import rank_hosts
from sparkctl.plan.workload_commands import workload_argv, workload_env

PAIR: dict[str, Any] = {
    "cluster": "lab",
    "hosts": [
        {"name": "a", "address": "10.0.0.11", "fabric": [{"interface": "enp1s0f1np1", "address": "192.168.100.10/24"}]},
        {"name": "b", "address": "10.0.0.12", "fabric": [{"interface": "enp1s0f1np1", "address": "192.168.100.11/24"}]},
    ],
}


def _inventory(tp: int, executor: str = "ray") -> Inventory:
    workload = {
        "name": "chat",
        "engine": "vllm",
        "model": "Qwen/Qwen3-0.6B",
        "tensor_parallel_size": tp,
        "executor": executor,
    }
    return Inventory.model_validate({**PAIR, "workloads": [workload]})


def test_ranks_on_several_sparks_ask_for_the_ray_executor() -> None:
    inv = _inventory(2)
    argv = workload_argv(inv, inv.workloads[0], "/home/spark")
    i = argv.index("--distributed-executor-backend")
    assert argv[i + 1] == "ray"
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"


def test_ranks_on_several_sparks_use_the_multiprocessing_executor_by_default() -> None:
    inv = Inventory.model_validate(
        {**PAIR, "workloads": [{"name": "chat", "engine": "vllm", "model": "Qwen/Qwen3-0.6B"}]}
    )
    w = inv.workloads[0]
    assert w.executor == "mp"
    argv = workload_argv(inv, w, "/home/spark", inv.hosts[1])
    assert argv[argv.index("--distributed-executor-backend") + 1] == "mp"
    assert argv[argv.index("--node-rank") + 1] == "1" and "--headless" in argv
    assert "RAY_ADDRESS" not in workload_env(inv, w)


def test_one_rank_leaves_the_executor_to_vllm() -> None:
    # vLLM picks "uni" for one rank (vllm/config/parallel.py); "ray" would need a Ray device key, which vLLM's CPU
    # build lacks, and gains nothing on one GPU.
    inv = _inventory(1)
    argv = workload_argv(inv, inv.workloads[0], "/home/spark")
    assert "--distributed-executor-backend" not in argv
    assert argv[:3] == ["/opt/sparkctl-runtime/bin/vllm", "serve", "Qwen/Qwen3-0.6B"]


class _Vllm(BaseHTTPRequestHandler):
    """vLLM's routes as its API server registers them for a generative or a pooling model."""

    tasks: tuple[str, ...] = ("generate",)
    seen: list[str]

    def log_message(self, fmt: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: Any) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:
        self.seen.append(f"GET {self.path}")
        if self.path == "/health":
            self._send(200, {})
        elif self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": "mini", "object": "model"}]})
        else:
            self._send(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        self.seen.append(f"POST {self.path}")
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path == "/v1/completions" and "generate" in self.tasks:
            self._send(200, {"object": "text_completion", "choices": [{"index": 0, "text": " pong"}]})
        elif self.path == "/v1/embeddings" and "embed" in self.tasks:
            self._send(200, {"object": "list", "data": [{"index": 0, "embedding": [0.1, 0.2]}]})
        else:  # a route the model's tasks did not register: FastAPI's 404
            self._send(404, {"detail": "Not Found"})


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[tuple[str, list[str]]]:
    seen: list[str] = []
    handler = type("H", (_Vllm,), {"tasks": request.param, "seen": seen})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("server", [("generate",)], indirect=True)
def test_a_generative_model_is_ready_after_one_completion(server: tuple[str, list[str]]) -> None:
    base, seen = server
    assert probe_workload(base, "mini", "k", "vllm").phase == "ready"
    assert seen == ["GET /health", "GET /v1/models", "POST /v1/completions"]


@pytest.mark.parametrize("server", [("embed",)], indirect=True)
def test_a_pooling_model_is_ready_after_one_embedding(server: tuple[str, list[str]]) -> None:
    base, seen = server
    assert probe_workload(base, "mini", "k", "vllm").phase == "ready"
    assert seen[-2:] == ["POST /v1/completions", "POST /v1/embeddings"]


@pytest.mark.parametrize("server", [()], indirect=True)
def test_a_model_answering_neither_stays_listed(server: tuple[str, list[str]]) -> None:
    base, _ = server
    probe = probe_workload(base, "mini", "k", "vllm")
    assert probe.phase == "listed" and "404" in probe.detail


def _mp(tp: int = 2, **extra: Any) -> Inventory:
    workload = {
        "name": "mini",
        "engine": "vllm",
        "model": "/models/mini",
        "tensor_parallel_size": tp,
        "executor": "mp",
        **extra,
    }
    return Inventory.model_validate({**PAIR, "workloads": [workload]})


def test_mp_executor_runs_one_vllm_serve_per_spark_head_first() -> None:
    inv = _mp()
    w = inv.workloads[0]
    assert [h.name for h in rank_hosts(inv, w)] == ["a", "b"]
    head = workload_argv(inv, w, "/home/spark", inv.host("a"))
    other = workload_argv(inv, w, "/home/spark", inv.host("b"))
    common = [
        "/opt/sparkctl-runtime/bin/vllm",
        "serve",
        "/models/mini",
        "--served-model-name",
        "mini",
        "--tensor-parallel-size",
        "2",
        "--distributed-executor-backend",
        "mp",
        "--nnodes",
        "2",
    ]
    assert head == [
        *common,
        "--node-rank",
        "0",
        "--master-addr",
        "192.168.100.10",
        "--gpu-memory-utilization",
        "0.85",
        "--host",
        "10.0.0.11",
        "--port",
        "8000",
    ]
    assert other == [
        *common,
        "--node-rank",
        "1",
        "--master-addr",
        "192.168.100.10",
        "--gpu-memory-utilization",
        "0.85",
        "--headless",
    ]
    assert workload_argv(inv, w, "/home/spark") == head  # no host: the head
    assert "RAY_ADDRESS" not in workload_env(inv, w)  # it never joins Ray


def test_mp_with_one_rank_is_a_plain_single_process() -> None:
    inv = _mp(tp=1)
    assert rank_hosts(inv, inv.workloads[0]) == []
    argv = workload_argv(inv, inv.workloads[0], "/home/spark")
    assert "--nnodes" not in argv and "--distributed-executor-backend" not in argv


@pytest.mark.parametrize(
    ("extra", "wanted"),
    [
        ({"tensor_parallel_size": 3}, "executor mp runs one rank per host: 3 ranks but 2 host(s)"),
        ({"engine": "embed", "executor": "ray"}, "executor is for engine 'vllm'"),
    ],
)
def test_mp_inventory_mistakes_are_refused(extra: dict[str, Any], wanted: str) -> None:
    workload = {
        "name": "mini",
        "engine": "vllm",
        "model": "/models/mini",
        "tensor_parallel_size": 2,
        "executor": "mp",
        **extra,
    }
    hosts = [{**h, "gpus": 2} for h in PAIR["hosts"]]
    inv = Inventory.model_validate({**PAIR, "hosts": hosts, "workloads": [workload]})
    assert wanted in [msg for _, msg, _ in check_inventory(inv)]
