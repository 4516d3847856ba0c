"""Every source path the README and docs/ name exists: a file that moves (issue 13 split the
cluster, the gateway, the control operations and the node) takes its references with it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# repository-relative paths only (not /etc/hsmsim/... in an example configuration)
PATH = re.compile(r"(?<![/\w.-])((?:hsmsim|native|tests|tools|docs)/[\w/.-]+\.(?:py|c|h|md|json))")
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_named_paths_exist(doc: Path) -> None:
    named = set(PATH.findall(doc.read_text()))
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"


def test_the_pattern_finds_paths_and_skips_absolute_ones() -> None:
    text = "see `hsmsim/cluster/routing.py` and /etc/hsmsim/pkcs11.conf"
    assert PATH.findall(text) == ["hsmsim/cluster/routing.py"]
