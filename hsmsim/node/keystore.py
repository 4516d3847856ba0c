"""The node's keystore: SoftHSM2 objects, the object index and the map between cluster
handles and SoftHSM2 handles, kept consistent across crashes; plus the masking key.

Threads: every index write and every SoftHSM2 create/destroy runs on one store thread, in
the order pending -> SoftHSM2 -> committed; SoftHSM2 crypto runs on a small pool (SoftHSM2
is initialised with OS locking). The in-memory catalog and handle map are changed only on the
event loop thread, so lookups need no locks.

A creation runs to its end as its own task, whatever happens to the request that asked for it
(an executor job cannot be stopped half-way); if that request was cancelled (its connection
closed, e.g. the daemon died), the finished creation is destroyed again, so that nothing the
client was never told about survives (copies of objects another HSM holds are kept: see
create). Start-up recovery removes what no committed index row
names: 0-byte SoftHSM2 object files, token objects without a row, rows without an object.

A full disk is told apart from a broken HSM: creations that fail for want of space answer
CKR_DEVICE_MEMORY."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from hsmsim import files
from hsmsim.node import policy
from hsmsim.node.index import (COMMITTED, DELETING, PENDING, Catalog, IndexStore, ObjectRecord,
                               decode_record)
from hsmsim.node.masking import KEY_LEN, MaskingKey
from hsmsim.node.softhsm import SoftHsm, raw_template
from hsmsim.pkcs11.attributes import Template
from hsmsim.pkcs11.constants import RV, Attribute as A, KeyType, Mechanism as M, ObjectClass
from hsmsim.pkcs11.errors import Pkcs11Error
from hsmsim.pkcs11.params import MechanismSpec

log = logging.getLogger("hsmsim.node.keystore")
T = TypeVar("T")
MASKING_TAG = "hsmsim:masking-key"
TAG_PREFIX = "hsmsim:"
WRAP_PAD = MechanismSpec(M.AES_KEY_WRAP_PAD)


@dataclass(frozen=True)
class Quotas:
    max_keys: int
    max_asymmetric_keys: int


def tag(handle: int) -> str:
    return f"{TAG_PREFIX}{handle}"


class Keystore:
    def __init__(self, hsm: SoftHsm, index: IndexStore, crypto_threads: int, quotas: Quotas,
                 disk: Path | None = None) -> None:
        self.hsm = hsm
        self.disk = disk  # where the token and index live (to tell a full disk on failures)
        self.index = index
        self.quotas = quotas
        self.catalog = Catalog()
        self.soft: dict[int, int] = {}  # cluster handle -> SoftHSM2 handle
        self.reserved: set[int] = set()  # handles being created
        self.masking: MaskingKey | None = None
        self._masking_soft: int | None = None
        self._store = ThreadPoolExecutor(1, thread_name_prefix="node-store")
        self._crypto = ThreadPoolExecutor(max(1, crypto_threads), thread_name_prefix="node-hsm")
        self._jobs: set[asyncio.Task[Any]] = set()  # creations and their undoing, in flight

    # -- threads -----------------------------------------------------------------------------------

    async def in_store(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._store, fn, *args)

    async def in_hsm(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._crypto, fn, *args)

    async def drain(self) -> None:
        """Wait for creations in flight (and the undoing of cancelled ones) to finish: called
        on shutdown before the loop stops, so none is left half-done."""
        while self._jobs:
            await asyncio.gather(*list(self._jobs), return_exceptions=True)

    def _track(self, task: "asyncio.Task[Any]") -> None:
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)

    def close(self) -> None:
        self._store.shutdown(wait=True)
        self._crypto.shutdown(wait=True)
        if self.masking is not None:
            self.masking.close()
        self.index.close()

    # -- start-up ----------------------------------------------------------------------------------

    def recover(self) -> dict[str, int]:
        """Reconcile the index with the token (called once, before serving, on the store thread
        or the main thread). The only place SoftHSM2's C_FindObjects runs."""
        found: dict[str, int] = {}
        stray: list[int] = []
        for obj in self.hsm.find_objects([]):
            try:
                label = self.hsm.get_attribute(obj, A.LABEL)
            except Pkcs11Error as exc:  # a torn object file from a crash mid-creation
                log.warning("unreadable token object %d (%s); removing it", obj, exc)
                label = None
            text = label.decode(errors="replace") if label is not None else ""
            if text.startswith(TAG_PREFIX) and text not in found:
                found[text] = obj
            else:
                stray.append(obj)
        self._masking_soft = found.pop(MASKING_TAG) if MASKING_TAG in found else None
        if self._masking_soft is not None:
            raw = self.hsm.get_attribute(self._masking_soft, A.VALUE)
            if raw is None or len(raw) != KEY_LEN:
                raise Pkcs11Error(RV.DEVICE_ERROR, "masking key object is unreadable")
            self.masking = MaskingKey(raw)
        stats = {"committed": 0, "lost": 0, "pending_dropped": 0, "deleted": 0, "phantoms": 0}
        drop_rows: list[int] = []

        for handle, state, blob in list(self.index.rows()):
            soft = found.pop(tag(handle)) if tag(handle) in found else None
            if state == COMMITTED and soft is not None:
                self.catalog.add(decode_record(handle, blob))
                self.soft[handle] = soft
                stats["committed"] += 1
                continue
            if state == COMMITTED:
                log.error("index entry %d has no token object; dropping it", handle)
                stats["lost"] += 1
            elif state == PENDING:
                stats["pending_dropped"] += 1
            else:
                stats["deleted"] += 1
            if soft is not None:
                self.hsm.destroy_object(soft)
            drop_rows.append(handle)
        if drop_rows:
            self.index.delete(drop_rows)
        for obj in list(found.values()) + stray:
            self._destroy_soft_quiet(obj)
            stats["phantoms"] += 1
        return stats

    def generate_masking_key(self) -> None:
        """First node of a new cluster: a new AES-256 masking key in the token."""
        assert self._masking_soft is None
        t = {A.CLASS: ObjectClass.SECRET_KEY, A.KEY_TYPE: KeyType.AES, A.TOKEN: True,
             A.PRIVATE: True, A.LABEL: MASKING_TAG, A.VALUE_LEN: KEY_LEN,
             # Readable by the node itself (read once at start), never by anyone else.
             A.SENSITIVE: False, A.EXTRACTABLE: True, A.WRAP: True, A.UNWRAP: True,
             A.ENCRYPT: True, A.DECRYPT: True}
        soft = self.hsm.generate_key(MechanismSpec(M.AES_KEY_GEN), raw_template(t.items()))
        raw = self.hsm.get_attribute(soft, A.VALUE)
        assert raw is not None
        self._masking_soft = soft
        self.masking = MaskingKey(raw)

    def install_masking_key(self, key: bytes) -> None:
        """A cloned node: store the masking key received from another node."""
        if self._masking_soft is not None:
            raise Pkcs11Error(RV.ACTION_PROHIBITED, "this node already has a masking key")
        t = {A.CLASS: ObjectClass.SECRET_KEY, A.KEY_TYPE: KeyType.AES, A.TOKEN: True,
             A.PRIVATE: True, A.LABEL: MASKING_TAG, A.VALUE: key, A.SENSITIVE: False,
             A.EXTRACTABLE: True, A.WRAP: True, A.UNWRAP: True, A.ENCRYPT: True,
             A.DECRYPT: True}
        self._masking_soft = self.hsm.create_object(raw_template(t.items()))
        self.masking = MaskingKey(key)

    def require_masking(self) -> tuple[MaskingKey, int]:
        if self.masking is None or self._masking_soft is None:
            raise Pkcs11Error(RV.DEVICE_ERROR, "this HSM has no masking key yet (clone pending)")
        return self.masking, self._masking_soft

    # -- lookups (event loop) ----------------------------------------------------------------------

    def get(self, handle: int) -> ObjectRecord | None:
        return self.catalog.get(handle)

    def soft_handle(self, handle: int) -> int:
        soft = self.soft.get(handle)
        if soft is None:
            raise Pkcs11Error(RV.OBJECT_HANDLE_INVALID, "object does not exist")
        return soft

    # -- creation ----------------------------------------------------------------------------------

    def reserve(self, records: Sequence[ObjectRecord], replacing: bool = False) -> None:
        """Check handles and quotas for new records and reserve their handles (event loop)."""
        handles = [r.handle for r in records]
        for h in handles:
            if not isinstance(h, int) or isinstance(h, bool) or not 0 < h < (1 << 63):
                raise Pkcs11Error(RV.ARGUMENTS_BAD, "handles are integers 1..2^63-1")
        if len(set(handles)) != len(handles):
            raise Pkcs11Error(RV.ARGUMENTS_BAD, "the new objects need distinct handles")
        for h in handles:
            if h in self.reserved or (h in self.catalog and not replacing):
                raise Pkcs11Error(RV.TEMPLATE_INCONSISTENT, f"handle {h} is already in use")
        # FIDELITY: CloudHSM's return value for a full HSM is not documented; quotas here are
        # per node (CloudHSM states them per cluster) and answer CKR_DEVICE_MEMORY.
        fresh = [r for r in records if not (replacing and r.handle in self.catalog)]
        keys = sum(1 for r in fresh if r.is_key)
        asym = sum(1 for r in fresh if r.asymmetric)
        if self.catalog.keys + keys > self.quotas.max_keys:
            raise Pkcs11Error(RV.DEVICE_MEMORY,
                              f"key quota reached ({self.quotas.max_keys} keys per HSM)")
        if self.catalog.asymmetric + asym > self.quotas.max_asymmetric_keys:
            raise Pkcs11Error(RV.DEVICE_MEMORY, "asymmetric key quota reached "
                              f"({self.quotas.max_asymmetric_keys} per HSM)")
        self.reserved.update(handles)

    async def create(self, records: Sequence[ObjectRecord],
                     make: Callable[[], Sequence[int]],
                     public_of: Callable[[int, ObjectRecord], Template] | None = None,
                     replacing: bool = False, copy: bool = False) -> list[ObjectRecord]:
        """Create objects: reserve, then on the store thread write pending index rows (token
        objects), let `make` create the SoftHSM2 objects, read their public material, commit.
        Returns the final records (with material-derived public attributes).

        The work runs as its own task: cancelling the caller does not stop it half-way (its
        executor jobs would run on regardless). A cancelled creation is undone once it has
        finished, except a copy of an object another HSM holds (`copy`: a key-sync or
        reconciliation import, which may be of a key already acknowledged; a daemon that
        restarts meanwhile is told "already in use" by the copy in flight and counts this HSM
        as a holder) or a replacement, which are kept: what the cluster abandoned it
        tombstones, and reconciliation destroys it."""
        self.reserve(records, replacing)
        job = asyncio.get_running_loop().create_task(
            self._create_job(list(records), make))
        self._track(job)
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            if not (replacing or copy):
                self._track(asyncio.get_running_loop().create_task(self._undo(job)))
            raise

    async def _undo(self, job: "asyncio.Task[list[ObjectRecord]]") -> None:
        try:
            finals = await job
        except BaseException:
            return  # a failed creation has removed what it made
        log.info("creation of %s was cancelled by its caller; destroying it again",
                 [r.handle for r in finals])
        await self.destroy([r.handle for r in finals])

    async def _create_job(self, records: list[ObjectRecord], make: Callable[[], Sequence[int]]
                          ) -> list[ObjectRecord]:
        try:
            finals, softs = await self._create_phases(records, make)
        finally:
            self.reserved.difference_update(r.handle for r in records)
        for r, s in zip(finals, softs):
            old = self.soft.get(r.handle)
            self.catalog.add(r)
            self.soft[r.handle] = s
            if old is not None and old != s:
                await self.in_hsm(self._destroy_soft_quiet, old)
        return finals

    async def _create_phases(self, records: list[ObjectRecord], make: Callable[[], Sequence[int]]
                             ) -> tuple[list[ObjectRecord], list[int]]:
        """pending rows (store thread) -> SoftHSM2 objects (a worker thread, so that several
        creations overlap their file I/O) -> committed rows (store thread). A crash between
        the phases leaves pending rows, which start-up recovery resolves."""
        token = [r for r in records if r.token]
        if token:
            await self.in_store(self.index.put_many, token, PENDING)
        try:
            finals, softs = await self.in_hsm(self._make_sync, records, make)
        except BaseException:
            if token:
                try:
                    await self.in_store(self.index.delete, [r.handle for r in token])
                except Pkcs11Error:  # no space even to delete: start-up drops pending rows
                    log.warning("could not remove pending index rows %s",
                                [r.handle for r in token])
            raise
        try:
            if token:
                await self.in_store(self.index.put_many, [f for f in finals if f.token], COMMITTED)
        except BaseException:
            for s in softs:
                await self.in_hsm(self._destroy_soft_quiet, s)
            raise
        return finals, softs

    def _make_sync(self, records: list[ObjectRecord], make: Callable[[], Sequence[int]]
                   ) -> tuple[list[ObjectRecord], list[int]]:
        softs: list[int] = []
        try:
            softs = list(make())
            return [self._with_public(r, s) for r, s in zip(records, softs)], softs
        except BaseException as exc:
            for s in softs:
                self._destroy_soft_quiet(s)
            if (isinstance(exc, Pkcs11Error) and exc.rv != RV.DEVICE_MEMORY
                    and self.disk is not None and files.no_space(self.disk)):
                # SoftHSM2 answers a failed object-file write with a generic error; the disk
                # says why. FIDELITY: CloudHSM's answer for a full HSM is not documented; a
                # full disk is CKR_DEVICE_MEMORY, as the per-HSM key quota.
                raise Pkcs11Error(RV.DEVICE_MEMORY, "the HSM has no space left for objects "
                                  "(its disk is full)") from None
            raise

    def _with_public(self, r: ObjectRecord, soft: int) -> ObjectRecord:
        """Copy public material (modulus, EC point...) from SoftHSM2 into the record, and a
        secret key's CKA_CHECK_VALUE (policy.check_value_given)."""
        names = policy.PUBLIC_MATERIAL.get((r.cls, r.key_type), ())  # type: ignore[arg-type]
        extra: Template = {}
        if r.cls == ObjectClass.SECRET_KEY:
            # SoftHSM2 computes the check value when it creates or generates a key (PKCS#11
            # 2.40: AES and DES3 the first 3 bytes of the ECB encryption of a zero block,
            # generic secret of its SHA-1); it is read here, on the node holding the key. A
            # value the template gave (kept in r.attrs) must be empty or equal it. A copy made
            # by a masked unwrap carries its source's value.
            kcv = self.hsm.get_attribute(soft, A.CHECK_VALUE)
            given = r.attrs.get(A.CHECK_VALUE)
            if given is None:
                if kcv:
                    extra[A.CHECK_VALUE] = kcv
            elif given and kcv and given != kcv:
                raise Pkcs11Error(RV.ATTRIBUTE_VALUE_INVALID,
                                  "CKA_CHECK_VALUE does not match the key")
        for a in names:
            raw = self.hsm.get_attribute(soft, a)
            if raw is not None:
                extra[a] = int.from_bytes(raw, "little") if a in policy.ULONG_MATERIAL else raw
        if A.MODULUS in extra and r.key_type == KeyType.RSA:
            extra[A.MODULUS_BITS] = int.from_bytes(extra[A.MODULUS], "big").bit_length()  # type: ignore[arg-type]
        if not extra:
            return r
        attrs = dict(r.attrs)
        attrs.update(extra)
        return ObjectRecord(r.handle, attrs, r.owner, r.shared, r.session, r.login_id, r.version)

    def _destroy_soft_quiet(self, soft: int) -> None:
        try:
            self.hsm.destroy_object(soft)
        except Pkcs11Error:
            log.warning("could not destroy SoftHSM2 object %d", soft)

    # -- changes -----------------------------------------------------------------------------------

    async def update(self, record: ObjectRecord) -> None:
        """Persist changed attributes/owner/sharing (no change to the SoftHSM2 object)."""
        if record.token:
            await self.in_store(self.index.put, record, COMMITTED)
        self.catalog.add(record)

    async def destroy(self, handles: Sequence[int]) -> list[ObjectRecord]:
        """deleting rows (store thread) -> SoftHSM2 destroy (worker) -> rows removed."""
        records = [r for r in (self.catalog.get(h) for h in handles) if r is not None]
        softs = [s for s in (self.soft.get(r.handle) for r in records) if s is not None]
        for r in records:
            self.catalog.remove(r.handle)
            self.soft.pop(r.handle, None)
        token = [r.handle for r in records if r.token]
        if token:
            await self.in_store(self.index.set_state, token, DELETING)
        for s in softs:
            await self.in_hsm(self._destroy_soft_quiet, s)
        if token:
            await self.in_store(self.index.delete, token)
        return records

    # -- material ----------------------------------------------------------------------------------

    def material_sync(self, soft: int, value_len: int | None) -> bytes:
        """Plain key material: wrapped in SoftHSM2 under the masking key, unwrapped in this
        process (never read as an attribute). value_len: a secret key's length; None for a
        private key (PKCS#8 DER)."""
        masking, masking_soft = self.require_masking()
        return masking.unwrap(self.hsm.wrap_key(WRAP_PAD, masking_soft, soft), value_len)

    def wrap_masked_sync(self, soft: int, value_len: int | None) -> bytes:
        """The object's material as an RFC 5649 blob under the masking key.
        FIDELITY-internal: SoftHSM 2.6.1's CKM_AES_KEY_WRAP_PAD zero-pads before wrapping, so
        the node re-wraps the (correctly trimmed) material itself."""
        masking, _ = self.require_masking()
        return masking.wrap(self.material_sync(soft, value_len))

    async def material(self, record: ObjectRecord) -> bytes:
        return await self.in_hsm(self.material_sync, self.soft_handle(record.handle),
                                 value_len(record))

    def unwrap_masked_sync(self, wrapped: bytes, template: Template) -> int:
        _, masking_soft = self.require_masking()
        return self.hsm.unwrap_key(WRAP_PAD, masking_soft, wrapped, raw_template(template.items()))


