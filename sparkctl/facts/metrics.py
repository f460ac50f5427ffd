"""Workload counters from a `/metrics` page (Prometheus text format), parsed by prometheus_client's own parser.

vLLM 0.32 registers its counters through prometheus_client (vllm/v1/metrics/loggers.py, PrometheusStatLogger):
`vllm:request_success` (labels model_name, engine, finished_reason), `vllm:prompt_tokens` and
`vllm:generation_tokens` (labels model_name, engine); prometheus_client exposes a counter's value as the sample
`<name>_total`. The gauges `vllm:num_requests_running` / `vllm:num_requests_waiting` are in the same file. The
built-in embed worker (sparkctl/workers/embed.py) serves `sparkctl_embed_request_success_total` and
`sparkctl_embed_prompt_tokens_total` in the same format.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field

VLLM_COUNTERS = {
    "requests": "vllm:request_success",
    "prompt_tokens": "vllm:prompt_tokens",
    "generation_tokens": "vllm:generation_tokens",
}
VLLM_GAUGES = {"running": "vllm:num_requests_running", "waiting": "vllm:num_requests_waiting"}
EMBED_COUNTERS = {"requests": "sparkctl_embed_request_success", "prompt_tokens": "sparkctl_embed_prompt_tokens"}
EMBED_GAUGES: dict[str, str] = {}


class Counters(BaseModel):
    """A workload's counters at one moment: totals summed over every label set (engines, finish reasons)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    totals: dict[str, float] = Field(default_factory=dict, description="requests, prompt_tokens, generation_tokens")
    gauges: dict[str, float] = Field(default_factory=dict, description="running, waiting")


def parse_metrics(text: str, counters: Mapping[str, str], gauges: Mapping[str, str] | None = None) -> Counters:
    """A /metrics page -> the named counters (sum of their `_total` samples) and gauges (sum of samples).

    Raises ValueError when the page is not in the Prometheus text format.
    """
    from prometheus_client.parser import text_string_to_metric_families

    wanted_counters = {v: k for k, v in counters.items()}
    wanted_gauges = {v: k for k, v in (gauges or {}).items()}
    totals: dict[str, float] = {}
    found_gauges: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name in wanted_counters:
            key = wanted_counters[family.name]
            values = [s.value for s in family.samples if s.name == family.name + "_total"]
            totals[key] = totals.get(key, 0.0) + sum(values)
        elif family.name in wanted_gauges:
            key = wanted_gauges[family.name]
            found_gauges[key] = found_gauges.get(key, 0.0) + sum(s.value for s in family.samples)
    return Counters(totals=totals, gauges=found_gauges)


def rates(before: Counters | None, after: Counters, seconds: float) -> dict[str, float | None]:
    """Per-second rates between two readings; None without an earlier reading or when a counter went back
    (the workload restarted)."""
    out: dict[str, float | None] = {}
    for key, value in after.totals.items():
        prev = before.totals.get(key) if before is not None else None
        out[key] = None if prev is None or value < prev or seconds <= 0 else (value - prev) / seconds
    return out
