"""The walls, read from the source: every import of every sparkctl module (function-level ones included).

- layers import only downwards: inventory -> facts -> plan -> doctor -> runbook -> session -> cli
  (docs/architecture.md);
- nothing outside sparkctl/execute/ starts processes or opens connections (SSH, sockets, HTTP);
- only the engine, the session, the session's fact probe and the discovery session use the execute layer, and
  only the session builds the real SSH connector, so no command reaches a host around them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "sparkctl"

# What each layer may import from sparkctl ("base" is errors, paths, state and the package root).
ALLOWED: dict[str, set[str]] = {
    "base": {"base"},
    "inventory": {"base", "inventory"},
    "facts": {"base", "inventory", "facts"},
    "plan": {"base", "inventory", "facts", "plan"},
    "doctor": {"base", "inventory", "facts", "plan", "doctor"},
    "execute": {"base", "inventory", "execute"},
    "runbook": {"base", "inventory", "facts", "plan", "doctor", "runbook"},
    "session": {"base", "inventory", "facts", "plan", "doctor", "execute", "runbook", "session"},
    "cli": {"base", "inventory", "facts", "plan", "doctor", "runbook", "session", "cli"},
    "workers": set(),  # the worker program runs on the hosts on its own
}
BASE_NAMES = {"errors", "paths", "state", "__version__"}

# Modules (and os functions) that start processes or open connections.
EFFECTS = {"subprocess", "multiprocessing", "pty", "socket", "ssl", "urllib.request", "http.client", "asyncio"}
EFFECTS |= {"paramiko", "fabric", "invoke", "requests", "httpx", "ray"}
OS_EFFECTS = {"system", "popen", "fork", "forkpty", "posix_spawn", "posix_spawnp"}
OS_EFFECT_PREFIXES = ("exec", "spawn")

# Who may use the execute layer at all, and who may build the real SSH connector.
EXECUTE_USERS = {
    "sparkctl.session.door",
    "sparkctl.session.engine",
    "sparkctl.session.session",
    "sparkctl.session.gather",
    "sparkctl.session.lock",
    "sparkctl.session.discovery",
}
CONNECTOR_BUILDERS = {"sparkctl.session.door", "sparkctl.session.session"}
CONNECTORS = {"sparkctl.execute.ssh", "sparkctl.execute.local"}


def layer_of(module: str) -> str:
    """The layer of a sparkctl module (or of a name imported from one)."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in BASE_NAMES:
        return "base"
    if parts[1] == "__main__":
        return "cli"
    return parts[1]


def imports_of(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) for every import anywhere in the module; `from a import b` also yields a.b."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def os_effects(tree: ast.AST) -> list[tuple[int, str]]:
    """Calls like os.system(...) / os.execvp(...) and `from os import system`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os":
            name = node.attr
        elif isinstance(node, ast.ImportFrom) and node.module == "os":
            found += [
                (node.lineno, f"os.{a.name}")
                for a in node.names
                if a.name in OS_EFFECTS or a.name.startswith(OS_EFFECT_PREFIXES)
            ]
            continue
        else:
            continue
        if name in OS_EFFECTS or name.startswith(OS_EFFECT_PREFIXES):
            found.append((node.lineno, f"os.{name}"))
    return found


def violations(module: str, source: str) -> list[str]:
    """Every wall this module's source breaks, as 'module:line what'."""
    tree = ast.parse(source)
    layer = layer_of(module)
    out = []
    for line, name in imports_of(tree):
        where = f"{module}:{line}"
        if name == "sparkctl" or name.startswith("sparkctl."):
            target_layer = layer_of(name)
            if target_layer not in ALLOWED[layer]:
                out.append(f"{where} {layer} imports {name} ({target_layer})")
            if target_layer == "execute" and layer != "execute" and module not in EXECUTE_USERS:
                out.append(f"{where} uses the execute layer ({name}): reach hosts through the session")
            connector = any(name == c or name.startswith(c + ".") for c in CONNECTORS)
            if connector and layer != "execute" and module not in CONNECTOR_BUILDERS:
                out.append(f"{where} builds a connector ({name}) outside the session")
        elif layer not in ("execute", "workers") and any(name == e or name.startswith(e + ".") for e in EFFECTS):
            out.append(f"{where} imports {name}: only sparkctl/execute/ starts processes or opens connections")
    if layer not in ("execute", "workers"):
        out += [f"{module}:{ln} calls {name}: only sparkctl/execute/ starts processes" for ln, name in os_effects(tree)]
    return out


def modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found.append((name, path))
    return found


def test_every_module_belongs_to_a_layer() -> None:
    found = modules()
    assert len(found) > 40
    unknown = [m for m, _ in found if layer_of(m) not in ALLOWED]
    assert unknown == []


@pytest.mark.parametrize(("module", "path"), modules(), ids=[m for m, _ in modules()])
def test_module_respects_the_walls(module: str, path: Path) -> None:
    assert violations(module, path.read_text()) == []


