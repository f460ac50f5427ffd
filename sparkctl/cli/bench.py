"""sparkctl bench: measure the cluster."""

from __future__ import annotations

import enum
import json
from typing import TYPE_CHECKING, Annotated

import typer

from sparkctl.cli import common as c
from sparkctl.cli.complete import complete_workload
from sparkctl.errors import EXIT_FAILED, EXIT_INTERRUPTED, InputError, Problem

if TYPE_CHECKING:
    from sparkctl.session.report import Report

app = typer.Typer(help="Measure the cluster.", no_args_is_help=True, rich_markup_mode=None)


@app.command("fabric")
@c.guard
def bench_fabric(
    inventory: c.InventoryOpt = None,
    as_json: c.JsonOpt = False,
    mb: Annotated[int, typer.Option("--mb", help="MB sent over each link.")] = 512,
    accept_new_host_keys: c.AcceptKeysOpt = False,
    debug: c.DebugOpt = False,
) -> None:
    """Measure the link without RDMA tools: jumbo frames per twin, one TCP stream per link (said so)."""
    from sparkctl.cli.render import render_bench
    from sparkctl.runbook.load import load_runbook, resolve_params
    from sparkctl.session.reports import summarise_bench
    from sparkctl.session.run import RunHooks, RunRequest, run_runbook

    inv = c.start(debug, inventory)
    rb = load_runbook("bench-fabric")
    params = resolve_params(rb, {"mb": str(mb)})
    # measurements only: no lock, nothing to confirm; journaled like every applied run
    req = RunRequest(inv, rb, params, accept_new_host_keys=accept_new_host_keys, lock=False, confirm_plan=False)
    hooks = RunHooks(confirm=lambda m: True, sudo_password=lambda: c.sudo_password(inv))
    report = run_runbook(req, hooks).report
    assert report is not None  # applied: nothing to confirm
    result = summarise_bench(report)
    c.echo(json.dumps(result, indent=2) if as_json else render_bench(result))
    if report.journal_error:
        c.echo(f"error: this run is not in the journal: {report.journal_error}", err=True)
    if not report.ok or report.journal_error:
        raise typer.Exit(EXIT_FAILED)


class Api(str, enum.Enum):
    auto = "auto"
    completions = "completions"
    embeddings = "embeddings"


ApiOpt = Annotated[
    Api,
    typer.Option(
        "--api",
        help="auto: /v1/embeddings for the embed worker, /v1/completions for vLLM; embeddings: a vLLM serving an "
        "embedding model.",
    ),
]


@app.command("serve")
@c.guard
def bench_serve(
    workload: Annotated[
        str | None,
        typer.Argument(
            help="The workload to load (may be left out when there is one).", autocompletion=complete_workload
        ),
    ] = None,
    inventory: c.InventoryOpt = None,
    prompts: Annotated[int, typer.Option("--prompts", min=1, help="Requests sent (--num-prompts).")] = 100,
    input_len: Annotated[int, typer.Option("--input-len", min=1, help="Prompt tokens per request.")] = 512,
    output_len: Annotated[
        int, typer.Option("--output-len", min=1, help="Tokens generated per request (completions).")
    ] = 128,
    concurrency: Annotated[
        int, typer.Option("--concurrency", min=0, help="Requests in flight at most (--max-concurrency); 0: no cap.")
    ] = 8,
    request_rate: Annotated[
        float | None,
        typer.Option("--request-rate", min=0.001, help="Requests started per second (default: all at once)."),
    ] = None,
    api: ApiOpt = Api.auto,
    source: Annotated[
        str,
        typer.Option("--from", help="Where the load generator runs: head (the workload's), laptop, or a host name."),
    ] = "head",
    as_json: c.JsonOpt = False,
    plain: c.PlainOpt = False,
    accept_new_host_keys: c.AcceptKeysOpt = False,
    debug: c.DebugOpt = False,
) -> None:
    """Load a workload with vLLM's own load generator (vllm bench serve) and keep the result in the journal."""
    from sparkctl.cli.render import Progress
    from sparkctl.runbook.load import load_runbook, resolve_params
    from sparkctl.session.access import pick_workload, stored_key
    from sparkctl.session.run import RunHooks, RunRequest, run_runbook

    inv = c.start(debug, inventory)
    w = pick_workload(inv, workload)
    if source == "laptop":
        _vllm_on_this_laptop()
    stored_key(inv, w)  # no key on this laptop yet: nothing to authenticate with (run `sparkctl up`)
    rb = load_runbook("bench-serve")
    sets = {
        "workload": w.name,
        "prompts": str(prompts),
        "input_len": str(input_len),
        "output_len": str(output_len),
        "concurrency": str(concurrency) if concurrency else "null",
        "request_rate": "null" if request_rate is None else repr(float(request_rate)),
        "api": api.value,
        "source": source,
    }
    req = RunRequest(
        inv,
        rb,
        resolve_params(rb, sets),
        accept_new_host_keys=accept_new_host_keys,
        lock=False,  # it reads and loads a workload; it changes nothing a lock protects
        confirm_plan=False,
        laptop=source == "laptop",
    )
    live = c.live_view(plain, as_json)
    hooks = RunHooks(emit=live or Progress(quiet=False), confirm=lambda m: True, applying=lambda: c.drawing(live))
    report = run_runbook(req, hooks).report
    assert report is not None  # applied: nothing to confirm
    _show_bench(report, as_json)


def _vllm_on_this_laptop() -> None:
    """`--from laptop` runs vLLM's load generator here: refused before any connection when there is none."""
    import shutil

    if shutil.which("vllm") is None:
        raise InputError(
            [
                Problem(
                    "--from laptop",
                    "no `vllm` on this laptop's PATH: the load generator is vLLM's (vllm bench serve)",
                    "install vLLM here (pip install vllm), or run the bench from the cluster: --from head (the "
                    "default)",
                )
            ]
        )


def _show_bench(report: Report, as_json: bool) -> None:
    """The bench's figures (text or JSON), the run's details on stderr, and the exit code of how it went."""
    from sparkctl.cli.render import render_bench_serve, render_report_details
    from sparkctl.session.reports import summarise_bench_serve

    result = summarise_bench_serve(report)
    if as_json:
        c.echo(json.dumps(result, indent=2))
        if report.journal_error:
            c.echo(f"error: this run is not in the journal: {report.journal_error}", err=True)
    else:
        c.echo(render_bench_serve(result))
        for line in render_report_details(report):
            c.echo(line, err=True)
    if report.interrupted:
        raise typer.Exit(EXIT_INTERRUPTED)
    if not report.ok or report.journal_error:
        raise typer.Exit(EXIT_FAILED)


@app.command("history")
@c.guard
def bench_history_cmd(
    workload: Annotated[
        str | None, typer.Option("--workload", "-w", help="Only this workload.", autocompletion=complete_workload)
    ] = None,
    as_json: c.JsonOpt = False,
) -> None:
    """Every bench serve result in the journal, side by side: layout, request shape, throughput, latencies."""
    from sparkctl import state
    from sparkctl.cli.render import render_bench_table
    from sparkctl.session.reports import bench_history

    rows = bench_history(state.read_journal(), workload)
    if as_json:
        c.echo(json.dumps(rows, indent=2))
    elif not rows:
        c.echo("no bench serve result in the journal yet: run `sparkctl bench serve`")
    else:
        c.echo(render_bench_table(rows))
