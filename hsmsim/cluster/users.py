"""The client-facing user calls (CloudHSM CLI's user verbs): a user change is made on one HSM
(which checks the caller may make it) and then carried to the others; a new user, like a new
key, is acknowledged only once 2 HSMs hold it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from hsmsim.cluster.api import Login, UserInfo
from hsmsim.cluster.journal import Journal
from hsmsim.cluster.logins import Logins
from hsmsim.cluster.members import Member
from hsmsim.cluster.pool import Pool
from hsmsim.cluster.routing import Router
from hsmsim.cluster.sync import KeySync
from hsmsim.cluster.usersync import UserSync
from hsmsim.node.client import NodeClient, NodeUnavailable
from hsmsim.pkcs11.constants import RV
from hsmsim.pkcs11.errors import Pkcs11Error

log = logging.getLogger("hsmsim.cluster")
# fn(client, node login id) making one user change on one HSM
Change = Callable[[NodeClient, int], Awaitable[Any]]


class UserCalls:
    def __init__(self, pool: Pool, journal: Journal, logins: Logins, router: Router,
                 usersync: UserSync, keysync: KeySync) -> None:
        self.pool, self.journal, self.logins, self.router = pool, journal, logins, router
        self.usersync, self.keysync = usersync, keysync

    async def create_user(self, login: Login, username: str, role: str, password: str) -> None:
        pool = self.pool
        rec = self.logins.rec(login)
        _, src = await self.router.run_on(
            login, (), RV.DEVICE_ERROR,
            lambda client, lid: client.create_user(lid, username, role, password))
        self.journal.append({"t": "user_live", "u": username})
        ok = 0
        try:
            blob = await pool.timed(src, src.connection().export_users())
            targets = [(m, m.client) for m in pool.usable() if m is not src and m.client is not None]
            results = await asyncio.gather(
                *(pool.timed(m, client.import_users(blob)) for m, client in targets),
                return_exceptions=True)
            for (m, _), r in zip(targets, results):
                if isinstance(r, BaseException):
                    m.converged = False
                else:
                    ok += 1
        except (NodeUnavailable, Pkcs11Error) as exc:
            log.info("user sync from %s failed: %s", src.hsm_id, exc)
        if ok < self.keysync.quorum_needed():
            # Like a key, a user is acknowledged only once 2 HSMs hold it: undo and refuse.
            self.journal.append({"t": "user_tomb", "u": username})
            try:
                lid = await self.logins.node_login(src, rec)
                await pool.timed(src, src.connection().delete_user(lid, username))
            except (NodeUnavailable, Pkcs11Error):
                pass  # reconciliation applies the tombstone when the HSM is back
            raise Pkcs11Error(RV.FUNCTION_FAILED, f"user {username} could not be synchronized "
                              "to 2 HSMs")

    async def _everywhere(self, login: Login, fn: Change) -> None:
        rec = self.logins.rec(login)
        _, first = await self.router.run_on(login, (), RV.DEVICE_ERROR, fn)

        async def follow(m: Member) -> None:
            try:
                lid = await self.logins.node_login(m, rec)
                await self.pool.timed(m, fn(m.connection(), lid))
            except Exception as exc:
                log.info("user change on %s failed (%s)", m.hsm_id, exc)
                m.converged = False
        await asyncio.gather(*(follow(m) for m in self.pool.usable() if m is not first))
        for m in self.pool.members.values():
            if not m.usable:
                m.converged = False

    async def delete_user(self, login: Login, username: str) -> None:
        await self._everywhere(login, lambda client, lid: client.delete_user(lid, username))
        self.journal.append({"t": "user_tomb", "u": username})

    async def _credential_change(self, login: Login, fn: Change) -> None:
        """A change of a user's credential (password, unlock): made on one HSM, whose new
        record (salt, hash, credential version) is then copied to the others, so that every
        HSM holds the same record with the same version. An HSM that misses it gets it when
        it is reconciled (UserSync.converge)."""
        _, src = await self.router.run_on(login, (), RV.DEVICE_ERROR, fn)
        others = [m for m in self.pool.usable() if m is not src]
        if not await self.usersync.converge([src, *others]):
            for m in others:
                m.converged = False
        for m in self.pool.members.values():
            if not m.usable:
                m.converged = False

    async def change_password(self, login: Login, username: str, password: str) -> None:
        await self._credential_change(login, lambda client, lid: client.change_password(
            lid, username, password))
        self.logins.password_changed(login, username, password)

    async def unlock_user(self, login: Login, username: str) -> None:
        await self._credential_change(login, lambda client, lid: client.unlock_user(lid, username))

    async def list_users(self, login: Login) -> list[UserInfo]:
        users = await self.router.run(login, (), RV.DEVICE_ERROR,
                                      lambda client, lid: client.list_users(lid))
        return [UserInfo(u.username, u.role, u.locked, u.failed_logins) for u in users]