# --- the checker itself catches what it is meant to ------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("sparkctl.plan.x", "from sparkctl.session.engine import Engine\n", "plan imports sparkctl.session.engine"),
        ("sparkctl.facts.x", "def f():\n    from sparkctl.plan import layout\n", "facts imports sparkctl.plan"),
        ("sparkctl.inventory.x", "import sparkctl.doctor.rules\n", "inventory imports sparkctl.doctor.rules"),
        ("sparkctl.cli.x", "from sparkctl.execute import ssh\n", "cli imports sparkctl.execute"),
        ("sparkctl.session.x", "from sparkctl.execute.base import Transport\n", "uses the execute layer"),
        ("sparkctl.session.engine", "from sparkctl.execute import ssh\n", "builds a connector"),
        ("sparkctl.doctor.x", "import subprocess\n", "imports subprocess"),
        ("sparkctl.cli.x", "def f():\n    import paramiko\n", "imports paramiko"),
        ("sparkctl.session.x", "from urllib.request import urlopen\n", "imports urllib.request"),
        ("sparkctl.plan.x", "import os\nos.system('ls')\n", "calls os.system"),
        ("sparkctl.plan.x", "from os import execvp\n", "calls os.execvp"),
        ("sparkctl.cli.x", "import socket\n", "imports socket"),
    ],
)
def test_the_walk_catches_a_breach(module: str, source: str, expected: str) -> None:
    found = violations(module, source)
    assert any(expected in v for v in found), found


def test_the_walk_allows_what_the_layers_allow() -> None:
    assert violations("sparkctl.session.session", "from sparkctl.execute import ssh\n") == []
    assert violations("sparkctl.execute.local", "import subprocess\nimport os\nos.killpg(1, 9)\n") == []
    assert violations("sparkctl.doctor.x", "from sparkctl.plan.env import detect_gid_index\n") == []
    assert violations("sparkctl.plan.x", "from sparkctl import paths\nfrom sparkctl.errors import Problem\n") == []


# --- one door to the hosts -------------------------------------------------------------------------------------

HOST_STATE = {"transports", "facts", "unreachable"}
"""A Session's per-host state: the connections, what each host said, and who did not answer."""


def host_state_touches(tree: ast.AST) -> list[tuple[int, str]]:
    """`x.transports` anywhere, and loops (for, comprehensions) over a Session's per-host state or `inv.hosts`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "transports":
            found.append((node.lineno, "reaches a transport"))
        iters = [node.iter] if isinstance(node, ast.For) else []
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            iters = [g.iter for g in node.generators]
        for it in iters:
            for sub in ast.walk(it):
                if isinstance(sub, ast.Attribute) and (
                    (sub.attr in HOST_STATE and _names_session(sub.value))
                    or (sub.attr == "hosts" and _names_inventory(sub.value))
                ):
                    found.append((it.lineno, f"loops over hosts ({ast.unparse(it)})"))
    return found


def _names_session(node: ast.expr) -> bool:
    return (isinstance(node, ast.Name) and node.id == "session") or (
        isinstance(node, ast.Attribute) and node.attr == "session"
    )


def _names_inventory(node: ast.expr) -> bool:
    return (isinstance(node, ast.Name) and node.id in ("inv", "inventory")) or (
        isinstance(node, ast.Attribute) and node.attr == "inventory"
    )


@pytest.mark.parametrize(("module", "path"), [m for m in modules() if layer_of(m[0]) == "cli"], ids=str)
def test_the_cli_neither_reaches_a_transport_nor_loops_over_hosts(module: str, path: Path) -> None:
    """The CLI parses, calls one function of the session layer, and renders: the work per host is done below."""
    assert [f"{module}:{ln} {what}" for ln, what in host_state_touches(ast.parse(path.read_text()))] == []


def test_nothing_outside_the_session_layer_and_execute_reaches_a_transport() -> None:
    outside = [
        f"{m}:{ln}"
        for m, p in modules()
        if layer_of(m) not in ("session", "execute")
        for ln, what in host_state_touches(ast.parse(p.read_text()))
        if what == "reaches a transport"
    ]
    assert outside == []


def test_the_host_state_check_catches_a_cli_loop_and_a_transport() -> None:
    src = (
        "def f(session, inv):\n"
        "    for h in inv.hosts:\n"
        "        session.transports[h.name].run('true')\n"
        "    return [n for n in session.facts]\n"
    )
    found = sorted((ln, what.split(" (")[0]) for ln, what in host_state_touches(ast.parse(src)))
    assert found == [(2, "loops over hosts"), (3, "reaches a transport"), (4, "loops over hosts")]


# --- docs/architecture.md draws the same picture ----------------------------------------------------------------

ARCHITECTURE = PACKAGE.parent / "docs" / "architecture.md"


def documented_layers() -> list[tuple[str, set[str]]]:
    """(layer, may import) per row of the layer table in docs/architecture.md, in the table's order."""
    rows = []
    for line in ARCHITECTURE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`") and cells[0].endswith("/`"):
            allowed = {a.strip() for a in cells[2].split(",")} - {"nothing"}
            rows.append((cells[0].strip("`/"), allowed))
    return rows


def test_the_architecture_doc_names_every_layer_and_what_it_may_import() -> None:
    rows = documented_layers()
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and any(p.glob("*.py")))
    assert sorted(name for name, _ in rows) == folders
    for name, allowed in rows:
        assert allowed == ALLOWED[name] - {name}, name


def test_the_doc_table_runs_in_the_order_of_the_imports() -> None:
    """A layer's row comes after every layer it may import (the table reads in the order the data flows)."""
    order = [name for name, _ in documented_layers()]
    for i, (name, allowed) in enumerate(documented_layers()):
        assert allowed - {"base"} <= set(order[:i]), name
