"""User records across the HSMs: converging them (the newest credential of each user wins,
deleted users stay deleted), checking one user before a login, and the cluster-wide user
list with each user's coverage."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from hsmsim.cluster.journal import Journal
from hsmsim.cluster.members import Member
from hsmsim.cluster.pool import Pool
from hsmsim.node.client import NodeClient, NodeUnavailable
from hsmsim.pkcs11.errors import Pkcs11Error

log = logging.getLogger("hsmsim.cluster")


def _connected(members: Sequence[Member]) -> list[tuple[Member, NodeClient]]:
    return [(m, m.client) for m in members if m.client is not None]


class UserSync:
    def __init__(self, pool: Pool, journal: Journal) -> None:
        self.pool = pool
        self.journal = journal

    async def converge(self, members: Sequence[Member] | None = None) -> bool:
        """Converge the user records of `members` (default: every usable HSM): the first one
        imports every other one's records, then the others import its own; an import keeps,
        per user, the newest credential (hsmsim.node.users.credential_key), so all end with
        the newest record each user has anywhere. Records travel masked (salted hashes, never
        a password); users the cluster deleted are not added back. False if an HSM could not
        take part (it stays behind until its next reconciliation)."""
        pool = self.pool
        ms = _connected(pool.usable() if members is None else members)
        if len(ms) < 2:
            return True
        (hub, hub_client), others = ms[0], ms[1:]
        skip = sorted(self.journal.user_tombstones)
        ok = True

        async def pull(x: Member, client: NodeClient) -> None:
            blob = await pool.timed(x, client.export_users())
            await pool.timed(hub, hub_client.import_users(blob, skip))

        async def push(x: Member, client: NodeClient, blob: bytes) -> None:
            await pool.timed(x, client.import_users(blob, skip))

        for x, client in others:  # one at a time: the hub's imports are its own store's writes
            try:
                await pull(x, client)
            except (NodeUnavailable, Pkcs11Error) as exc:
                log.info("user convergence: records of %s not read (%s)", x.hsm_id, exc)
                ok = False
        try:
            blob = await pool.timed(hub, hub_client.export_users())
        except (NodeUnavailable, Pkcs11Error) as exc:
            log.info("user convergence: records of %s not read (%s)", hub.hsm_id, exc)
            return False
        results = await asyncio.gather(*(push(x, client, blob) for x, client in others),
                                       return_exceptions=True)
        for (x, _), r in zip(others, results):
            if isinstance(r, BaseException):
                log.info("user convergence: %s not updated (%s)", x.hsm_id, r)
                ok = False
        return ok

    async def _versions(self, members: Sequence[Member], username: str | None = None
                        ) -> tuple[dict[str, dict[str, int]], set[str]]:
        """({username: {hsm_id: credential version}}, the HSMs that answered)."""
        out: dict[str, dict[str, int]] = {}
        answered: set[str] = set()
        ms = _connected(members)
        results = await asyncio.gather(
            *(self.pool.timed(m, client.list_users(None)) for m, client in ms),
            return_exceptions=True)
        for (m, _), r in zip(ms, results):
            if isinstance(r, BaseException):
                continue
            answered.add(m.hsm_id)
            for u in r:
                if username is None or u.username == username:
                    out.setdefault(u.username, {})[m.hsm_id] = u.version
        return out, answered

    async def converge_before_login(self, members: Sequence[Member], username: str) -> None:
        """Converge the users first when `username`'s record differs across `members` (an HSM
        that missed a change and has not been reconciled yet). One user listing per HSM (no
        password hash), so a login costs little more than before. FIDELITY: CloudHSM does not
        document this; it keeps a stale HSM from counting failed logins (README, "Fidelity")."""
        try:
            found, answered = await self._versions(members, username)
        except Exception as exc:  # best effort: the login itself reports what is wrong
            log.info("user versions before the login of %s not read: %s", username, exc)
            return
        versions = found.get(username, {})
        # An HSM that did not answer (busy) is left to the login itself and reconciliation.
        if versions and (len(set(versions.values())) > 1 or len(versions) < len(answered)):
            log.warning("user %s differs across HSMs (versions %s): converging the user "
                        "records before logging in", username,
                        ", ".join(f"{h}={v}" for h, v in sorted(versions.items())))
            await self.converge(members)

    async def list_cluster(self) -> list[dict[str, Any]]:
        """`user list` for the CLI (no login, as CloudHSM CLI): each user's coverage across
        the reachable HSMs ("full", or "inconsistent" when an HSM lacks the user or holds
        another version of its record: `versions` maps HSM ids to them)."""
        members = _connected(self.pool.usable())
        per: dict[str, dict[str, Any]] = {}
        results = await asyncio.gather(
            *(self.pool.timed(m, client.list_users(None)) for m, client in members),
            return_exceptions=True)
        ok = 0
        for (m, _), r in zip(members, results):
            if isinstance(r, BaseException):
                continue
            ok += 1
            for u in r:
                e = per.setdefault(u.username, {"username": u.username, "role": u.role,
                                                "locked": set(), "hsms": 0, "versions": {}})
                e["locked"].add(u.locked)
                e["hsms"] += 1
                e["versions"][m.hsm_id] = u.version
        out = []
        for e in per.values():
            locked = e.pop("locked")
            e["locked"] = "inconsistent" if len(locked) > 1 else str(locked.pop()).lower()
            same = len(set(e["versions"].values())) == 1
            e["cluster-coverage"] = "full" if e.pop("hsms") == ok and same else "inconsistent"
            out.append(e)
        return sorted(out, key=lambda e: e["username"])