def value_len(record: ObjectRecord) -> int | None:
    """The material length of a secret key (None: DER-encoded private key)."""
    if record.cls == ObjectClass.SECRET_KEY:
        if record.key_type == KeyType.DES3:
            return policy.DES3_SIZE  # DES3 keys have no CKA_VALUE_LEN (policy.value_len_attr)
        n = record.attrs.get(A.VALUE_LEN)
        if not isinstance(n, int):
            raise Pkcs11Error(RV.GENERAL_ERROR, "secret key without CKA_VALUE_LEN in the index")
        return n
    return None


def ensure_dir(path: Path) -> Path:
    return files.make_dir(path)


def remove_debris(tokens: Path) -> int:
    """Before SoftHSM2 opens the token (never while it runs): remove object files a kill left
    empty (SoftHSM2 creates `<uuid>.object` and `<uuid>.lock`, then writes the object; an
    empty object file is never a valid object and SoftHSM2 skips it for ever) and lock files
    whose object file is gone. The token's own files (token.object, token.lock, generation)
    are kept. Returns the number of files removed."""
    removed = 0
    if not tokens.is_dir():
        return 0
    for tdir in (p for p in tokens.iterdir() if p.is_dir()):
        for obj in tdir.glob("*.object"):
            if obj.name == "token.object":
                continue
            try:
                if obj.stat().st_size == 0:
                    obj.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
        for lock in tdir.glob("*.lock"):
            if lock.name == "token.lock" or lock.with_suffix(".object").exists():
                continue
            try:
                lock.unlink()
                removed += 1
            except FileNotFoundError:
                pass
    if removed:
        log.warning("removed %d empty or orphaned SoftHSM2 object files (a crash mid-write)",
                    removed)
        for tdir in (p for p in tokens.iterdir() if p.is_dir()):
            fd = os.open(tdir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    return removed
