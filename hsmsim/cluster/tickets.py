"""The direct data path's tickets (docs/direct-protocol.md): one per application login per
HSM connection, fetched from the node once and forgotten with the login or the connection."""

from __future__ import annotations

from collections import OrderedDict

from hsmsim.cluster.members import Member
from hsmsim.cluster.pool import Pool
from hsmsim.node.client import NodeClient, NodeThrottled
from hsmsim.pkcs11.errors import Pkcs11Error

Ticket = tuple[bytes, bytes, str]  # (ticket, descriptor key, direct address)
NO_TICKET: Ticket = (b"", b"", "")  # a node that gives no direct-path tickets
MAX_TICKETS = 100_000


class Tickets:
    """(HSM, its connection generation, node login id) -> ticket. A node login dies with the
    connection, and its ticket with it on the node. At most `limit` are kept, the least
    recently used forgotten first (a forgotten ticket is fetched again when next needed)."""

    def __init__(self, pool: Pool, limit: int | None = None) -> None:
        self.pool = pool
        self.limit = MAX_TICKETS if limit is None else limit
        self._tickets: OrderedDict[tuple[str, int, int], Ticket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._tickets)

    def _get(self, key: tuple[str, int, int]) -> Ticket | None:
        t = self._tickets.get(key)
        if t is not None:
            self._tickets.move_to_end(key)
        return t

    def cached(self, m: Member, lid: int) -> Ticket | None:
        """The ticket known for node login `lid` on `m` (NO_TICKET: the node has none), or
        None when it was never fetched."""
        return self._get((m.hsm_id, m.generation, lid))

    def forget(self, m: Member, lid: int) -> None:
        self._tickets.pop((m.hsm_id, m.generation, lid), None)

    async def fetch(self, m: Member, client: NodeClient, lid: int) -> Ticket | None:
        """The direct-path ticket of node login `lid` on `m` (fetched once per login); None
        when the node gives none."""
        key = (m.hsm_id, m.generation, lid)
        t = self._get(key)
        if t is None:
            try:
                t = await self.pool.timed(m, client.direct_ticket(lid))
            except NodeThrottled:
                raise
            except Pkcs11Error:  # e.g. no direct listener: remembered, never asked again
                t = NO_TICKET
            if m.generation == key[1]:
                self._tickets[key] = t
                self._tickets.move_to_end(key)
                while len(self._tickets) > self.limit:
                    self._tickets.popitem(last=False)
        return None if t is NO_TICKET else t
