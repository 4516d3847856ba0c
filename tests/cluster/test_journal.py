"""The cluster's crash-safe memory: handles are never reused across restarts, tombstones
survive, a record torn by a crash is dropped, real corruption is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from hsmsim.cluster.journal import HandleAllocator, Journal
from hsmsim.cluster.state import StateError


def test_handles_never_reused_across_restarts(tmp_path: Path) -> None:
    a = HandleAllocator(tmp_path / "h.json")
    first = a.allocate(3)
    b = HandleAllocator(tmp_path / "h.json")  # a crash: the in-memory counter is gone
    assert min(b.allocate(1)) > max(first)
    b.bump_past(10**9)
    assert b.allocate(1)[0] == 10**9 + 1
    assert HandleAllocator(tmp_path / "h.json").allocate(1)[0] > 10**9 + 1


def test_tombstones_survive_and_torn_records_are_dropped(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.jsonl")
    j.tombstone(5, 6)
    j.append({"t": "user_tomb", "u": "zed"})
    j.close()
    with (tmp_path / "j.jsonl").open("ab") as f:
        f.write(b'{"t":"tomb","h":')  # torn by a crash
    j2 = Journal(tmp_path / "j.jsonl")
    assert j2.tombstones == {5, 6} and j2.user_tombstones == {"zed"}
    j2.tombstone(7)
    j2.close()
    assert Journal(tmp_path / "j.jsonl").tombstones == {5, 6, 7}


def test_corruption_is_refused(tmp_path: Path) -> None:
    (tmp_path / "j.jsonl").write_text('{"t":"tomb","h":1}\ngarbage\n{"t":"tomb","h":2}\n')
    with pytest.raises(StateError, match="line 2 is corrupt"):
        Journal(tmp_path / "j.jsonl")
    (tmp_path / "h.json").write_text("{}")
    with pytest.raises(StateError, match="corrupt"):
        HandleAllocator(tmp_path / "h.json")
