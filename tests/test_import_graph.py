"""The package's import graph: no cycles, and nothing below the ops seam imports upward.

Edges are read from the source (`from .x import`, `from . import x`, `from fastddpm.x import`,
`import fastddpm.x`), function-level imports included, over fastddpm/*.py and its subpackages
(fastddpm.cuda, fastddpm.kernels: each one node). `from . import name` of a name that is not a
module is an edge to the package's `__init__`. Run as a script, it prints the cycles it finds.
"""

from __future__ import annotations

import ast
from pathlib import Path

import fastddpm

PACKAGE = Path(fastddpm.__file__).parent
# The ops seam and what it stands on: none of these may import anything outside this set.
BELOW_OPS = {
    "ops",
    "reference",
    "schedule",
    "solver_table",
    "config_schema",
    "custom_ops",
    "cuda",
    "verify",
    "backends",
    "cases",
    "precision",
    "io",
    "kernels",
    "_version",
}


def _module_name(path: Path) -> str:
    """ "sampler" for fastddpm/sampler.py; a subpackage's name ("cuda", "kernels") for any of its files."""
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _targets(node: ast.AST, source: str, in_subpackage: bool, modules: set[str]) -> list[str]:
    """The fastddpm modules one import statement in module `source` loads."""
    if isinstance(node, ast.Import):
        return [a.name.split(".")[1] for a in node.names if a.name.startswith("fastddpm.")]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level == 0:
        if node.module != "fastddpm" and not (node.module or "").startswith("fastddpm."):
            return []
        module = node.module.removeprefix("fastddpm").removeprefix(".")
    elif node.level == 1 and in_subpackage:
        return [source]  # the subpackage's own modules
    else:
        module = node.module or ""
    if module:
        return [module.split(".")[0]]
    return [a.name if a.name in modules else "__init__" for a in node.names]


def import_graph() -> dict[str, set[str]]:
    """module -> the fastddpm modules it imports anywhere in its source."""
    files = [*PACKAGE.glob("*.py"), *PACKAGE.glob("*/*.py")]
    modules = {_module_name(f) for f in files}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for f in files:
        source = _module_name(f)
        in_subpackage = f.parent != PACKAGE
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            targets = _targets(node, source, in_subpackage, modules)
            graph[source].update(t for t in targets if t in modules and t != source)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_no_import_cycles():
    found = cycles(import_graph())
    assert found == [], f"modules that import each other, directly or around a cycle: {found}"


def test_nothing_below_ops_imports_upward():
    graph = import_graph()
    upward = {m: sorted(graph[m] - BELOW_OPS) for m in BELOW_OPS if graph.get(m, set()) - BELOW_OPS}
    assert upward == {}, f"modules below fastddpm.ops that import upward: {upward}"


if __name__ == "__main__":
    g = import_graph()
    for component in cycles(g):
        print("cycle:", " ".join(component))
    for m in sorted(BELOW_OPS & set(g)):
        if g[m] - BELOW_OPS:
            print(f"upward: {m} -> {', '.join(sorted(g[m] - BELOW_OPS))}")
