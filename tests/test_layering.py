"""The package's layers import only downward (STYLE.md): core < PKCS#11 vocabulary < node <
cluster < gateway | kms < control, daemon < cli, testing, tls, bench; and no modules import one
another in a cycle, inside one area either (test_no_import_cycles)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hsmsim"

LAYERS: dict[str, int] = {
    "__init__": 0, "__main__": 6, "aio": 0, "errors": 0, "config": 0, "resources": 0, "core": 0,
    "files": 0, "_lib": 0, "awsmodel": 0,
    "pkcs11": 1,
    "node": 2,
    "cluster": 3,
    "gateway": 4, "kms": 4,
    "control": 5, "daemon": 5, "cloudhsm": 5,
    "cli": 6, "testing": 6, "tls": 6, "bench": 6,
}
# Siblings on one layer that must not know each other.
SEPARATE = {frozenset({"gateway", "kms"})}


def area_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
    return [(line, mod) for line, mod in found if mod == "hsmsim" or mod.startswith("hsmsim.")]


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_downward(path: Path) -> None:
    rel = path.relative_to(PACKAGE)
    own = rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.stem != "__init__" else "__init__"
    assert own in LAYERS, f"{rel}: area {own!r} has no layer; add it to LAYERS"
    bad = []
    for line, mod in imports(path):
        target = area_of(mod)
        if target == own or target not in LAYERS:
            continue
        if LAYERS[target] > LAYERS[own] or frozenset({own, target}) in SEPARATE:
            bad.append(f"{rel}:{line} imports {mod} ({target} is above {own})")
    assert not bad, "\n".join(bad)


# -- import cycles, inside a package too ---------------------------------------------------------
#
# The layer test above skips imports within one area, so it cannot see a cycle there (the
# control operations and the daemon knew each other through a lazy import one way and a
# TYPE_CHECKING import back). The cycle test works on the module graph of the whole package:
# an edge for EVERY import of another hsmsim module, wherever it stands: at module level, in a
# function body (a lazy import is a dependency that is only late), and under `if TYPE_CHECKING:`
# (a module that names another's types knows it; such an import hides a cycle from Python, not
# from the reader). Imports of compiled extensions (no .py source) are not edges.

# Cycles that exist and are accepted for now, each with what would remove it. The test fails
# on a cycle not listed here AND on a listed one that is gone (so the list only shrinks).
KNOWN_CYCLES: dict[frozenset[str], str] = {}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The dotted names an import statement brings in: for `from X import a`, X.a (a module or
    a name in X; the caller keeps the longest known module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        pkg = module.split(".") if is_package else module.split(".")[:-1]
        pkg = pkg[:len(pkg) - (node.level - 1)]
        base = ".".join([*pkg, base] if base else pkg)
    return [f"{base}.{alias.name}" for alias in node.names]


def module_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports (every import statement; see above)."""
    sources = {module_name(root, p): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for mod, path in sources.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for name in _imported(node, mod, path.name == "__init__.py"):
                if isinstance(node, ast.ImportFrom) and name not in sources:
                    name = name.rpartition(".")[0]  # `from X import a`: a is a name in X
                if name in sources and name != mod:
                    edges.add(name)
        graph[mod] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles: each strongly connected set of two or more modules, sorted (Tarjan,
    without recursion)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        cycles.append(sorted(comp))
    return sorted(cycles)


def test_cycle_finder_on_a_synthetic_graph() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"a", "e"},
             "f": {"g"}, "g": {"f"}}
    assert find_cycles(graph) == [["a", "b", "c"], ["f", "g"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_cycle_finder_sees_the_old_control_ops_cycle(tmp_path: Path) -> None:
    """The daemon before issue 13: main.py imported control_ops lazily, in a method, and
    control_ops imported main under TYPE_CHECKING. Both count, so the cycle is found."""
    pkg = tmp_path / "hsmsim"
    (pkg / "daemon").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "daemon" / "__init__.py").write_text("")
    (pkg / "daemon" / "main.py").write_text(
        "class Daemon:\n"
        "    def _handlers(self) -> object:\n"
        "        from hsmsim.daemon.control_ops import handlers\n"
        "        return handlers(self)\n")
    (pkg / "daemon" / "control_ops.py").write_text(
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "from . import settings\n"
        "if TYPE_CHECKING:\n"
        "    from hsmsim.daemon.main import Daemon\n"
        "def handlers(d: Daemon) -> dict[str, object]:\n"
        "    return {}\n")
    (pkg / "daemon" / "settings.py").write_text("from hsmsim.daemon._native import lib\n")
    graph = module_graph(pkg)
    assert graph["hsmsim.daemon.main"] == {"hsmsim.daemon.control_ops"}
    assert graph["hsmsim.daemon.control_ops"] == {"hsmsim.daemon.main", "hsmsim.daemon.settings"}
    assert graph["hsmsim.daemon.settings"] == set()  # a compiled extension is no edge
    assert find_cycles(graph) == [["hsmsim.daemon.control_ops", "hsmsim.daemon.main"]]


def test_no_import_cycles() -> None:
    found = {frozenset(c): c for c in find_cycles(module_graph(PACKAGE))}
    new = [", ".join(c) for k, c in found.items() if k not in KNOWN_CYCLES]
    gone = [", ".join(sorted(k)) for k in KNOWN_CYCLES if k not in found]
    assert not new, "import cycles (each a set of modules that import one another):\n" + "\n".join(new)
    assert not gone, "KNOWN_CYCLES lists cycles that no longer exist; remove:\n" + "\n".join(gone)
