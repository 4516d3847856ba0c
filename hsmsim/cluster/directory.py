"""The object directory, in the manner of SoftHSMv2's HandleManager: it alone owns the table
of cluster-wide handles and the HSMs holding each object, and answers who holds what, what
dies with a session, a logout or a lost HSM, and how far an HSM lags behind. Indexes by
session, login and holder make each of those cost what it touches, not the whole table."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from hsmsim.cluster.journal import Journal


@dataclass(frozen=True)
class Obj:
    """Directory entry of one object: which members hold it. Session objects live on exactly
    one member and belong to one (login, session). Read-only outside the directory."""

    token: bool
    holders: frozenset[str]
    login_id: int | None = None
    session: int | None = None


def _add(index: dict[object, set[int]], key: object, handle: int) -> None:
    index.setdefault(key, set()).add(handle)


def _discard(index: dict[object, set[int]], key: object, handle: int) -> None:
    hs = index.get(key)
    if hs is not None:
        hs.discard(handle)
        if not hs:
            del index[key]


class Directory:
    """Handle -> Obj, with the deletion tombstones of the journal. Every change goes through
    a method here, so the indexes always agree with the table."""

    def __init__(self, journal: Journal) -> None:
        self._journal = journal
        self._objects: dict[int, Obj] = {}
        self._tokens: set[int] = set()  # live token objects
        self._tokens_by_holder: dict[object, set[int]] = {}  # HSM id -> token handles it holds
        self._sessions_by_holder: dict[object, set[int]] = {}  # HSM id -> session objects there
        self._by_login: dict[object, set[int]] = {}  # login id -> its session objects
        self._by_session: dict[object, set[int]] = {}  # session -> its session objects
        # The HSM holding each application's session objects (login id -> HSM id).
        self._homes: dict[int, str] = {}

    # -- the table -------------------------------------------------------------------------------
    def _put(self, handle: int, obj: Obj) -> None:
        self._unindex(handle)
        self._objects[handle] = obj
        if obj.token:
            self._tokens.add(handle)
            for hid in obj.holders:
                _add(self._tokens_by_holder, hid, handle)
        else:
            for hid in obj.holders:
                _add(self._sessions_by_holder, hid, handle)
            _add(self._by_login, obj.login_id, handle)
            _add(self._by_session, obj.session, handle)

    def _unindex(self, handle: int) -> Obj | None:
        obj = self._objects.pop(handle, None)
        if obj is None:
            return None
        if obj.token:
            self._tokens.discard(handle)
            for hid in obj.holders:
                _discard(self._tokens_by_holder, hid, handle)
        else:
            for hid in obj.holders:
                _discard(self._sessions_by_holder, hid, handle)
            _discard(self._by_login, obj.login_id, handle)
            _discard(self._by_session, obj.session, handle)
        return obj

    def get(self, handle: int) -> Obj | None:
        """The entry of a live object (None when unknown or deleted)."""
        obj = self._objects.get(handle)
        if obj is None or handle in self._journal.tombstones:
            return None
        return obj

    def __contains__(self, handle: object) -> bool:
        return isinstance(handle, int) and self.get(handle) is not None

    def holders(self, handle: int) -> frozenset[str]:
        obj = self.get(handle)
        return obj.holders if obj is not None else frozenset()

    def created(self, handles: Iterable[int], token_flags: Iterable[bool], hsm_id: str,
                login_id: int, session: int) -> None:
        """Objects just created on `hsm_id` (one flag per handle); an application's session
        objects make that HSM its home for the next ones."""
        for h, tok in zip(handles, token_flags):
            self._put(h, Obj(tok, frozenset({hsm_id}), None if tok else login_id,
                             None if tok else session))
            if not tok:
                self._homes[login_id] = hsm_id

    def home(self, login_id: int) -> str | None:
        """The HSM holding this application's session objects, if any were made."""
        return self._homes.get(login_id)

    def add_holder(self, handle: int, hsm_id: str) -> None:
        obj = self._objects.get(handle)
        if obj is not None and hsm_id not in obj.holders:
            self._put(handle, replace(obj, holders=obj.holders | {hsm_id}))

    def discard_holder(self, handle: int, hsm_id: str) -> None:
        obj = self._objects.get(handle)
        if obj is not None and hsm_id in obj.holders:
            self._put(handle, replace(obj, holders=obj.holders - {hsm_id}))

    def adopt(self, handle: int, hsm_id: str) -> bool:
        """A token object found on `hsm_id` that the cluster does not know (e.g. the daemon
        died between its creation and its record): recorded, unless it was deleted."""
        if handle in self._journal.tombstones or handle in self._objects:
            return False
        self._put(handle, Obj(True, frozenset({hsm_id})))
        return True

    def rebuild(self, inventories: Mapping[str, Iterable[int]]) -> int:
        """The token objects anew from the members' inventories (daemon start); session
        objects stay. Returns the highest handle seen, tombstones included (0 if none)."""
        for h in list(self._tokens):
            self._unindex(h)
        top = max(self._journal.tombstones, default=0)
        holders: dict[int, set[str]] = {}
        for hid, inv in inventories.items():
            for h in inv:
                top = max(top, h)
                if h not in self._journal.tombstones:
                    holders.setdefault(h, set()).add(hid)
        for h, hs in holders.items():
            self._put(h, Obj(True, frozenset(hs)))
        return top

    # -- deletion --------------------------------------------------------------------------------
    def is_tombstoned(self, handle: int) -> bool:
        return handle in self._journal.tombstones

    def tombstone_count(self) -> int:
        return len(self._journal.tombstones)

    def tombstone(self, *handles: int) -> list[tuple[int, Obj]]:
        """Delete for good: journaled (fsynced) first, then out of the table. Returns the
        entries removed (handles that were never recorded are journaled all the same)."""
        self._journal.tombstone(*handles)
        out = []
        for h in handles:
            obj = self._unindex(h)
            if obj is not None:
                out.append((h, obj))
        return out

    def remove(self, handle: int) -> Obj | None:
        """Out of the table without a tombstone (a session object, which no HSM keeps)."""
        return self._unindex(handle)

    def on_member_lost(self, hsm_id: str) -> list[int]:
        """Session objects live on one HSM and are lost with it (CloudHSM). FIDELITY: the SDK's
        behaviour afterwards is not documented; later use of such a handle gets
        CKR_KEY_HANDLE_INVALID / CKR_OBJECT_HANDLE_INVALID. A paused or partitioned HSM counts
        as lost for its session objects (the daemon closes its connection)."""
        gone = list(self._sessions_by_holder.get(hsm_id, ()))
        for h in gone:
            self._unindex(h)
        return gone

    def on_member_removed(self, hsm_id: str) -> None:
        """An HSM removed or set aside: its session objects are lost and it holds nothing."""
        self.on_member_lost(hsm_id)
        for h in list(self._tokens_by_holder.get(hsm_id, ())):
            self.discard_holder(h, hsm_id)

    def on_session_closed(self, session: int, login_id: int | None) -> set[str]:
        """Drop a session's objects (only those of `login_id` unless None); returns the HSMs
        that held them, where the session must be closed too."""
        homes: set[str] = set()
        for h in list(self._by_session.get(session, ())):
            obj = self._objects[h]
            if login_id is None or obj.login_id == login_id:
                homes |= obj.holders
                self._unindex(h)
        return homes

    def on_logout(self, login_id: int) -> None:
        """PKCS#11: the node drops a logged-out user's session objects; so does the table."""
        self._homes.pop(login_id, None)
        for h in list(self._by_login.get(login_id, ())):
            self._unindex(h)

    # -- questions -------------------------------------------------------------------------------
    def session_holders(self, login_id: int) -> set[str]:
        """The HSMs holding this application's session objects."""
        out: set[str] = set()
        for h in self._by_login.get(login_id, ()):
            out |= self._objects[h].holders
        return out

    def visible(self, handles: Iterable[int], login_id: int) -> list[int]:
        """Of `handles` (found on HSMs), those live here that this login may see, sorted:
        token objects, and its own session objects."""
        out = []
        for h in sorted(set(handles)):
            obj = self.get(h)
            if obj is not None and (obj.token or obj.login_id == login_id):
                out.append(h)
        return out

    def live_tokens(self) -> set[int]:
        return set(self._tokens)

    def held(self, hsm_id: str) -> int:
        """Token objects `hsm_id` holds."""
        return len(self._tokens_by_holder.get(hsm_id, ()))

    def sync_lag(self, hsm_id: str) -> int:
        """Token objects `hsm_id` does not hold yet."""
        return len(self._tokens) - self.held(hsm_id)
