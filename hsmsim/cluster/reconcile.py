"""Reconciliation: the object directory rebuilt from the HSMs' inventories at daemon start,
and a member that returns (restarted, reconnected, added) brought in line with the cluster:
its masking key if cloning was cut short, users, tombstones, and masked copies of the token
objects it lacks or holds in another version."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from hsmsim.cluster.cluster import Cluster
from hsmsim.cluster.members import Member, MemberDown
from hsmsim.errors import HsmsimError
from hsmsim.node.client import NodeUnavailable
from hsmsim.pkcs11.constants import RV, UserType
from hsmsim.pkcs11.errors import Pkcs11Error

log = logging.getLogger("hsmsim.cluster")

ProgressFn = Callable[[int, int, str], Awaitable[None]]


class Reconciler:
    def __init__(self, cluster: Cluster) -> None:
        self.c = cluster
        self._running: set[str] = set()  # HSMs being reconciled now
        self.last_converged: float | None = None

    def reconciling(self) -> bool:
        """Whether any member is being reconciled now."""
        return bool(self._running)

    async def clone_into(self, source: Member, target: Member) -> None:
        """Masking key transfer (wrapped to the target's ephemeral key), then users."""
        if source.client is None or target.client is None:
            raise MemberDown(f"cannot clone {target.hsm_id} from {source.hsm_id}: one is down")
        offer = await target.client.clone_offer()
        blob = await source.client.clone_export(offer)
        await target.client.clone_accept(blob)
        users = await source.client.export_users()
        await target.client.import_users(users)

    async def rebuild_directory(self) -> None:
        """The object directory from every reachable member's inventory (daemon start)."""
        c = self.c
        invs = await self._inventories(c.usable())
        top = c.directory.rebuild(invs)
        if top:
            c.handles.bump_past(top)

    async def _inventories(self, members: list[Member]) -> dict[str, dict[int, bytes]]:
        out: dict[str, dict[int, bytes]] = {}

        async def one(m: Member) -> None:
            try:
                inv = await self.c.pool.timed(m, m.connection().inventory(), timeout=30.0)
                out[m.hsm_id] = {e.handle: e.fingerprint for e in inv}
            except (NodeUnavailable, Pkcs11Error) as exc:
                log.info("inventory of %s failed: %s", m.hsm_id, exc)
        await asyncio.gather(*(one(m) for m in members))
        return out

    async def reconcile_all(self) -> None:
        await asyncio.gather(*(self.reconcile(m) for m in self.c.usable() if not m.converged))

    async def reconcile(self, m: Member, progress: ProgressFn | None = None) -> None:
        """Bring `m` in line with the cluster: users, tombstones, missing or different token
        objects (masked copies from a member that holds the reference version)."""
        if m.hsm_id in self._running:
            return
        self._running.add(m.hsm_id)
        try:
            await self._reconcile(m, progress)
        finally:
            self._running.discard(m.hsm_id)

    async def _reconcile(self, m: Member, progress: ProgressFn | None) -> None:
        c = self.c
        pool, directory = c.pool, c.directory
        gen = m.generation
        refs = [x for x in c.usable() if x is not m and x.converged] or \
               [x for x in c.usable() if x is not m]
        # A node whose cloning was interrupted has no masking key yet: clone it first.
        try:
            st = await pool.timed(m, m.connection().status())
            if not st.has_masking_key:
                if not refs:
                    return
                await self.clone_into(refs[0], m)
        except (NodeUnavailable, Pkcs11Error, MemberDown) as exc:
            log.info("%s: masking key check/clone failed: %s", m.hsm_id, exc)
            return
        invs = await self._inventories([m] + refs)
        mine = invs.get(m.hsm_id)
        if mine is None or m.generation != gen:
            return
        # users: converged both ways, as keys are: `m` may hold a newer record than the
        # others (e.g. a password changed while it was the only HSM up), or an older one.
        if refs and not await c.usersync.converge([m] + refs):
            log.info("user sync of %s failed; it is retried", m.hsm_id)
            return
        await self._apply_user_tombstones(m)
        # objects the member holds that the cluster does not know (e.g. the daemon died
        # between creation and its record): adopt them, the others get copies.
        for h in mine:
            if directory.adopt(h, m.hsm_id):
                c.handles.bump_past(h)
        # tombstones
        for h in [h for h in mine if directory.is_tombstoned(h)]:
            try:
                await pool.timed(m, m.connection().destroy_object(None, h))
            except Pkcs11Error as exc:
                if exc.rv not in (RV.OBJECT_HANDLE_INVALID, RV.KEY_HANDLE_INVALID):
                    raise
            mine.pop(h, None)
        # missing or different objects
        work: list[tuple[int, Member, bool]] = []
        for h in sorted(directory.live_tokens()):
            ref_fps = {invs[r.hsm_id][h] for r in refs if r.hsm_id in invs and h in invs[r.hsm_id]}
            holders = [r for r in refs if r.hsm_id in invs and h in invs[r.hsm_id]]
            if h in mine:
                directory.add_holder(h, m.hsm_id)
                if holders and mine[h] not in ref_fps:
                    work.append((h, holders[0], True))
            elif holders:
                work.append((h, holders[0], False))
            else:
                directory.discard_holder(h, m.hsm_id)
        total = len(work)
        done = 0
        if progress is not None:
            await progress(0, total, f"syncing {m.hsm_id}")
        sem = asyncio.Semaphore(16)

        async def copy(h: int, src: Member, replace: bool) -> None:
            nonlocal done
            async with sem:
                blob = await pool.timed(src, src.connection().export_masked(h))
                if directory.is_tombstoned(h):
                    return
                await c.keysync.import_blob(m, h, blob, replace=replace)
                done += 1
                if progress is not None and (done % 10 == 0 or done == total):
                    await progress(done, total, f"syncing {m.hsm_id}")

        results = await asyncio.gather(*(copy(*w) for w in work), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            log.info("reconciliation of %s: %d copies failed (%s)", m.hsm_id, len(failed),
                     failed[0])
            return
        if m.generation == gen and m.usable:
            # users are in sync now: refusals may be stale
            m.login_refused.clear()
            m.login_retried.clear()
            await c.logins.prelogin(m)
            if not m.converged:
                log.info("%s converged (%d objects copied)", m.hsm_id, total)
            m.converged = True
            m.last_error = None if m.last_error and "exited" not in m.last_error else m.last_error
            c.converge_events += 1
            if all(x.converged for x in c.members.values() if not x.killed):
                self.last_converged = time.monotonic()

    async def _apply_user_tombstones(self, m: Member) -> None:
        """Users deleted while this member was away: delete them here too, as the admin
        (user records merge by version, so an import alone cannot remove a user)."""
        c = self.c
        pool = c.pool
        client = m.client
        if not c.journal.user_tombstones or client is None:
            return
        try:
            present = {u.username for u in await pool.timed(m, client.list_users(None))}
        except (NodeUnavailable, Pkcs11Error):
            return
        doomed = sorted(present & c.journal.user_tombstones)
        if not doomed:
            return
        try:
            info = await pool.timed(m, client.login(UserType.SO, "admin", c.state.read_secret(
                c.state.admin_password)))
        except (HsmsimError, NodeUnavailable) as exc:
            log.info("cannot remove deleted users %s from %s: %s", doomed, m.hsm_id, exc)
            return
        try:
            for name in doomed:
                try:
                    await pool.timed(m, client.delete_user(info.login_id, name))
                except Pkcs11Error as exc:
                    log.info("deleting user %s on %s: %s", name, m.hsm_id, exc)
        finally:
            try:
                await pool.timed(m, client.logout(info.login_id))
            except (NodeUnavailable, Pkcs11Error):
                pass
