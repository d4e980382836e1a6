"""The import graph of ``mmgpt`` and the built-in plugins is a DAG.

Every ``import`` counts, function-level ones included (a deferred import still makes the two
modules depend on each other); imports under ``if TYPE_CHECKING:`` do not run and are left
out. ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to
``pkg``; importing a submodule is no edge to its parent package.

Run as a script, this file prints the graph as a Mermaid diagram, one subgraph per layer
(layer 0 imports nothing of ours; a module of layer k imports only from layers below k),
with the edges transitively reduced::

    python tests/test_import_graph.py > graph.mmd
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# source roots: the directory a top-level package lies in
SOURCES = (ROOT, ROOT / "plugins")
PACKAGES = ("mmgpt", "mmgpt_text", "mmgpt_vit", "mmgpt_diffusion")


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    path: Path
    line: int

    def __str__(self) -> str:
        where = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{self.source} -> {self.target}  ({where}:{self.line})"


def module_files() -> dict[str, Path]:
    """Every module of the scanned packages: dotted name → file."""
    modules: dict[str, Path] = {}
    for root in SOURCES:
        for package in PACKAGES:
            if not (root / package / "__init__.py").is_file():
                continue
            for path in sorted((root / package).rglob("*.py")):
                parts = path.relative_to(root).with_suffix("").parts
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements that can run: all but those of ``if TYPE_CHECKING:`` bodies."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)  # the else branch runs
        else:
            stack.extend(ast.iter_child_nodes(node))


def _known(name: str, modules: Collection[str]) -> str | None:
    """``name`` if it is one of ``modules``, else its longest prefix that is, else None."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def module_edges(name: str, path: Path, modules: dict[str, Path]) -> list[Edge]:
    """The imports of module ``name`` that target scanned modules."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    # the package a relative import starts from: a package's __init__ is its own package
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = []
    for node in _runtime_imports(tree):
        targets: list[str | None] = []
        if isinstance(node, ast.Import):
            targets = [_known(alias.name, modules) for alias in node.names]
        else:
            if node.level:
                base_parts = package.split(".")
                if node.level > 1:
                    base_parts = base_parts[: -(node.level - 1)]
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.append(sub if sub in modules else _known(base, modules))
        for target in targets:
            if target is not None and target != name:
                edges.append(Edge(name, target, path, node.lineno))
    return edges


def import_graph() -> dict[str, list[Edge]]:
    """Module → its import edges (to scanned modules), for every scanned module."""
    modules = module_files()
    return {name: module_edges(name, path, modules) for name, path in modules.items()}


def strongly_connected_components(graph: dict[str, list[Edge]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (no recursion limit); components in sorted order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted({e.target for e in graph[start]})))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted({e.target for e in graph[child]}))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return sorted(components)


def cycle_through(graph: dict[str, list[Edge]], component: list[str]) -> list[Edge]:
    """A shortest cycle from the component's first module back to it, as concrete edges."""
    members = set(component)
    start = component[0]
    came_by: dict[str, Edge] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for edge in sorted(graph[node], key=lambda e: (e.target, e.line)):
                if edge.target not in members:
                    continue
                if edge.target == start:
                    path = [edge]
                    while path[0].source != start:
                        path.insert(0, came_by[path[0].source])
                    return path
                if edge.target not in came_by:
                    came_by[edge.target] = edge
                    following.append(edge.target)
        frontier = following
    raise AssertionError(f"{component} is not a cycle")  # a component of size > 1 always is


def describe_cycles(graph: dict[str, list[Edge]]) -> list[str]:
    """One paragraph per import cycle: its modules and the edges of one cycle through them."""
    reports = []
    for component in strongly_connected_components(graph):
        if len(component) < 2:
            continue
        edges = "\n".join(f"    {e}" for e in cycle_through(graph, component))
        reports.append(f"cycle of {len(component)} modules: {', '.join(component)}\n{edges}")
    return reports


def layers(graph: dict[str, list[Edge]]) -> list[list[list[str]]]:
    """Components by layer: a component's layer is 1 + the highest layer it imports from.
    (Members of a cycle share one component, so this works on a graph with cycles too.)"""
    component_of = {m: tuple(c) for c in strongly_connected_components(graph) for m in c}
    depth: dict[tuple[str, ...], int] = {}

    def depth_of(component: tuple[str, ...]) -> int:
        # iterative post-order: the graph of components is a DAG
        todo = [component]
        while todo:
            current = todo[-1]
            below = {component_of[e.target] for m in current for e in graph[m]} - {current}
            missing = [c for c in below if c not in depth]
            if missing:
                todo.extend(missing)
                continue
            depth[current] = 1 + max((depth[c] for c in below), default=-1)
            todo.pop()
        return depth[component]

    result: list[list[list[str]]] = []
    for component in sorted(set(component_of.values())):
        level = depth_of(component)
        while len(result) <= level:
            result.append([])
        result[level].append(list(component))
    return result


