"""The direct path's ticket table is a bounded least-recently-used table: at the bound the
oldest ticket goes (it is fetched again when next needed), never every login's at once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from hsmsim.cluster import tickets
from hsmsim.cluster.config import ClusterConfig
from hsmsim.cluster.members import Member
from hsmsim.cluster.pool import Pool
from hsmsim.cluster.state import StateDir
from hsmsim.cluster.tickets import Ticket, Tickets


class _Node:
    """The one node call Tickets makes."""

    def __init__(self) -> None:
        self.asked: list[int] = []

    async def direct_ticket(self, lid: int) -> Ticket:
        self.asked.append(lid)
        return (b"ticket-%d" % lid, b"k" * 32, "tls:127.0.0.1:1")


def test_tickets_forget_the_least_recently_used_at_the_bound(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tickets, "MAX_TICKETS", 3)
    m = Member("hsm-test", "us-east-1a", StateDir(tmp_path))
    table = Tickets(Pool({m.hsm_id: m}, ClusterConfig()))
    node = _Node()

    async def run() -> None:
        for lid in (1, 2, 3):
            await table.fetch(m, node, lid)  # type: ignore[arg-type]
        assert table.cached(m, 1) is not None  # login 1 is now the most recent
        await table.fetch(m, node, 4)  # type: ignore[arg-type]  # over the bound: login 2 goes
        assert table.cached(m, 2) is None
        assert await table.fetch(m, node, 2) == (b"ticket-2", b"k" * 32, "tls:127.0.0.1:1")  # type: ignore[arg-type]
    asyncio.run(run())
    assert len(table) == 3
    assert [table.cached(m, lid) is not None for lid in (1, 2, 3, 4)] == [True, True, False, True]  # 2 came back, 3 went
    assert node.asked == [1, 2, 3, 4, 2]
