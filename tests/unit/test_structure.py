"""The shape of the code, checked on its text with `ast`: no import cycle inside gatewayd, daemons
that never import one another, SQL only in the store, MQTT and Docker only where they belong, and
no Python file over 600 lines in gatewayd/ or tests/.

Every import counts, wherever it stands (inside a function, under TYPE_CHECKING): an import
moved into a function to dodge a cycle is still a cycle for whoever reads the code.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "gatewayd"
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """The gatewayd modules `path` (module `name`) imports: `from a import b` counts as a.b when
    that is a module, else as a."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    def add(target: str) -> None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            for alias in node.names:
                add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imported(path, name, set(mods)) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            nxt = next(edges, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def daemon_packages() -> set[str]:
    """The packages that are a daemon: they have a main.py (`gatewayd <name>`)."""
    return {p.parent.name for p in PACKAGE.glob("*/main.py")}


def owner(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in daemon_packages() else None


def test_the_graph_is_read_as_python_sees_it() -> None:
    graph = import_graph()
    assert {"gatewayd.store.db", "gatewayd.records"} <= graph["gatewayd.forwarder.service"]
    assert "gatewayd.topics" in graph["gatewayd.bridge.service"]        # from gatewayd import topics
    assert "gatewayd.ingest.http" in graph["gatewayd.ingest.service"]   # imported inside a method
    assert {"bridge", "forwarder", "supervisor", "ingest", "http"} <= daemon_packages()
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_gatewayd() -> None:
    assert cycles(import_graph()) == []


def test_no_daemon_imports_another() -> None:
    crossings = sorted(f"{m} imports {d}" for m, deps in import_graph().items() for d in deps
                       if owner(m) and owner(d) and owner(m) != owner(d))
    assert crossings == []


def external_imports(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            yield node.module


@pytest.mark.parametrize(("library", "allowed"), [
    ("paho", {"bridge", "ingest"}),      # the session to ThingsBoard; ingest's to a local broker
    ("docker", {"supervisor"}),
])
def test_mqtt_and_docker_only_where_they_belong(library: str, allowed: set[str]) -> None:
    users = {module_name(p) for p in PACKAGE.rglob("*.py")
             if any(m == library or m.startswith(library + ".") for m in external_imports(p))}
    assert users and {owner(m) for m in users} <= allowed, sorted(users)


def test_sql_runs_only_in_the_store() -> None:
    calls = {"execute", "executemany", "executescript"}
    outside = sorted(f"{p.relative_to(ROOT)}:{node.lineno}" for p in PACKAGE.rglob("*.py")
                     if "store" not in p.relative_to(PACKAGE).parts[:1]
                     for node in ast.walk(ast.parse(p.read_text(), str(p)))
                     if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                     and node.func.attr in calls)
    assert outside == []


def test_no_python_file_over_600_lines() -> None:
    long = sorted(f"{p.relative_to(ROOT)}: {n} lines" for top in ("gatewayd", "tests")
                  for p in (ROOT / top).rglob("*.py")
                  if (n := len(p.read_text().splitlines())) > MAX_LINES)
    assert long == []
