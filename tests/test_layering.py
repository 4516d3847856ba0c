"""The package's layers import only downward (STYLE.md): core < PKCS#11 vocabulary < node <
cluster < gateway | kms < control, daemon < cli, testing, tls, bench."""

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
