"""llmsvc's modules import downward only: no cycle, and each part only from the parts below.

Read from the source with `ast` (imports under TYPE_CHECKING count too): a
cycle hidden behind an annotation-only import is still two modules that
need each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "llmsvc"
# llmsvc's parts (a top-level module, or a package and all its modules) from the top down:
# a part imports only from the parts below it, never from one beside or above it.
LAYERS = [
    {"__main__"},
    {"cli"},
    {"supervisor", "daemon"},
    {"catchup", "serving"},
    {"operations"},
    {"status"},
    {"admin"},
    {"switches", "maintenance"},
    {"gateway"},
    {"providers"},
    {"keytable", "limits"},
    {"follow", "siblings"},
    {"store"},
    {"local", "metrics"},
    {"wal"},
    {"config", "systemd"},
    {
        "config_errors",
        "errors",
        "lifetime",
        "logs",
        "private",
        "callers",
        "timers",
        "tokens",
        "llmsvc",
    },
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each llmsvc module and the llmsvc modules it imports."""
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parent, *([node.module] if node.module else [])])
                imported.add(base)
                imported.update(f"{base}.{alias.name}" for alias in node.names)
        graph[name] = {other for other in imported if other in paths and other != name}
    return graph


def cycle_from(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A path of imports from `start` back to it, if there is one."""
    stack, seen = [(start, [start])], set()
    while stack:
        name, path = stack.pop()
        for other in sorted(graph[name]):
            if other == start:
                return [*path, start]
            if other not in seen:
                seen.add(other)
                stack.append((other, [*path, other]))
    return None


def test_the_import_graph_is_read() -> None:
    graph = import_graph()
    assert "llmsvc.operations" in graph["llmsvc.daemon"]
    assert "llmsvc.status" in graph["llmsvc.operations"]
    assert "llmsvc.store.engine" in graph["llmsvc.store.flusher"]  # a relative or absolute import


def test_no_module_imports_itself_round_a_cycle() -> None:
    graph = import_graph()
    cycles = [cycle for name in graph if (cycle := cycle_from(graph, name)) is not None]
    assert not cycles, "\n".join(" -> ".join(cycle) for cycle in cycles)


def part(module: str) -> str:
    """The part a module belongs to: `llmsvc.store.flusher` → `store`, `llmsvc` → `llmsvc`."""
    return module.split(".")[1] if "." in module else module


def test_every_part_imports_only_the_parts_below_it() -> None:
    graph = import_graph()
    rank = {name: level for level, names in enumerate(LAYERS) for name in names}
    assert {part(name) for name in graph} == set(rank)  # every part has its place
    upward = [
        f"{name} imports {other}"
        for name, imported in graph.items()
        for other in imported
        if part(other) != part(name) and rank[part(other)] <= rank[part(name)]
    ]
    assert not upward, "\n".join(sorted(upward))
