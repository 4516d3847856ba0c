"""The direct data path's tickets (docs/direct-protocol.md): one per application login per
HSM connection, fetched from the node once and forgotten with the login or the connection."""

from __future__ import annotations

from hsmsim.cluster.members import Member
from hsmsim.cluster.pool import Pool
from hsmsim.node.client import NodeClient, NodeThrottled
from hsmsim.pkcs11.errors import Pkcs11Error

Ticket = tuple[bytes, bytes, str]  # (ticket, descriptor key, direct address)
NO_TICKET: Ticket = (b"", b"", "")  # a node that gives no direct-path tickets
MAX_TICKETS = 100_000


class Tickets:
    """(HSM, its connection generation, node login id) -> ticket. A node login dies with the
    connection, and its ticket with it on the node."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self._tickets: dict[tuple[str, int, int], Ticket] = {}

    def cached(self, m: Member, lid: int) -> Ticket | None:
        """The ticket known for node login `lid` on `m` (NO_TICKET: the node has none), or
        None when it was never fetched."""
        return self._tickets.get((m.hsm_id, m.generation, lid))

    def forget(self, m: Member, lid: int) -> None:
        self._tickets.pop((m.hsm_id, m.generation, lid), None)

    async def fetch(self, m: Member, client: NodeClient, lid: int) -> Ticket | None:
        """The direct-path ticket of node login `lid` on `m` (fetched once per login); None
        when the node gives none."""
        key = (m.hsm_id, m.generation, lid)
        t = self._tickets.get(key)
        if t is None:
            try:
                t = await self.pool.timed(m, client.direct_ticket(lid))
            except NodeThrottled:
                raise
            except Pkcs11Error:  # e.g. no direct listener: remembered, never asked again
                t = NO_TICKET
            if m.generation == key[1]:
                if len(self._tickets) > MAX_TICKETS:
                    self._tickets.clear()
                self._tickets[key] = t
        return None if t is NO_TICKET else t
