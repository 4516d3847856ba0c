"""The node's object index: every object's user-visible attributes, owner and sharing,
persisted in SQLite beside the token (crash-consistent with it through pending/deleting
states), and searched in memory so that SoftHSM2's linear C_FindObjects is never on a hot path.

Rows: handle, state ('pending' | 'committed' | 'deleting'), and a msgpack record. Only token
objects are persisted; session objects live in memory only. The persistent half is used from
one thread (the node's store thread).

A write that fails for want of disk space raises CKR_DEVICE_MEMORY (the caller's transaction
is rolled back by SQLite), so a full disk is never mistaken for a broken HSM."""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import msgpack

from hsmsim import files
from hsmsim.pkcs11.attributes import AttrValue, Template
from hsmsim.pkcs11.constants import RV, Attribute as A, ObjectClass
from hsmsim.pkcs11.errors import Pkcs11Error

PENDING, COMMITTED, DELETING = "pending", "committed", "deleting"
F = TypeVar("F", bound=Callable[..., Any])


def _space_checked(fn: F) -> F:
    """SQLITE_FULL (or an I/O error on a full disk) -> CKR_DEVICE_MEMORY."""
    @functools.wraps(fn)
    def wrapper(self: "IndexStore", *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except sqlite3.Error as exc:
            if files.is_no_space(exc, self.path.parent):
                raise Pkcs11Error(RV.DEVICE_MEMORY, "the HSM has no space left for objects "
                                  "(its disk is full)") from None
            raise
    return wrapper  # type: ignore[return-value]


@dataclass(frozen=True)
class ObjectRecord:
    """One object as the node knows it. `attrs` is never mutated (replace the record)."""

    handle: int
    attrs: Template
    owner: str
    shared: frozenset[str] = frozenset()
    session: int = 0  # owning session number for session objects; 0 for token objects
    login_id: int = 0  # creating login (session objects: visibility), 0 for token objects
    version: int = 1  # bumped on every change; part of the inventory fingerprint

    @property
    def cls(self) -> int:
        return int(self.attrs[A.CLASS])  # type: ignore[arg-type]

    @property
    def key_type(self) -> int | None:
        kt = self.attrs.get(A.KEY_TYPE)
        return int(kt) if isinstance(kt, int) else None

    @property
    def token(self) -> bool:
        return bool(self.attrs.get(A.TOKEN, False))

    @property
    def asymmetric(self) -> bool:
        return self.cls in (ObjectClass.PUBLIC_KEY, ObjectClass.PRIVATE_KEY)

    @property
    def is_key(self) -> bool:
        return self.cls in (ObjectClass.PUBLIC_KEY, ObjectClass.PRIVATE_KEY,
                            ObjectClass.SECRET_KEY)

    def flag(self, a: int) -> bool:
        return bool(self.attrs.get(a, False))

    def with_attrs(self, changes: Template) -> "ObjectRecord":
        attrs = dict(self.attrs)
        attrs.update(changes)
        return replace(self, attrs=attrs, version=self.version + 1)


def encode_record(r: ObjectRecord) -> bytes:
    return bytes(msgpack.packb({"attrs": {int(k): r.attrs[k] for k in sorted(r.attrs)}, "owner": r.owner,
                          "shared": sorted(r.shared), "version": r.version},
                               use_bin_type=True))


def decode_record(handle: int, raw: bytes) -> ObjectRecord:
    d = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    return ObjectRecord(handle, dict(d["attrs"]), d["owner"], frozenset(d["shared"]),
                        version=int(d["version"]))


class IndexStore:
    """The SQLite half: WAL journal (a kill -9 loses no committed transaction)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        files.touch_private(path)  # 0600 whatever the umask (SQLite copies it to -wal, -shm)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS objects (handle INTEGER PRIMARY KEY, "
                         "state TEXT NOT NULL, record BLOB NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB)")

    def rows(self) -> Iterator[tuple[int, str, bytes]]:
        yield from self._db.execute("SELECT handle, state, record FROM objects")

    @_space_checked
    def put(self, record: ObjectRecord, state: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO objects VALUES (?, ?, ?)",
                         (record.handle, state, encode_record(record)))

    @_space_checked
    def put_many(self, records: Iterable[ObjectRecord], state: str) -> None:
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO objects VALUES (?, ?, ?)",
                                 [(r.handle, state, encode_record(r)) for r in records])

    @_space_checked
    def set_state(self, handles: Iterable[int], state: str) -> None:
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("UPDATE objects SET state = ? WHERE handle = ?",
                                 [(state, h) for h in handles])

    @_space_checked
    def delete(self, handles: Iterable[int]) -> None:
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("DELETE FROM objects WHERE handle = ?", [(h,) for h in handles])

    def get_meta(self, key: str) -> bytes | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return bytes(row[0]) if row else None

    @_space_checked
    def set_meta(self, key: str, value: bytes) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def close(self) -> None:
        self._db.close()


def _discard(table: dict[Any, set[int]], key: Any, handle: int) -> None:
    bucket = table.get(key)
    if bucket is not None:
        bucket.discard(handle)
        if not bucket:
            del table[key]


def _hashable(v: AttrValue) -> Any:
    return tuple(v) if isinstance(v, list) else v


@dataclass
class Catalog:
    """The in-memory half: records by handle, plus label/id/class indexes for find."""

    records: dict[int, ObjectRecord] = field(default_factory=dict)
    by_label: dict[str, set[int]] = field(default_factory=dict)
    by_id: dict[bytes, set[int]] = field(default_factory=dict)
    by_class: dict[int, set[int]] = field(default_factory=dict)
    keys: int = 0
    asymmetric: int = 0

    def __contains__(self, handle: int) -> bool:
        return handle in self.records

    def get(self, handle: int) -> ObjectRecord | None:
        return self.records.get(handle)

    def add(self, r: ObjectRecord) -> None:
        if r.handle in self.records:
            self.remove(r.handle)
        self.records[r.handle] = r
        label = r.attrs.get(A.LABEL)
        if isinstance(label, str):
            self.by_label.setdefault(label, set()).add(r.handle)
        oid = r.attrs.get(A.ID)
        if isinstance(oid, bytes):
            self.by_id.setdefault(oid, set()).add(r.handle)
        self.by_class.setdefault(r.cls, set()).add(r.handle)
        if r.is_key:
            self.keys += 1
        if r.asymmetric:
            self.asymmetric += 1

    def remove(self, handle: int) -> ObjectRecord | None:
        r = self.records.pop(handle, None)
        if r is None:
            return None
        label, oid = r.attrs.get(A.LABEL), r.attrs.get(A.ID)
        if isinstance(label, str):
            _discard(self.by_label, label, handle)
        if isinstance(oid, bytes):
            _discard(self.by_id, oid, handle)
        _discard(self.by_class, r.cls, handle)
        if r.is_key:
            self.keys -= 1
        if r.asymmetric:
            self.asymmetric -= 1
        return r

    def candidates(self, template: Template) -> Iterable[int]:
        """Handles that may match: the smallest indexed bucket the template names."""
        buckets: list[set[int]] = []
        label = template.get(A.LABEL)
        if isinstance(label, str):
            buckets.append(self.by_label.get(label, set()))
        oid = template.get(A.ID)
        if isinstance(oid, bytes):
            buckets.append(self.by_id.get(oid, set()))
        cls = template.get(A.CLASS)
        if isinstance(cls, int) and not isinstance(cls, bool):
            buckets.append(self.by_class.get(cls, set()))
        if not buckets:
            return list(self.records)
        smallest: set[int] = min(buckets, key=len)
        return sorted(smallest)

    def find(self, template: Template) -> list[int]:
        """Handles whose attributes equal every template entry (before access filtering)."""
        out = []
        want = [(a, _hashable(v)) for a, v in template.items()]
        for h in self.candidates(template):
            r = self.records.get(h)
            if r is None:
                continue
            if all(a in r.attrs and _hashable(r.attrs[a]) == v for a, v in want):
                out.append(h)
        return out