def mermaid(graph: dict[str, list[Edge]]) -> str:
    """The layered graph in Mermaid; a cycle (if any) is drawn as one node of its members."""
    component_of = {m: tuple(c) for c in strongly_connected_components(graph) for m in c}

    def node_id(component: tuple[str, ...]) -> str:
        return component[0].replace(".", "_")

    direct: dict[tuple[str, ...], set[tuple[str, ...]]] = {}
    for source, edges in graph.items():
        for edge in edges:
            a, b = component_of[source], component_of[edge.target]
            if a != b:
                direct.setdefault(a, set()).add(b)

    def reachable(a: tuple[str, ...], skip: tuple[str, ...]) -> set[tuple[str, ...]]:
        seen: set[tuple[str, ...]] = set()
        todo = [c for c in direct.get(a, ()) if c != skip]
        while todo:
            c = todo.pop()
            if c not in seen:
                seen.add(c)
                todo.extend(direct.get(c, ()))
        return seen

    lines = ["flowchart BT"]
    for level, components in enumerate(layers(graph)):
        lines.append(f"  subgraph layer{level}[layer {level}]")
        for component in components:
            label = " + ".join(component) if len(component) > 1 else component[0]
            lines.append(f'    {node_id(tuple(component))}["{label}"]')
        lines.append("  end")
    for a in sorted(direct):
        for b in sorted(direct[a]):
            if b not in reachable(a, skip=b):  # transitive reduction: keep only needed edges
                lines.append(f"  {node_id(a)} --> {node_id(b)}")
    return "\n".join(lines)


def test_scanner_resolves_imports(tmp_path: Path) -> None:
    """The rules above, on a small package: submodules vs names, relative imports,
    TYPE_CHECKING blocks, function-level imports, no implicit edge to the parent package."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": (
            "from typing import TYPE_CHECKING\n"
            "from pkg import b, helper\n"  # b is a module, helper a name of pkg/__init__
            "from .sub import c\n"
            "if TYPE_CHECKING:\n"
            "    import pkg.d\n"
            "else:\n"
            "    import os\n"
            "def f():\n"
            "    from .sub.c import x\n"
        ),
        "b.py": "",
        "d.py": "",
        "sub/__init__.py": "from .. import d\nfrom .c import y\n",
        "sub/c.py": "from ..a import thing\nimport pkg.sub\n",
    }
    modules = {}
    for relative, text in files.items():
        path = pkg / relative
        path.write_text(text)
        parts = ("pkg", *Path(relative).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    found = {
        name: sorted((e.target, e.line) for e in module_edges(name, path, modules))
        for name, path in modules.items()
    }
    assert found["pkg.a"] == [("pkg", 2), ("pkg.b", 2), ("pkg.sub.c", 3), ("pkg.sub.c", 9)]
    assert found["pkg.sub"] == [("pkg.d", 1), ("pkg.sub.c", 2)]
    assert found["pkg.sub.c"] == [("pkg.a", 1), ("pkg.sub", 2)]

    graph = {name: module_edges(name, path, modules) for name, path in modules.items()}
    assert strongly_connected_components(graph) == [
        ["pkg"],
        ["pkg.a", "pkg.sub", "pkg.sub.c"],
        ["pkg.b"],
        ["pkg.d"],
    ]
    (report,) = describe_cycles(graph)
    assert report.startswith("cycle of 3 modules: pkg.a, pkg.sub, pkg.sub.c\n")
    # the shortest cycle through pkg.a, with the lines of its imports
    assert report.splitlines()[1:] == [
        f"    pkg.a -> pkg.sub.c  ({pkg / 'a.py'}:3)",
        f"    pkg.sub.c -> pkg.a  ({pkg / 'sub' / 'c.py'}:1)",
    ]
    assert [[c[0] for c in level] for level in layers(graph)] == [
        ["pkg", "pkg.b", "pkg.d"],
        ["pkg.a"],
    ]


def test_mermaid_draws_layers_and_only_the_needed_edges() -> None:
    here = Path(__file__)
    graph = {
        "a": [Edge("a", "b", here, 1), Edge("a", "c", here, 2)],  # a -> c is implied by b
        "b": [Edge("b", "c", here, 1)],
        "c": [],
    }
    assert mermaid(graph).splitlines() == [
        "flowchart BT",
        "  subgraph layer0[layer 0]",
        '    c["c"]',
        "  end",
        "  subgraph layer1[layer 1]",
        '    b["b"]',
        "  end",
        "  subgraph layer2[layer 2]",
        '    a["a"]',
        "  end",
        "  a --> b",
        "  b --> c",
    ]


def test_the_import_graph_has_no_cycles() -> None:
    graph = import_graph()
    assert "mmgpt.registry" in graph and "mmgpt_vit" in graph  # the scan found the packages
    cycles = describe_cycles(graph)
    assert not cycles, "import cycles (break each with a lower module):\n" + "\n".join(cycles)


if __name__ == "__main__":
    graph = import_graph()
    for report in describe_cycles(graph):
        print(report, file=sys.stderr)
    print(mermaid(graph))
