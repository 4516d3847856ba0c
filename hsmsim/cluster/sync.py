"""Key sync: a new token object is copied, masked, from the HSM that made it to the others;
creation is acknowledged once the key availability check is met (the remaining copies finish
in the background), and a creation that cannot meet it is undone everywhere."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from hsmsim.cluster.directory import Directory
from hsmsim.cluster.members import Member
from hsmsim.cluster.pool import Pool
from hsmsim.cluster.routing import AVAILABILITY_MSG
from hsmsim.node.client import NodeUnavailable
from hsmsim.pkcs11.constants import RV
from hsmsim.pkcs11.errors import Pkcs11Error

log = logging.getLogger("hsmsim.cluster")

BACKGROUND_BUSY = 2  # requests in flight above which background key-sync copies wait
BACKGROUND_MAX_WAIT_S = 5.0  # ...but never longer than this


class KeySync:
    def __init__(self, pool: Pool, directory: Directory) -> None:
        self.pool, self.directory = pool, directory

    def quorum_needed(self) -> int:
        """Other HSMs that must hold a new token object before it is acknowledged."""
        if not self.pool.check_availability or len(self.pool.members) < 2:
            return 0
        return 1

    async def replicate_new(self, source: Member, handles: list[int]) -> None:
        """Copy new token objects from `source` to every other usable member as masked blobs;
        return once the key availability check is met (the rest finish in the background)."""
        pool = self.pool
        need = self.quorum_needed()
        try:
            client = source.connection()
            blobs = await pool.timed(source, asyncio.gather(
                *(client.export_masked(h) for h in handles)))
        except (NodeUnavailable, Pkcs11Error) as exc:
            if isinstance(exc, NodeUnavailable):
                source.mark_down(str(exc))
            if need == 0:
                return  # reconciliation copies them when the HSM is back
            self.abandon(handles)
            raise Pkcs11Error(RV.FUNCTION_FAILED,
                              AVAILABILITY_MSG.format(handle=handles[0])) from None
        targets = sorted((m for m in pool.usable() if m is not source), key=lambda x: x.inflight)
        if len(targets) < need:
            self.abandon(handles)
            raise Pkcs11Error(RV.FUNCTION_FAILED, AVAILABILITY_MSG.format(handle=handles[0]))

        async def copy_to(m: Member) -> bool:
            try:
                for h, blob in zip(handles, blobs):
                    await self.import_blob(m, h, blob)
                return True
            except Exception as exc:
                log.info("sync of %s to %s failed: %s", handles, m.hsm_id, exc)
                return False

        # FIDELITY: copies beyond the availability check are asynchronous, as CloudHSM's
        # client-side sync; under load they may lag the acknowledgement by up to
        # BACKGROUND_MAX_WAIT_S (reconciliation and anti-entropy catch any that fail).
        async def background(m: Member) -> None:
            # Copies beyond the availability check queue behind a small per-HSM window so
            # that they do not crowd out the application's own requests.
            try:
                async with m.sync_window:
                    # Yield to the application's requests while the HSM is busy, for a
                    # bounded time: the availability check is already met.
                    deadline = time.monotonic() + BACKGROUND_MAX_WAIT_S
                    while m.usable and m.inflight > BACKGROUND_BUSY and time.monotonic() < deadline:
                        await asyncio.sleep(0.01)
                    if m.usable:
                        await copy_to(m)
            finally:
                m.pending_sync -= 1

        # The copies the check waits for go to the least busy HSMs, one at a time until met.
        ok = 0
        rest = list(targets)
        while ok < need and rest:
            m = rest.pop(0)
            if await copy_to(m):
                ok += 1
        for m in rest:
            m.pending_sync += 1  # now, not when the task starts: searches avoid this HSM
            pool.spawn_bg(background(m), "key sync")
        if ok < need:
            self.abandon(handles)
            raise Pkcs11Error(RV.FUNCTION_FAILED, AVAILABILITY_MSG.format(handle=handles[0]))

    async def import_blob(self, m: Member, handle: int, blob: bytes, replace: bool = False) -> None:
        """One masked copy onto `m`, recorded as held there once it is in (a copy of an
        object deleted meanwhile is destroyed again)."""
        client = m.client
        if client is None or not m.usable:
            raise NodeUnavailable(f"{m.hsm_id} is not usable")
        gen = m.generation
        try:
            await self.pool.timed(m, client.import_masked(blob, replace=replace))
        except NodeUnavailable as exc:
            m.mark_down(str(exc))
            raise
        except Pkcs11Error as exc:
            if exc.rv != RV.TEMPLATE_INCONSISTENT:
                raise
            # Already there: a key-sync copy and a reconciliation copy raced. The copies come
            # from the same masked object; reconciliation compares fingerprints anyway.
        if self.directory.is_tombstoned(handle):
            self.pool.spawn_bg(self.pool.quiet(client.destroy_object(None, handle)))
        elif m.generation == gen:
            self.directory.add_holder(handle, m.hsm_id)

    def abandon(self, handles: Iterable[int]) -> None:
        """A creation that cannot be acknowledged: tombstone it everywhere (SDK 3 did this)."""
        for h, obj in self.directory.tombstone(*handles):
            for hid in obj.holders:
                m = self.pool.members.get(hid)
                if m is not None and m.usable and m.client is not None:
                    self.pool.spawn_bg(self.pool.quiet(m.client.destroy_object(None, h)))

    async def destroy_replica(self, m: Member, handle: int) -> None:
        try:
            await self.pool.timed(m, m.connection().destroy_object(None, handle))
        except Pkcs11Error as exc:
            if exc.rv not in (RV.OBJECT_HANDLE_INVALID, RV.KEY_HANDLE_INVALID):
                raise
