"""endpoint, ask: a workload's URL and key for the user's tools, and one request that shows it answers."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from sparkctl.cli import common as c
from sparkctl.cli.complete import complete_workload

WorkloadArg = Annotated[
    str | None,
    typer.Argument(help="Workload name (default: the only one).", show_default=False, autocompletion=complete_workload),
]


@c.guard
def endpoint_cmd(
    workload: WorkloadArg = None,
    inventory: c.InventoryOpt = None,
    env: Annotated[
        bool,
        typer.Option(
            "--env", help="Print `export OPENAI_BASE_URL=... OPENAI_API_KEY=...` lines for eval (shows the key)."
        ),
    ] = False,
    debug: c.DebugOpt = False,
) -> None:
    """Print a workload's OpenAI-compatible base URL; with --env, shell lines that set it and its API key."""
    from sparkctl.session.access import base_url, pick_workload, render_env, stored_key

    inv = c.start(debug, inventory)
    w = pick_workload(inv, workload)
    if env:
        # stdout only: never logged, never journaled
        typer.echo(render_env(inv, w, stored_key(inv, w)))
    else:
        c.echo(base_url(inv, w))


@c.guard
def ask_cmd(
    workload: Annotated[str, typer.Argument(help="Workload name.", autocompletion=complete_workload)],
    text: Annotated[str, typer.Argument(help="The prompt (vLLM: one chat message) or the text to embed (embed).")],
    inventory: c.InventoryOpt = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Chat completion length limit.")] = 128,
    as_json: c.JsonOpt = False,
    debug: c.DebugOpt = False,
) -> None:
    """Send one request with the stored API key (a chat completion, or an embedding) and print the answer and
    the latency."""
    from sparkctl.session.access import ask, pick_workload, stored_key
    from sparkctl.session.door import endpoint_session

    inv = c.start(debug, inventory)
    w = pick_workload(inv, workload)
    session = endpoint_session(inv)  # HTTP only: no host is connected to
    result = ask(session, w, text, stored_key(inv, w), max_tokens=max_tokens)
    if as_json:
        c.echo(json.dumps(result, indent=2))
        return
    latency = f"{result['latency_s'] * 1000:.0f} ms"
    if result["kind"] == "chat":
        c.echo(result["answer"])
        usage = result["usage"]
        c.echo(
            f"-- {w.name}: {latency}, {usage.get('prompt_tokens', '?')} prompt + "
            f"{usage.get('completion_tokens', '?')} completion tokens, finish {result['finish_reason']}"
        )
    else:
        e = result["embedding"]
        first = ", ".join(f"{v:.4f}" for v in e["first"])
        c.echo(f"embedding: {e['dimension']} dimensions, L2 norm {e['norm']:.4f}, first values [{first}, ...]")
        c.echo(f"-- {w.name}: {latency}, {result['usage'].get('prompt_tokens', '?')} prompt tokens")


def register(app: typer.Typer) -> None:
    """These commands sit at the top level of `sparkctl`."""
    app.command("endpoint")(endpoint_cmd)
    app.command("ask")(ask_cmd)
