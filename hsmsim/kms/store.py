"""The KMS's durable state in SQLite (WAL): keys, key material (sealed), aliases, grants,
custom key stores and settings such as the clock offset. Every mutation is committed before
the operation is acknowledged, so a kill -9 loses nothing that was answered; the writes of one
KMS request are held in a `Unit` and committed together with its audit record, or not at all. Keys, aliases and
stores are also cached in memory (the daemon is the only writer)."""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from pathlib import Path
from typing import Any, TypeVar

from hsmsim.errors import HsmsimError
from hsmsim.kms.model import AliasRecord, GrantRecord, KeyRecord, MaterialRecord, StoreRecord

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (key_id TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS materials (material_id TEXT PRIMARY KEY, key_id TEXT NOT NULL,
    seq INTEGER NOT NULL, data TEXT NOT NULL, sealed BLOB NOT NULL, public BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS materials_key ON materials(key_id, seq);
CREATE TABLE IF NOT EXISTS aliases (name TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS grants (grant_id TEXT PRIMARY KEY, key_id TEXT NOT NULL, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS grants_key ON grants(key_id);
CREATE TABLE IF NOT EXISTS stores (store_id TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS last_usage (key_id TEXT PRIMARY KEY, data TEXT NOT NULL);
"""


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def _load(cls: type[T], data: str) -> T:
    raw = json.loads(data)
    return cls(**{k: _tuples(v) for k, v in raw.items()})


def _dump(record: Any, skip: tuple[str, ...] = ()) -> str:
    d = {k: v for k, v in dataclasses.asdict(record).items() if k not in skip}
    return json.dumps(d, separators=(",", ":"))


class StoreError(HsmsimError):
    """The KMS database cannot be opened or read; the message names the file."""


class Unit:
    """The writes of one KMS request (or one `transaction()` block), held back until
    `Store.commit` runs them as one SQLite transaction. The in-memory caches change only after
    the commit, so a request that fails changes nothing and no other request sees half of one."""

    __slots__ = ("writes", "effects", "open", "_token")

    def __init__(self) -> None:
        self.writes: list[tuple[str, Any, bool]] = []
        self.effects: list[Callable[[], object]] = []
        self.open = True
        self._token: Token[Unit | None] | None = None


# The unit of the running request. A task started during a request (a custom key store's
# connection) inherits it, but writes directly once the request has ended (`open` is False).
_UNIT: ContextVar[Unit | None] = ContextVar("hsmsim_kms_unit", default=None)


class Store:
    """One KMS database file, `<state>/kms/kms.sqlite3` (0600)."""

    def __init__(self, path: Path) -> None:
        try:
            self._open(path)
        except (sqlite3.Error, OSError, ValueError, TypeError) as exc:
            raise StoreError(f"the KMS store {path} cannot be opened: {exc}") from None

    def _open(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        new = not path.exists()
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        if new:
            os.chmod(path, 0o600)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # survives process kill; fsync at checkpoints
        self._db.executescript(_SCHEMA)
        self.keys: dict[str, KeyRecord] = {
            k: _load(KeyRecord, d) for k, d in self._db.execute("SELECT key_id, data FROM keys")}
        self.aliases: dict[str, AliasRecord] = {
            n: _load(AliasRecord, d) for n, d in self._db.execute("SELECT name, data FROM aliases")}
        self.stores: dict[str, StoreRecord] = {
            s: _load(StoreRecord, d) for s, d in self._db.execute("SELECT store_id, data FROM stores")}

    def close(self) -> None:
        self._db.close()

    # -- all-or-nothing writes -----------------------------------------------------------------
    def begin(self) -> Unit:
        """Starts holding back this context's writes (one KMS request); end with `commit` or
        `discard`, in the same task."""
        unit = Unit()
        unit._token = _UNIT.set(unit)
        return unit

    def _close(self, unit: Unit) -> None:
        unit.open = False
        if unit._token is not None:
            _UNIT.reset(unit._token)
            unit._token = None

    def discard(self, unit: Unit) -> None:
        """Drops the unit's writes: nothing of them reaches the database or the caches."""
        self._close(unit)
        unit.writes.clear()
        unit.effects.clear()

    def commit(self, unit: Unit, last: Callable[[], object] | None = None) -> None:
        """Runs the unit's writes and then `last` (the audit record) in one SQLite transaction;
        any exception rolls all of it back (and is raised). The caches change only after the
        COMMIT."""
        self._close(unit)
        if not unit.writes:
            if last is not None:
                last()
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for sql, params, many in unit.writes:
                if many:
                    self._db.executemany(sql, params)
                else:
                    self._db.execute(sql, params)
            if last is not None:
                last()
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        for effect in unit.effects:
            effect()

    def _write(self, sql: str, params: Any, effect: Callable[[], object] | None = None,
               many: bool = False) -> None:
        unit = _UNIT.get()
        if unit is not None and unit.open:
            unit.writes.append((sql, params, many))
            if effect is not None:
                unit.effects.append(effect)
            return
        if many:
            self._db.executemany(sql, params)
        else:
            self._db.execute(sql, params)
        if effect is not None:
            effect()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """The writes of the block in one SQLite transaction (inside a request: part of the
        request's unit, committed with it)."""
        outer = _UNIT.get()
        if outer is not None and outer.open:
            yield
            return
        unit = self.begin()
        try:
            yield
        except BaseException:
            self.discard(unit)
            raise
        self.commit(unit)

    # -- keys -------------------------------------------------------------------------------
    def put_key(self, key: KeyRecord) -> None:
        self._write("INSERT OR REPLACE INTO keys VALUES (?, ?)", (key.key_id, _dump(key)),
                    lambda: self.keys.__setitem__(key.key_id, key))

    def delete_key(self, key_id: str) -> None:
        """Removes a key with its material, aliases and grants."""
        def forget() -> None:
            self.keys.pop(key_id, None)
            for name in [n for n, a in self.aliases.items() if a.key_id == key_id]:
                del self.aliases[name]

        with self.transaction():
            self._write("DELETE FROM keys WHERE key_id = ?", (key_id,))
            self._write("DELETE FROM materials WHERE key_id = ?", (key_id,))
            self._write("DELETE FROM grants WHERE key_id = ?", (key_id,))
            self._write("DELETE FROM last_usage WHERE key_id = ?", (key_id,), forget)
            for name in [n for n, a in self.aliases.items() if a.key_id == key_id]:
                self._write("DELETE FROM aliases WHERE name = ?", (name,))

    # -- material ---------------------------------------------------------------------------
    def put_material(self, m: MaterialRecord) -> None:
        self._write("INSERT OR REPLACE INTO materials VALUES (?, ?, ?, ?, ?, ?)",
                         (m.material_id, m.key_id, m.seq, _dump(m, ("sealed", "public")),
                          m.sealed, m.public))

    def delete_materials(self, key_id: str) -> None:
        self._write("DELETE FROM materials WHERE key_id = ?", (key_id,))

    def material(self, material_id: str) -> MaterialRecord | None:
        row = self._db.execute("SELECT data, sealed, public FROM materials WHERE material_id = ?",
                               (material_id,)).fetchone()
        if row is None:
            return None
        d = json.loads(row[0])
        return MaterialRecord(sealed=bytes(row[1]), public=bytes(row[2]), **d)

    def materials(self, key_id: str) -> list[MaterialRecord]:
        out = []
        for data, sealed, public in self._db.execute(
                "SELECT data, sealed, public FROM materials WHERE key_id = ? ORDER BY seq", (key_id,)):
            out.append(MaterialRecord(sealed=bytes(sealed), public=bytes(public), **json.loads(data)))
        return out

    # -- aliases ----------------------------------------------------------------------------
    def put_alias(self, alias: AliasRecord) -> None:
        self._write("INSERT OR REPLACE INTO aliases VALUES (?, ?)", (alias.name, _dump(alias)),
                    lambda: self.aliases.__setitem__(alias.name, alias))

    def delete_alias(self, name: str) -> None:
        self._write("DELETE FROM aliases WHERE name = ?", (name,), lambda: self.aliases.pop(name, None))

    # -- grants -----------------------------------------------------------------------------
    def put_grant(self, g: GrantRecord) -> None:
        self._write("INSERT OR REPLACE INTO grants VALUES (?, ?, ?)", (g.grant_id, g.key_id, _dump(g)))

    def delete_grant(self, grant_id: str) -> None:
        self._write("DELETE FROM grants WHERE grant_id = ?", (grant_id,))

    def grants(self, key_id: str) -> list[GrantRecord]:
        return [_load(GrantRecord, d) for (d,) in self._db.execute(
            "SELECT data FROM grants WHERE key_id = ? ORDER BY rowid", (key_id,))]

    def grant(self, grant_id: str) -> GrantRecord | None:
        row = self._db.execute("SELECT data FROM grants WHERE grant_id = ?", (grant_id,)).fetchone()
        return None if row is None else _load(GrantRecord, row[0])

    def grants_all(self) -> list[GrantRecord]:
        return [_load(GrantRecord, d) for (d,) in self._db.execute("SELECT data FROM grants ORDER BY rowid")]

    # -- custom key stores -------------------------------------------------------------------
    def put_store(self, s: StoreRecord) -> None:
        self._write("INSERT OR REPLACE INTO stores VALUES (?, ?)", (s.store_id, _dump(s)),
                    lambda: self.stores.__setitem__(s.store_id, s))

    def delete_store(self, store_id: str) -> None:
        self._write("DELETE FROM stores WHERE store_id = ?", (store_id,),
                    lambda: self.stores.pop(store_id, None))

    # -- key usage tracking -------------------------------------------------------------------
    def last_usage(self) -> dict[str, dict[str, Any]]:
        return {k: json.loads(d) for k, d in self._db.execute("SELECT key_id, data FROM last_usage")}

    def put_last_usage(self, rows: dict[str, dict[str, Any]]) -> None:
        self._write("INSERT OR REPLACE INTO last_usage VALUES (?, ?)",
                    [(k, json.dumps(v)) for k, v in rows.items() if k in self.keys], many=True)

    # -- settings ---------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT v FROM meta WHERE k = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self._write("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
