"""Shell completion callbacks (Typer's `--install-completion`): inventory files, workload and host names.

They run on every <TAB>, so they read the inventory YAML as plain data (no validation, no pydantic, no network)
and answer nothing rather than fail: a half-written inventory must not print a traceback into the shell.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

_MAX_BYTES = 1 << 20  # an inventory is a few KiB; a huge file is not one


def _inventory_path(ctx: Any) -> Path | None:
    """The inventory the command line names so far (-i), else $SPARKCTL_INVENTORY, else the bundled example."""
    chosen = (getattr(ctx, "params", None) or {}).get("inventory") or os.environ.get("SPARKCTL_INVENTORY")
    if chosen:
        return Path(str(chosen)).expanduser()
    return Path(__file__).resolve().parent.parent / "data" / "example-pair.yaml"


def _inventory_data(ctx: Any) -> dict[str, Any]:
    path = _inventory_path(ctx)
    try:
        if path is None or not path.is_file() or path.stat().st_size > _MAX_BYTES:
            return {}
        import yaml

        data = yaml.safe_load(path.read_text(encoding="utf-8", errors="replace"))
    except Exception:  # a completion never fails: unreadable or broken YAML completes nothing
        return {}
    return data if isinstance(data, dict) else {}


def _names(ctx: Any, key: str) -> list[str]:
    items = _inventory_data(ctx).get(key)
    if not isinstance(items, list):
        return []
    names = [item.get("name") for item in items if isinstance(item, dict)]
    return [n for n in names if isinstance(n, str) and n and n.isprintable() and " " not in n]


def complete_workload(ctx: Any, incomplete: str) -> list[str]:
    """Workload names of the inventory, for -w/--workload."""
    return [n for n in _names(ctx, "workloads") if n.startswith(incomplete)]


def complete_host(ctx: Any, incomplete: str) -> list[str]:
    """Host names of the inventory, for --host."""
    return [n for n in _names(ctx, "hosts") if n.startswith(incomplete)]


def complete_log_name(ctx: Any, incomplete: str) -> list[str]:
    """'ray' or a workload name, for `sparkctl logs NAME`."""
    return [n for n in ["ray", *_names(ctx, "workloads")] if n.startswith(incomplete)]


def complete_yaml_file(incomplete: str) -> list[str]:
    """Directories and *.yaml / *.yml files under what is typed so far, for -i/--inventory and runbook files."""
    head, _, tail = incomplete.rpartition("/")
    if head:
        folder, prefix = Path(head).expanduser(), f"{head}/"
    elif incomplete.startswith("/"):
        folder, prefix = Path("/"), "/"
    else:
        folder, prefix = Path("."), ""
    out: list[str] = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if not entry.name.startswith(tail) or (entry.name.startswith(".") and not tail.startswith(".")):
                    continue
                try:
                    if entry.is_dir():
                        out.append(f"{prefix}{entry.name}/")
                    elif entry.name.endswith((".yaml", ".yml")):
                        out.append(f"{prefix}{entry.name}")
                except OSError:
                    continue
    except OSError:
        return []
    return sorted(out)[:500]


def complete_runbook(incomplete: str) -> list[str]:
    """Built-in runbook names, then runbook files, for `sparkctl run RUNBOOK`."""
    builtin = Path(__file__).resolve().parent.parent / "runbook" / "builtin"
    try:
        names = sorted(p.stem for p in builtin.glob("*.yaml"))
    except OSError:
        names = []
    return [n for n in names if n.startswith(incomplete)] + complete_yaml_file(incomplete)
