"""The laptop's state: secrets (0600) and the journal, under the XDG state dir."""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Any


def state_home() -> Path:
    """$XDG_STATE_HOME/sparkctl (default ~/.local/state/sparkctl)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "sparkctl"


def _private_file(path: Path, make: str) -> str:
    """Read a secret file, creating it 0600 (in a 0700 dir) with `make` if absent."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(make + "\n")
        return make


def _existing(path: Path) -> str | None:
    """A secret file's value, or None if there is none (creating nothing)."""
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def ray_token(cluster: str, *, create: bool = True) -> str | None:
    """The cluster's Ray auth token, generated once; with create=False None when there is none yet."""
    path = state_home() / cluster / "ray-token"
    return _private_file(path, secrets.token_hex(32)) if create else _existing(path)


def api_key(cluster: str, workload: str, env_var: str | None, *, create: bool = True) -> str | None:
    """A workload's API key: from the named env var, else generated once and kept 0600 (None if absent and
    create=False: read-only commands never make secrets)."""
    if env_var and os.environ.get(env_var):
        return os.environ[env_var]
    path = state_home() / cluster / f"api-key-{workload}"
    return _private_file(path, "sk-" + secrets.token_urlsafe(24)) if create else _existing(path)


def journal_path() -> Path:
    return state_home() / "journal.jsonl"


def append_journal(record: dict[str, Any]) -> None:
    """Append one run's record (secrets already redacted by the caller)."""
    path = journal_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with path.open("a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def read_journal() -> list[dict[str, Any]]:
    """Every recorded run, oldest first (unreadable lines skipped)."""
    try:
        lines = journal_path().read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)
