"""Imports point one way (DESIGN.md, "Who may import whom"): no circles, nothing heavy in `workers/`.

The graph is read from the source with `ast`: an edge A -> B for each import that runs when A is
imported (module level, including inside module-level ``if``/``try``/``class`` bodies, but not
under ``if TYPE_CHECKING:``). Imports inside functions are lazy and allowed to point anywhere.
Importing ``a.b.c`` also runs the packages ``a.b`` and ``a``, so those are edges too, except the
packages that contain the importing module itself (they are already being imported).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

PACKAGE = "ray_extsrc"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
HEAVY = ("torch", "cupy", "ray", "nvidia")  # never at module level in workers/: every forked child loads them
# DESIGN.md: workers/ uses the standard library, NumPy and the leaf modules below, nothing else
WORKERS_MAY_IMPORT = {f"{PACKAGE}.types", f"{PACKAGE}.source", f"{PACKAGE}.errors"}


def module_files() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = module_files()


def is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def eager_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements that run when the module is imported (not in functions, not TYPE_CHECKING)."""
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop(0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue  # lazy
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
        elif isinstance(node, (ast.If, ast.Try, ast.With, ast.ClassDef, ast.For, ast.While)) or (
            sys.version_info >= (3, 11) and isinstance(node, ast.TryStar)
        ):
            for field in ("body", "orelse", "finalbody", "handlers"):
                todo.extend(getattr(node, field, []))
        elif isinstance(node, ast.ExceptHandler):
            todo.extend(node.body)


def imported_names(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """Absolute names of the modules (or module attributes) ``node`` imports, as written."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = module.split(".") if is_package(module) else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    return [prefix] + [f"{prefix}.{alias.name}" for alias in node.names if alias.name != "*"]


def what_it_loads(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules ``node`` names: ``from p import sub`` is p.sub when that is a module, else p."""
    names = imported_names(module, node)
    if isinstance(node, ast.Import):
        return names
    prefix, attrs = names[0], names[1:]
    subs = [n for n in attrs if n in MODULES]
    return subs + ([prefix] if len(subs) < len(node.names) else [])


def graph() -> dict[str, dict[str, int]]:
    """module -> {imported module of this package: line of the first such import}."""
    edges: dict[str, dict[str, int]] = {m: {} for m in MODULES}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        own_packages = {".".join(module.split(".")[:k]) for k in range(1, module.count(".") + 1)}
        if is_package(module):
            own_packages.add(module)
        for node in eager_imports(tree):
            for name in imported_names(module, node):
                parts = name.split(".")
                for k in range(1, len(parts) + 1):  # a.b.c runs a, a.b and a.b.c
                    target = ".".join(parts[:k])
                    if target in MODULES and target not in own_packages and target != module:
                        edges[module].setdefault(target, node.lineno)
    return edges


def strongly_connected(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's algorithm: the components with more than one module (every circle lies in one)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def shortest_cycle(edges: dict[str, dict[str, int]], start: str, within: set[str]) -> list[str]:
    """The shortest circle through ``start`` inside one component (breadth-first)."""
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v]):
                if w not in within:
                    continue
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return path[::-1] + [start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return [start]


def describe(edges: dict[str, dict[str, int]], cycle: list[str]) -> str:
    steps = [
        f"{MODULES[a].relative_to(ROOT.parent)}:{edges[a][b]} imports {b}" for a, b in zip(cycle, cycle[1:])
    ]
    return " -> ".join(cycle) + "\n      " + "\n      ".join(steps)


def test_graph_sees_the_package():
    edges = graph()
    assert f"{PACKAGE}.workers.pool" in edges and f"{PACKAGE}.workers.shm" in edges[f"{PACKAGE}.workers.pool"]
    # lazy (in-function) imports are not edges: the zygote is imported inside WorkerPool._fork_zygote
    assert f"{PACKAGE}.workers.zygote" not in edges[f"{PACKAGE}.workers.pool"]


def test_cycle_finder_finds_a_planted_circle():
    edges = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}}
    assert strongly_connected(edges) == [["a", "b", "c"]]
    assert shortest_cycle(edges, "a", {"a", "b", "c"}) == ["a", "b", "c", "a"]
    assert shortest_cycle({"a": {"b": 1}, "b": {"a": 2}}, "a", {"a", "b"}) == ["a", "b", "a"]


