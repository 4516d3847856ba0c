"""The node package stays in files a reader can hold (issue 13: no daemon Python file over 500
lines; a file that grows past it is split by job, as ops_crypto/ops_keys were)."""

from __future__ import annotations

from pathlib import Path

import pytest

NODE = Path(__file__).resolve().parents[2] / "hsmsim" / "node"
MAX_LINES = 500


@pytest.mark.parametrize("path", sorted(NODE.glob("*.py")), ids=lambda p: p.name)
def test_no_node_file_over_500_lines(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.name} has {lines} lines; split it by job"
