"""vqgen's imports run one way: no cycle between its modules, and no import up a floor.

A static reading of the source (``ast``), so that an import inside a function counts as much
as one at the top of a file: it ties the two modules together all the same, only later.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import NamedTuple

import pytest

VQGEN = Path(__file__).resolve().parents[1] / "vqgen"

# The floors, bottom first. A module may import from its own floor and the floors below it,
# never from a floor above. Within a floor any direction is allowed, but no cycle.
FLOORS: list[tuple[str, ...]] = [
    ("vqgen", "vqgen.files", "vqgen.config", "vqgen.checkpoint", "vqgen.progress", "vqgen.images"),  # the root, atomic files, typed config, checkpoints, progress, image grids
    ("vqgen.data", "vqgen.text", "vqgen.tokenizer"),  # images, captions, codes
    ("vqgen.model",),  # the transformer
    ("vqgen.sampling",),  # prompts -> codes
    ("vqgen.eval",),  # scores what sampling made
    ("vqgen.train",),  # datasets -> checkpoints, with evaluation and previews
    ("vqgen.bench", "vqgen.serve", "vqgen.compress", "vqgen.cli"),  # applications of all of the above
]
FLOOR = {package: level for level, packages in enumerate(FLOORS) for package in packages}


class Edge(NamedTuple):
    source: str  # the importing module
    target: str  # the module imported (or whose package's __init__ the import runs)
    where: str  # file:line of the import statement

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} ({self.where})"


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module of the package at ``root`` (a package is its ``__init__``)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_edges(root: Path) -> list[Edge]:
    """Every import between the modules of the package at ``root``, at any depth of a file.

    ``from p import n`` names the submodule ``p.n`` where one exists, else ``p`` itself; importing
    ``p.q.m`` also runs the ``__init__`` of ``p`` and ``p.q``, so those count as imported too
    (except the importer's own packages, which are running already).
    """
    modules = module_names(root)
    edges = []
    for source, path in modules.items():
        package = source if path.name == "__init__.py" else source.rpartition(".")[0]
        where = path.relative_to(root.parent).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the importer's package, up level - 1
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, *([node.module] if node.module else [])])
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # an attribute of a module: that module
                    target = target.rpartition(".")[0]
                if not target:
                    continue  # not a module of this package
                for imported in [*_ancestors(target), target]:
                    if imported != source and imported not in _ancestors(source):
                        edges.append(Edge(source, imported, f"{where}:{node.lineno}"))
    return list(dict.fromkeys(edges))


def cycles(edges: list[Edge]) -> list[list[Edge]]:
    """One shortest cycle through each strongly connected group of modules (Tarjan's algorithm)."""
    graph: dict[str, list[Edge]] = {}
    for edge in edges:
        graph.setdefault(edge.source, []).append(edge)
        graph.setdefault(edge.target, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for edge in graph[node]:
            if edge.target not in index:
                visit(edge.target)
                low[node] = min(low[node], low[edge.target])
            elif edge.target in stack:
                low[node] = min(low[node], index[edge.target])
        if low[node] == index[node]:
            member, group = None, set()
            while member != node:
                member = stack.pop()
                group.add(member)
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)

    found = []
    for group in groups:
        start = min(group)
        paths: dict[str, list[Edge]] = {start: []}
        frontier = [start]
        while frontier and start not in {e.target for n in frontier for e in graph[n]}:
            nxt = []
            for node in frontier:
                for edge in graph[node]:
                    if edge.target in group and edge.target not in paths:
                        paths[edge.target] = [*paths[node], edge]
                        nxt.append(edge.target)
            frontier = nxt
        last = next(e for n in frontier for e in graph[n] if e.target == start)
        found.append([*paths[last.source], last])
    return found


def floor_of(module: str) -> int:
    package = module if module in FLOOR else ".".join(module.split(".")[:2])
    return FLOOR[package]


def upward(edges: list[Edge]) -> list[Edge]:
    """The imports of a floor above the importer's, each named once by its deepest module."""
    up = [e for e in edges if floor_of(e.target) > floor_of(e.source)]
    deeper = {(e.where, package) for e in up for package in _ancestors(e.target)}
    return [e for e in up if (e.where, e.target) not in deeper]


# --------------------------------------------------------------------------------------
# vqgen itself
# --------------------------------------------------------------------------------------


def test_every_package_of_vqgen_is_on_a_floor():
    packages = {m if m in FLOOR else ".".join(m.split(".")[:2]) for m in module_names(VQGEN)}
    assert not packages - FLOOR.keys(), f"put {sorted(packages - FLOOR.keys())} on a floor of FLOORS in {__file__}"


def test_no_import_cycle_between_vqgen_modules():
    found = cycles(import_edges(VQGEN))
    assert not found, "import cycles (module -> module it imports, at file:line):\n" + "\n".join(
        "  " + " -> ".join([cycle[0].source] + [f"{e.target} ({e.where})" for e in cycle]) for cycle in found
    )


def test_no_import_runs_up_a_floor():
    names = [" / ".join(packages) for packages in FLOORS]
    found = upward(import_edges(VQGEN))
    assert not found, f"imports up a floor (floors, bottom first: {' < '.join(names)}):\n" + "\n".join(
        f"  {e.where}: {e.source} imports {e.target}" for e in found
    )


# --------------------------------------------------------------------------------------
# The analysis, on a package made for it
# --------------------------------------------------------------------------------------


@pytest.fixture
def package(tmp_path) -> Path:
    files = {
        "vqgen/__init__.py": "",
        "vqgen/config.py": "import json\n",
        "vqgen/model/__init__.py": "from vqgen.model.net import Net\n",
        "vqgen/model/net.py": "from vqgen import config\nfrom . import parts\n",
        "vqgen/model/parts.py": "",
        "vqgen/sampling/__init__.py": "",
        "vqgen/sampling/loop.py": "from vqgen.model import Net\n\n\ndef run():\n    from vqgen.eval.grid import save\n",
        "vqgen/eval/__init__.py": "",
        "vqgen/eval/grid.py": "import vqgen.sampling.loop\n\n\ndef save():\n    pass\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path / "vqgen"


def test_edges_count_function_level_relative_and_package_imports(package):
    edges = {(e.source, e.target): e.where for e in import_edges(package)}
    assert edges[("vqgen.sampling.loop", "vqgen.eval.grid")] == "vqgen/sampling/loop.py:5"  # inside run()
    assert edges[("vqgen.sampling.loop", "vqgen.eval")] == "vqgen/sampling/loop.py:5"  # runs eval/__init__
    assert edges[("vqgen.sampling.loop", "vqgen.model")] == "vqgen/sampling/loop.py:1"  # Net: an attribute
    assert edges[("vqgen.model.net", "vqgen.config")] == "vqgen/model/net.py:1"  # a submodule by name
    assert edges[("vqgen.model.net", "vqgen.model.parts")] == "vqgen/model/net.py:2"  # relative
    assert ("vqgen.model.net", "vqgen.model") not in edges  # its own package is running already
    assert not any(target == "json" for _, target in edges)


def test_a_cycle_and_an_upward_import_are_named_with_file_and_line(package):
    edges = import_edges(package)
    [cycle] = cycles(edges)
    assert [str(e) for e in cycle] == [
        "vqgen.eval.grid -> vqgen.sampling.loop (vqgen/eval/grid.py:1)",
        "vqgen.sampling.loop -> vqgen.eval.grid (vqgen/sampling/loop.py:5)",
    ]
    assert upward(edges) == [Edge("vqgen.sampling.loop", "vqgen.eval.grid", "vqgen/sampling/loop.py:5")]