def test_no_import_cycles():
    edges = graph()
    problems = []
    for comp in strongly_connected(edges):
        members = set(comp)
        cycles, seen = [], set()
        for start in comp:  # one shortest circle through each member, without repeats
            c = shortest_cycle(edges, start, members)
            key = frozenset(zip(c, c[1:]))
            if key not in seen:
                seen.add(key)
                cycles.append(describe(edges, c))
        problems.append(f"circle among {comp}:\n  " + "\n  ".join(cycles))
    assert not problems, "module-level import circles (make one side import lazily, or move the shared " \
        "part down the data path):\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "module", sorted(m for m in MODULES if m == f"{PACKAGE}.workers" or m.startswith(f"{PACKAGE}.workers."))
)
def test_workers_import_nothing_heavy_at_module_level(module):
    tree = ast.parse(MODULES[module].read_text())
    bad = []
    for node in eager_imports(tree):
        for name in what_it_loads(module, node):
            top = name.split(".")[0]
            if top in HEAVY:
                bad.append(f"line {node.lineno}: {name}")
            elif top == PACKAGE and name != f"{PACKAGE}.workers" and not name.startswith(f"{PACKAGE}.workers."):
                if name not in WORKERS_MAY_IMPORT:
                    bad.append(f"line {node.lineno}: {name} (outside workers/, types, source, errors)")
    assert not bad, f"{MODULES[module]} imports at module level: {bad}"


# DESIGN.md: the executor runs a planned pipeline for `pipeline.Pipeline`, below it on the data path:
# it imports nothing that uses the pipeline (the pipeline, the Ray layer, the consumer side) and,
# like `pipeline.py`, nothing heavy at module level (a pipeline runs in any process; GPU modules
# load CuPy inside their functions)
ABOVE_THE_EXECUTOR = ("pipeline", "actor", "train", "loader_iterator", "gpu_stage_choice", "transport", "consumer_stage",
                      "host_ring", "gpu_handoff", "plugin", "bench", "cli")


@pytest.mark.parametrize(
    "module", sorted(m for m in MODULES if m == f"{PACKAGE}.executor" or m.startswith(f"{PACKAGE}.executor."))
)
def test_the_executor_imports_down_the_data_path_only(module):
    tree = ast.parse(MODULES[module].read_text())
    above = {f"{PACKAGE}.{name}" for name in ABOVE_THE_EXECUTOR}
    bad = []
    for node in eager_imports(tree):
        for name in what_it_loads(module, node):
            if name.split(".")[0] in HEAVY:
                bad.append(f"line {node.lineno}: {name}")
            elif any(name == a or name.startswith(a + ".") for a in above):
                bad.append(f"line {node.lineno}: {name} (above the executor on the data path)")
    assert not bad, f"{MODULES[module]} imports at module level: {bad}"


def test_the_pipeline_imports_no_ray_or_gpu_library_at_module_level():
    tree = ast.parse(MODULES[f"{PACKAGE}.pipeline"].read_text())
    bad = [
        f"line {node.lineno}: {name}"
        for node in eager_imports(tree)
        for name in what_it_loads(f"{PACKAGE}.pipeline", node)
        if name.split(".")[0] in HEAVY
    ]
    assert not bad, f"pipeline.py imports at module level: {bad}"


def test_importing_workers_loads_no_heavy_module():
    code = textwrap.dedent(
        f"""
        import sys
        import {PACKAGE}.workers
        import {PACKAGE}.workers.zygote, {PACKAGE}.workers.worker, {PACKAGE}.workers.shm
        print(sorted(m for m in sys.modules if m.split(".")[0] in {("torch", "cupy", "ray")!r}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT.parent
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"importing {PACKAGE}.workers loaded: {out.stdout.strip()}"
