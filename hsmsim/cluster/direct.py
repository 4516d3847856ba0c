"""The direct data path's routes (docs/direct-protocol.md): the HSMs holding a key that an
application may call without the daemon, in the order the cluster would balance them, each
with the ticket bound to the application's login there."""

from __future__ import annotations

import logging

from hsmsim.cluster.api import DirectRoute, Login
from hsmsim.cluster.directory import Directory
from hsmsim.cluster.logins import Logins
from hsmsim.cluster.members import Member
from hsmsim.cluster.pool import Pool
from hsmsim.cluster.routing import Router
from hsmsim.cluster.tickets import NO_TICKET, Ticket, Tickets
from hsmsim.node.client import NodeUnavailable
from hsmsim.pkcs11.constants import RV
from hsmsim.pkcs11.errors import Pkcs11Error

log = logging.getLogger("hsmsim.cluster")


class DirectRoutes:
    """Implements hsmsim.cluster.api.DirectRouting for the daemon's cluster."""

    def __init__(self, pool: Pool, directory: Directory, logins: Logins, router: Router,
                 tickets: Tickets) -> None:
        self.pool, self.directory, self.logins = pool, directory, logins
        self.router, self.tickets = router, tickets

    def _candidates(self, login: Login, handle: int) -> list[tuple[Member, int]]:
        """The holders of `handle` with this application's node login, in run()'s order."""
        obj = self.directory.get(handle)
        if not self.logins.active(login) or obj is None:
            return []
        try:
            self.router.check_available(handle, obj)
            cands = self.router.candidates((handle,), RV.KEY_HANDLE_INVALID, set(), login.login_id)
        except Pkcs11Error:
            return []
        out = []
        for m in cands:
            lid = m.logins.get(login.login_id)
            if lid is not None:
                out.append((m, lid))
        return out

    def _route(self, m: Member, t: Ticket) -> DirectRoute:
        return DirectRoute(t[2], t[0], t[1],
                           self.pool.config.request_timeout_s + m.latency_ms / 1000.0)

    def direct_route_cached(self, login: Login, handle: int) -> list[DirectRoute] | None:
        """direct_route() without waiting: None when a holder's ticket must be fetched first."""
        out = []
        for m, lid in self._candidates(login, handle):
            t = self.tickets.cached(m, lid)
            if t is None:
                return None
            if t is not NO_TICKET:
                out.append(self._route(m, t))
        return out

    async def direct_route(self, login: Login, handle: int) -> list[DirectRoute]:
        """The HSMs holding `handle` that this application may call directly, in the order
        run() would try them (round-robin over the converged holders). Empty when the call
        must go through the daemon (the key fails the availability check, no holder has the
        application's login yet, or a node has no direct listener)."""
        out: list[DirectRoute] = []
        for m, lid in self._candidates(login, handle):
            try:
                t = await self.tickets.fetch(m, m.connection(), lid)
            except (NodeUnavailable, Pkcs11Error) as exc:
                log.info("no direct ticket from %s: %s", m.hsm_id, exc)
                continue
            if t is not None:
                out.append(self._route(m, t))
        return out
