"""``__all__`` stays honest in every module of the package that defines one.

* every name in ``__all__`` exists in the imported module (a lazy module ``__getattr__`` counts);
* every public top-level class or function the module defines itself (not imports) is listed in
  ``__all__`` or named with a leading ``_``;
* ``__all__`` is a list or tuple of unique strings.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

PACKAGE = "ray_extsrc"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__main__":  # importing it runs the program
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _top_level(tree: ast.Module) -> list[ast.stmt]:
    """Module-level statements, including those in module-level if/try blocks."""
    out: list[ast.stmt] = []
    todo = list(tree.body)
    while todo:
        node = todo.pop(0)
        out.append(node)
        if isinstance(node, (ast.If, ast.Try)):
            for field in ("body", "orelse", "finalbody"):
                todo.extend(getattr(node, field, []))
            for handler in getattr(node, "handlers", []):
                todo.extend(handler.body)
    return out


def _declared_all(tree: ast.Module) -> ast.expr | None:
    for node in _top_level(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return node.value
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == "__all__":
            return node.value
    return None


def _with_all() -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for module, path in _modules().items():
        tree = ast.parse(path.read_text(), filename=str(path))
        if _declared_all(tree) is not None:
            out[module] = (path, tree)
    return out


MODULES = _with_all()


def test_the_package_declares_its_api():
    assert PACKAGE in MODULES and f"{PACKAGE}.workers" in MODULES and f"{PACKAGE}.readers" in MODULES


@pytest.mark.parametrize("module", sorted(MODULES))
def test_all_is_honest(module):
    path, tree = MODULES[module]
    mod = importlib.import_module(module)
    names = mod.__all__
    assert isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names), (
        f"{path}: __all__ must be a list or tuple of str"
    )
    dupes = sorted({n for n in names if list(names).count(n) > 1})
    missing = [n for n in names if not hasattr(mod, n)]
    defined = [
        node.name
        for node in _top_level(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
    ]
    unlisted = [n for n in dict.fromkeys(defined) if not n.startswith("_") and n not in names]
    problems = []
    if dupes:
        problems.append(f"listed twice in __all__: {dupes}")
    if missing:
        problems.append(f"in __all__ but not in the module: {missing}")
    if unlisted:
        problems.append(f"public top-level definitions missing from __all__ (list them or prefix '_'): {unlisted}")
    assert not problems, f"{path.relative_to(ROOT.parent)}: " + "; ".join(problems)
