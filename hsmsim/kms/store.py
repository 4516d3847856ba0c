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

# Schema 2: keys, aliases, grants, custom key stores and usage tracking belong to one Region
# (`region` column); key material is shared by the Regions of a multi-Region key (the same key
# id), so `materials` has no Region. Schema 1 (no `region` columns) is migrated on open.
SCHEMA_VERSION = 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (region TEXT NOT NULL, key_id TEXT NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (region, key_id));
CREATE TABLE IF NOT EXISTS materials (material_id TEXT PRIMARY KEY, key_id TEXT NOT NULL,
    seq INTEGER NOT NULL, data TEXT NOT NULL, sealed BLOB NOT NULL, public BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS materials_key ON materials(key_id, seq);
CREATE TABLE IF NOT EXISTS aliases (region TEXT NOT NULL, name TEXT NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (region, name));
CREATE TABLE IF NOT EXISTS grants (grant_id TEXT PRIMARY KEY, region TEXT NOT NULL, key_id TEXT NOT NULL,
    data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS grants_key ON grants(region, key_id);
CREATE TABLE IF NOT EXISTS stores (store_id TEXT PRIMARY KEY, region TEXT NOT NULL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS last_usage (region TEXT NOT NULL, key_id TEXT NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (region, key_id));
"""

# Schema 1 (one Region per store): the tables whose rows move into the default Region.
_V1_COLUMNS = {"keys": "key_id, data", "aliases": "name, data", "grants": "grant_id, key_id, data",
               "stores": "store_id, data", "last_usage": "key_id, data"}
_V1_TABLES = tuple(_V1_COLUMNS)

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
    """One KMS database file, `<state>/kms/kms.sqlite3` (0600), seen from one Region: `keys`,
    `aliases` and `stores` are that Region's; `view(region)` gives another Region's view of the
    same database (one connection, one unit of writes per request, whatever the Regions)."""

    def __init__(self, path: Path, region: str = "us-east-1") -> None:
        self.region = region
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
        self._migrate_v1(self.region)
        self._db.executescript(_SCHEMA)
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        self._views: dict[str, Store] = {self.region: self}
        self._all_keys: dict[str, dict[str, KeyRecord]] = {}
        self._all_aliases: dict[str, dict[str, AliasRecord]] = {}
        self._all_stores: dict[str, dict[str, StoreRecord]] = {}
        for r, k, d in self._db.execute("SELECT region, key_id, data FROM keys"):
            self._all_keys.setdefault(r, {})[k] = _load(KeyRecord, d)
        for r, n, d in self._db.execute("SELECT region, name, data FROM aliases"):
            self._all_aliases.setdefault(r, {})[n] = _load(AliasRecord, d)
        for r, sid, d in self._db.execute("SELECT region, store_id, data FROM stores"):
            self._all_stores.setdefault(r, {})[sid] = _load(StoreRecord, d)
        self._bind()

    def _bind(self) -> None:
        self.keys: dict[str, KeyRecord] = self._all_keys.setdefault(self.region, {})
        self.aliases: dict[str, AliasRecord] = self._all_aliases.setdefault(self.region, {})
        self.stores: dict[str, StoreRecord] = self._all_stores.setdefault(self.region, {})

    def _migrate_v1(self, region: str) -> None:
        """A schema-1 store (before Regions) becomes schema 2 with every key, alias, grant,
        custom key store and usage row in `region` (the configured default Region); key ARNs
        are rewritten to name it. One transaction: a failure leaves schema 1 as it was."""
        cols = [row[1] for row in self._db.execute("PRAGMA table_info(keys)")]
        if not cols or "region" in cols:
            return
        present = {row[0] for row in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for table in _V1_TABLES:
                if table not in present:  # an older schema 1 without it: an empty one
                    self._db.execute(f"CREATE TABLE {table}_v1 ({_V1_COLUMNS[table]})")
                    continue
                self._db.execute(f"ALTER TABLE {table} RENAME TO {table}_v1")
            self._db.execute("DROP INDEX IF EXISTS grants_key")
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    self._db.execute(stmt)
            for key_id, data in self._db.execute("SELECT key_id, data FROM keys_v1").fetchall():
                d = json.loads(data)
                parts = str(d.get("arn", "")).split(":", 5)
                if len(parts) == 6:
                    parts[3] = region
                    d["arn"] = ":".join(parts)
                self._db.execute("INSERT INTO keys VALUES (?, ?, ?)",
                                 (region, key_id, json.dumps(d, separators=(",", ":"))))
            self._db.execute("INSERT INTO aliases SELECT ?, name, data FROM aliases_v1", (region,))
            self._db.execute("INSERT INTO grants SELECT grant_id, ?, key_id, data FROM grants_v1", (region,))
            self._db.execute("INSERT INTO stores SELECT store_id, ?, data FROM stores_v1", (region,))
            self._db.execute("INSERT INTO last_usage SELECT ?, key_id, data FROM last_usage_v1", (region,))
            for table in _V1_TABLES:
                self._db.execute(f"DROP TABLE {table}_v1")
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('migrated_region', ?)", (region,))
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def view(self, region: str) -> Store:
        """This database as `region` sees it (the same connection and caches)."""
        found = self._views.get(region)
        if found is not None:
            return found
        v = object.__new__(Store)
        v.__dict__.update({k: self.__dict__[k] for k in
                           ("_db", "_views", "_all_keys", "_all_aliases", "_all_stores")})
        v.region = region
        v._bind()
        self._views[region] = v
        return v

    def regions(self) -> list[str]:
        """The Regions that hold at least one key or custom key store."""
        return sorted({r for r, ks in self._all_keys.items() if ks} | {r for r, ss in self._all_stores.items() if ss})

    def key_in(self, region: str, key_id: str) -> KeyRecord | None:
        return self._all_keys.get(region, {}).get(key_id)

    def key_regions(self, key_id: str) -> dict[str, KeyRecord]:
        """Region -> record of every Region that holds `key_id` (a multi-Region key's primary
        and replicas)."""
        return {r: ks[key_id] for r, ks in sorted(self._all_keys.items()) if key_id in ks}

    def close(self) -> None:
        self._db.close()

    def wipe(self) -> None:
        """Every Region's keys, materials, aliases, grants, custom key stores and usage gone,
        and the clock back at the real time, in one transaction (`POST /moto-api/reset`)."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            for table in ("keys", "materials", "aliases", "grants", "stores", "last_usage"):
                self._db.execute(f"DELETE FROM {table}")
            self._db.execute("DELETE FROM meta WHERE k IN ('clock_offset', 'tracking_start')")
        for cache in (self._all_keys, self._all_aliases, self._all_stores):
            for region_map in cache.values():
                region_map.clear()

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
        self._write("INSERT OR REPLACE INTO keys VALUES (?, ?, ?)", (self.region, key.key_id, _dump(key)),
                    lambda: self.keys.__setitem__(key.key_id, key))

    def delete_key(self, key_id: str) -> None:
        """Removes this Region's key with its aliases, grants and usage; its material too unless
        another Region holds the same (multi-Region) key."""
        region = self.region

        def forget() -> None:
            self.keys.pop(key_id, None)
            for name in [n for n, a in self.aliases.items() if a.key_id == key_id]:
                del self.aliases[name]

        shared = any(r != region for r in self.key_regions(key_id))
        with self.transaction():
            self._write("DELETE FROM keys WHERE region = ? AND key_id = ?", (region, key_id))
            if not shared:
                self._write("DELETE FROM materials WHERE key_id = ?", (key_id,))
            self._write("DELETE FROM grants WHERE region = ? AND key_id = ?", (region, key_id))
            self._write("DELETE FROM last_usage WHERE region = ? AND key_id = ?", (region, key_id), forget)
            for name in [n for n, a in self.aliases.items() if a.key_id == key_id]:
                self._write("DELETE FROM aliases WHERE region = ? AND name = ?", (region, name))

    # -- material (shared by the Regions of a multi-Region key) ---------------------------------
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
        self._write("INSERT OR REPLACE INTO aliases VALUES (?, ?, ?)", (self.region, alias.name, _dump(alias)),
                    lambda: self.aliases.__setitem__(alias.name, alias))

    def delete_alias(self, name: str) -> None:
        self._write("DELETE FROM aliases WHERE region = ? AND name = ?", (self.region, name),
                    lambda: self.aliases.pop(name, None))

    # -- grants -----------------------------------------------------------------------------
    def put_grant(self, g: GrantRecord) -> None:
        self._write("INSERT OR REPLACE INTO grants VALUES (?, ?, ?, ?)",
                    (g.grant_id, self.region, g.key_id, _dump(g)))

    def delete_grant(self, grant_id: str) -> None:
        self._write("DELETE FROM grants WHERE grant_id = ? AND region = ?", (grant_id, self.region))

    def grants(self, key_id: str) -> list[GrantRecord]:
        return [_load(GrantRecord, d) for (d,) in self._db.execute(
            "SELECT data FROM grants WHERE region = ? AND key_id = ? ORDER BY rowid", (self.region, key_id))]

    def grant(self, grant_id: str) -> GrantRecord | None:
        row = self._db.execute("SELECT data FROM grants WHERE grant_id = ? AND region = ?",
                               (grant_id, self.region)).fetchone()
        return None if row is None else _load(GrantRecord, row[0])

    def grants_all(self) -> list[GrantRecord]:
        return [_load(GrantRecord, d) for (d,) in self._db.execute(
            "SELECT data FROM grants WHERE region = ? ORDER BY rowid", (self.region,))]

    # -- custom key stores -------------------------------------------------------------------
    def put_store(self, s: StoreRecord) -> None:
        self._write("INSERT OR REPLACE INTO stores VALUES (?, ?, ?)", (s.store_id, self.region, _dump(s)),
                    lambda: self.stores.__setitem__(s.store_id, s))

    def delete_store(self, store_id: str) -> None:
        self._write("DELETE FROM stores WHERE store_id = ? AND region = ?", (store_id, self.region),
                    lambda: self.stores.pop(store_id, None))

    # -- key usage tracking -------------------------------------------------------------------
    def last_usage(self) -> dict[str, dict[str, Any]]:
        return {k: json.loads(d) for k, d in self._db.execute(
            "SELECT key_id, data FROM last_usage WHERE region = ?", (self.region,))}

    def put_last_usage(self, rows: dict[str, dict[str, Any]]) -> None:
        self._write("INSERT OR REPLACE INTO last_usage VALUES (?, ?, ?)",
                    [(self.region, k, json.dumps(v)) for k, v in rows.items() if k in self.keys], many=True)

    # -- settings (shared by all Regions) -----------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT v FROM meta WHERE k = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self._write("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
