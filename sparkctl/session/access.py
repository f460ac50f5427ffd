"""`endpoint` and `ask`: a workload's base URL and key for the user's tools, and one real request to it."""

from __future__ import annotations

import math
import shlex
import time
from collections.abc import Callable
from typing import Any

from sparkctl import state
from sparkctl.errors import HostError, InputError, Problem, SecretError
from sparkctl.inventory.models import Inventory, Workload
from sparkctl.plan import layout as lc
from sparkctl.session.session import Session


def pick_workload(inv: Inventory, name: str | None) -> Workload:
    """The named workload, or the only one; a missing or unknown name is bad input that lists the choices."""
    names = [w.name for w in inv.workloads]
    if name is None and len(names) == 1:
        return inv.workloads[0]
    if name is not None and name in names:
        return next(w for w in inv.workloads if w.name == name)
    what = f"{inv.cluster} has no workload named {name}" if name else f"{inv.cluster} has {len(names)} workloads"
    raise InputError([Problem(name or "WORKLOAD", what, f"name one of: {', '.join(names) or 'none (add one)'}")])


def base_url(inv: Inventory, w: Workload) -> str:
    """The OpenAI-compatible base URL (what OPENAI_BASE_URL holds)."""
    return lc.endpoint(inv, w) + "/v1"


def stored_key(inv: Inventory, w: Workload) -> str:
    """The workload's API key as `up` gave it to the workload (its env var, else the laptop state); creates none."""
    key = state.api_key(inv.cluster, w.name, w.api_key_env, create=False)
    if key is None:
        where = state.state_home() / inv.cluster / f"api-key-{w.name}"
        env = f"${w.api_key_env} is not set and " if w.api_key_env else ""
        raise SecretError(
            [Problem(w.name, f"no API key on this laptop: {env}{where} does not exist", "run `sparkctl up` first")]
        )
    return key


def render_env(inv: Inventory, w: Workload, key: str) -> str:
    """Lines for `eval "$(sparkctl endpoint --env)"` (POSIX sh): the variables the official openai clients read."""
    return f"export OPENAI_BASE_URL={shlex.quote(base_url(inv, w))}\nexport OPENAI_API_KEY={shlex.quote(key)}"


def summarize_embedding(vector: list[float], shown: int = 5) -> dict[str, Any]:
    """An embedding as a person reads it: dimension, L2 norm, first values (pure)."""
    return {
        "dimension": len(vector),
        "norm": math.sqrt(sum(v * v for v in vector)),
        "first": [round(v, 6) for v in vector[:shown]],
    }


def ask(
    session: Session,
    w: Workload,
    text: str,
    key: str,
    *,
    max_tokens: int = 128,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Any]:
    """One request with the stored key: a chat completion (vLLM) or an embedding (embed); the answer and the
    latency. A vLLM serving an embedding model has no chat route (404): it is asked for an embedding instead."""
    base = base_url(session.inventory, w)
    kind = "embedding" if w.engine == "embed" else "chat"
    start = clock()
    if kind == "chat":
        body = {"model": w.name, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens}
        status, answer = _post(session, w, base + "/chat/completions", key, body)
        if status == 404:
            kind, start = "embedding", clock()
    if kind == "embedding":
        status, answer = _post(session, w, base + "/embeddings", key, {"model": w.name, "input": text})
    latency = clock() - start
    if status != 200 or not isinstance(answer, dict):
        detail = answer.get("error", answer) if isinstance(answer, dict) else answer
        hint = "check the key: `sparkctl up` gives it to the workload" if status == 401 else "see `sparkctl status`"
        raise HostError([Problem(f"{w.name} {base}", f"answered {status}: {str(detail)[:300]}", hint)])
    out: dict[str, Any] = {"workload": w.name, "kind": kind, "latency_s": latency, "usage": answer.get("usage") or {}}
    if kind == "chat":
        choice = (answer.get("choices") or [{}])[0]
        out["answer"] = (choice.get("message") or {}).get("content") or ""
        out["finish_reason"] = choice.get("finish_reason")
    else:
        data = answer.get("data") or [{}]
        out["embedding"] = summarize_embedding(list(data[0].get("embedding") or []))
    return out


def _post(session: Session, w: Workload, url: str, key: str, body: dict[str, Any]) -> tuple[int, Any]:
    try:
        return session.post_json(url, key, body)
    except OSError as exc:
        reason = getattr(exc, "reason", exc)
        raise HostError([Problem(f"{w.name} {url}", f"no answer: {reason}", "see `sparkctl status`")]) from None
