"""Readiness probes from the laptop: /health, /v1/models, one minimal request."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# urllib.request (with http.client, ssl and email) is imported by the calls below, not here: the session imports
# this module for every connected command, and most of them (`plan`, a converged `up`) never talk HTTP.


@dataclass(frozen=True)
class Probe:
    """Where a workload stands: phase is 'down', 'loading', 'broken', 'listed' or 'ready'.

    'broken': /health answers 503 with status 'failed' (the embed worker's backend lost a rank or a collective
    failed); it stays so until the workload is restarted, so a wait for it can end at once.
    """

    phase: str
    detail: str = ""

    @property
    def ready(self) -> bool:
        return self.phase == "ready"


def _call(url: str, key: str | None, body: dict[str, Any] | None = None, timeout: float = 10) -> tuple[int, Any]:
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if body is not None else "GET")
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        raw = exc.read()[:2000]
        try:
            return exc.code, json.loads(raw or b"null")  # e.g. /health 503 {"status": "failed", "error": ...}
        except json.JSONDecodeError:
            return exc.code, raw[:300].decode(errors="replace")
    try:
        return status, json.loads(raw or b"null")
    except json.JSONDecodeError:
        return status, raw[:300].decode(errors="replace")


def _embedding(base: str, model: str, key: str | None, timeout: float) -> tuple[int, Any, bool]:
    """One minimal embedding request: (status, body, answered with data)."""
    status, body = _call(f"{base}/v1/embeddings", key, {"model": model, "input": "ping"}, timeout=timeout * 3)
    return status, body, status == 200 and isinstance(body, dict) and bool(body.get("data"))


def probe_workload(base: str, model: str, key: str | None, engine: str, timeout: float = 10) -> Probe:
    """One readiness probe of an OpenAI-compatible endpoint."""
    try:
        status, body = _call(f"{base}/health", None, timeout=timeout)
        if status != 200:
            if isinstance(body, dict) and body.get("status") == "failed":
                return Probe("broken", str(body.get("error", "the workload reports a failed backend"))[:300])
            return Probe("loading", f"/health answered {status}")
        status, body = _call(f"{base}/v1/models", key, timeout=timeout)
        ids = [m.get("id") for m in body.get("data", [])] if isinstance(body, dict) else []
        if status != 200 or model not in ids:
            return Probe("loading", f"/v1/models answered {status}, models {ids}")
        if engine == "embed":
            status, body, ok = _embedding(base, model, key, timeout)
        else:
            status, body = _call(
                f"{base}/v1/completions", key, {"model": model, "prompt": "ping", "max_tokens": 1}, timeout=timeout * 6
            )
            ok = status == 200 and isinstance(body, dict) and bool(body.get("choices"))
            if status == 404 and not ok:
                # vLLM serving a pooling (embedding) model registers no generation routes, so /v1/completions
                # is FastAPI's 404 (vllm/entrypoints/launchers/api_server/routers.py, vLLM 0.32.0): ask for an
                # embedding instead.
                status, body, ok = _embedding(base, model, key, timeout)
        if not ok:
            return Probe("listed", f"minimal request answered {status}: {str(body)[:200]}")
        return Probe("ready", "health, models and a minimal request all answered")
    except OSError as exc:  # urllib.error.URLError is an OSError
        return Probe("down", str(getattr(exc, "reason", exc)))


def get_text(url: str, timeout: float = 5) -> tuple[int, str]:
    """GET a page without a key (e.g. /metrics, which vLLM and the embed worker serve without one)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url), timeout=timeout) as resp:
            return resp.status, resp.read(4 * 1024 * 1024).decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(2000).decode(errors="replace")


def post_json(url: str, key: str | None, body: dict[str, Any], timeout: float = 60) -> tuple[int, Any]:
    """POST a JSON body with the workload's key (Authorization: Bearer); (status, decoded JSON or text)."""
    return _call(url, key, body, timeout=timeout)
