"""Routing: which HSM takes a request (round-robin over the healthy HSMs holding every object
it names, new objects on the least busy one), the key availability check, and the one retry
loop (throttling backs off exponentially, a lost HSM fails over to the next holder)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from hsmsim.cluster.api import Login
from hsmsim.cluster.directory import Directory, Obj
from hsmsim.cluster.journal import HandleAllocator
from hsmsim.cluster.logins import LoginRecord, Logins
from hsmsim.cluster.members import Member
from hsmsim.cluster.pool import Pool
from hsmsim.node.client import NodeBusy, NodeClient, NodeThrottled, NodeUnavailable
from hsmsim.pkcs11.constants import RV
from hsmsim.pkcs11.errors import Pkcs11Error

log = logging.getLogger("hsmsim.cluster")
T = TypeVar("T")

AVAILABILITY_MSG = ("Key {handle} does not meet the availability requirements - The key must be "
                    "available on at least 2 HSMs before being used.")
# fn(client, the application's node login id) for a call on one HSM
Call = Callable[[NodeClient, int], Awaitable[T]]


def _first(cands: list[Member]) -> Member:
    return cands[0]


class Router:
    def __init__(self, pool: Pool, directory: Directory, logins: Logins,
                 handles: HandleAllocator) -> None:
        self.pool, self.directory, self.logins, self.handles = pool, directory, logins, handles

    # -- what may take a request -----------------------------------------------------------------
    def entry(self, handle: int, invalid: RV) -> Obj:
        obj = self.directory.get(handle)
        if obj is None:
            raise Pkcs11Error(invalid, f"object handle {handle} is not valid")
        return obj

    def check_available(self, handle: int, obj: Obj) -> None:
        # CloudHSM SDK 5 key availability check: a token key must be on at least 2 HSMs to be
        # used. FIDELITY: holders count HSMs that hold the key durably even while one of them is
        # briefly down (CloudHSM's exact rule for a temporarily failed HSM is not documented).
        if self.pool.check_availability and obj.token and \
                len(obj.holders & set(self.pool.members)) < 2:
            # FIDELITY: CloudHSM documents only the log message; the PKCS#11 return value is not
            # documented. We return CKR_FUNCTION_FAILED with that message.
            raise Pkcs11Error(RV.FUNCTION_FAILED, AVAILABILITY_MSG.format(handle=handle))

    def candidates(self, handles: Sequence[int], invalid: RV, tried: set[str],
                   login_id: int | None = None) -> list[Member]:
        """The usable HSMs holding every one of `handles` (any HSM when there are none), not
        yet tried, converged ones first. An HSM that refused this login comes last: CloudHSM
        fails over to any HSM holding the key, so it is still tried when nothing else is left
        (see _retry_refused)."""
        members = self.pool.members
        holders: frozenset[str] | None = None
        for h in handles:
            obj = self.entry(h, invalid)
            holders = obj.holders if holders is None else holders & obj.holders
        if holders is None:
            pool = [m for m in members.values() if m.hsm_id not in tried]
        else:
            pool = [members[h] for h in sorted(holders) if h in members and h not in tried]
        usable = [m for m in pool if m.usable]
        accepted = [m for m in usable if login_id is None or login_id not in m.login_refused]
        converged = [m for m in accepted if m.converged]
        if not handles:
            # A search goes to an HSM with no key copies still queued for it, so a key whose
            # creation was acknowledged is found at once (its last copies are asynchronous).
            complete = [m for m in converged if m.pending_sync == 0]
            out = self.pool.rotate(complete or converged or accepted)
        else:
            out = self.pool.rotate(converged or accepted)
        return out or [m for m in usable if m not in accepted]

    # -- the retry loop --------------------------------------------------------------------------
    async def _retry(self, rec: LoginRecord | None, handles: Sequence[int], invalid: RV,
                     call: Callable[[Member, NodeClient, int | None], Awaitable[T]],
                     choose: Callable[[list[Member]], Member] = _first,
                     timeout: float | None = None,
                     uncertain: Callable[[Member], None] | None = None,
                     creating: bool = False) -> tuple[T, Member]:
        """Run `call` on an HSM holding every one of `handles` (checked for availability on
        every pass), retrying throttled calls with exponential backoff and failing over when
        an HSM is lost or refuses the application's login. `uncertain(member)`, when given,
        is told of a call that may have taken effect on an HSM that was lost or too slow to
        answer (that HSM is then not tried again for this call). `creating`: the call makes
        new objects (`handles` are the ones it requires)."""
        tried: set[str] = set()
        attempt = 0
        last: BaseException | None = None
        login_id = rec.login.login_id if rec is not None else None
        while True:
            for h in handles:
                self.check_available(h, self.entry(h, invalid))
            cands = self.candidates(handles, invalid, tried, login_id)
            if not cands:
                if isinstance(last, NodeThrottled):
                    raise last
                if creating:
                    raise Pkcs11Error(RV.DEVICE_ERROR, "no HSM of the cluster is reachable")
                if handles and all(not self.entry(h, invalid).token for h in handles):
                    raise Pkcs11Error(invalid, "the HSM holding this session object is gone")
                raise Pkcs11Error(RV.DEVICE_ERROR, "no HSM holding the object is reachable")
            m = choose(cands)
            try:
                lid = await self._node_login(m, rec) if rec is not None else None
                return await self.pool.timed(m, call(m, m.connection(), lid), timeout), m
            except NodeThrottled as exc:
                last = exc
                if isinstance(exc, NodeBusy) and uncertain is not None:
                    # The slow HSM may still complete the call: try elsewhere.
                    uncertain(m)
                    m.converged = False
                    tried.add(m.hsm_id)
            except NodeUnavailable as exc:
                last = exc
                if uncertain is not None:
                    uncertain(m)
                m.mark_down(str(exc))
                tried.add(m.hsm_id)
                self.directory.on_member_lost(m.hsm_id)
            except Pkcs11Error as exc:
                if rec is not None and m.logins.get(rec.login.login_id) is None:
                    # This HSM refused the application's login (not yet in sync): try another.
                    last = exc
                    tried.add(m.hsm_id)
                    continue
                raise
            attempt += 1
            if attempt > self.pool.config.retries:
                if isinstance(last, NodeThrottled):
                    raise last  # CKR_FUNCTION_FAILED: CloudHSM SDK 5's busy error
                # FIDELITY: what SDK 5 returns when every HSM holding a key is lost is not
                # documented; we return CKR_DEVICE_ERROR.
                raise Pkcs11Error(RV.DEVICE_ERROR, f"the HSM was lost: {last}")
            if isinstance(last, NodeThrottled):
                await asyncio.sleep(self.pool.backoff(attempt))

    async def _node_login(self, m: Member, rec: LoginRecord) -> int:
        if rec.login.login_id in m.login_refused:
            return await self._retry_refused(m, rec)
        return await self.logins.node_login(m, rec)

    async def _retry_refused(self, m: Member, rec: LoginRecord) -> int:
        """The last HSM left for a request refused this application's login earlier. The
        refusal is not taken as final (it may predate the HSM's user sync): the login is sent
        there once more, once per refusal, so that a stale password costs at most one more
        failed attempt on that HSM until it is reconnected or reconciled. FIDELITY: CloudHSM
        fails over to any HSM holding the key; how it treats an HSM that refused a login is
        not documented (README, "Fidelity")."""
        lid = rec.login.login_id
        if lid in m.login_retried:
            raise Pkcs11Error(RV.USER_NOT_LOGGED_IN, f"{m.hsm_id} refused this login")
        m.login_retried.add(lid)
        m.login_refused.discard(lid)
        log.info("%s refused %s's login earlier and is the last HSM left for a request: "
                 "logging in there again", m.hsm_id, rec.login.username)
        return await self.logins.node_login(m, rec)

    # -- requests --------------------------------------------------------------------------------
    async def run_on(self, login: Login, handles: Sequence[int], invalid: RV,
                     fn: Call[T]) -> tuple[T, Member]:
        """run(), and the HSM that answered."""
        rec = self.logins.rec(login)

        def call(m: Member, client: NodeClient, lid: int | None) -> Awaitable[T]:
            assert lid is not None
            return fn(client, lid)
        return await self._retry(rec, handles, invalid, call)

    async def run(self, login: Login, handles: Sequence[int], invalid: RV, fn: Call[T]) -> T:
        """Run `fn(client, node login id)` on a member holding every handle."""
        result, _ = await self.run_on(login, handles, invalid, fn)
        return result

    async def run_unlogged(self, fn: Callable[[NodeClient], Awaitable[T]]) -> T:
        """Run `fn(client)`, which needs no login, on any member."""
        result, _ = await self._retry(None, (), RV.DEVICE_ERROR,
                                      lambda m, client, lid: fn(client))
        return result

    async def create(self, login: Login, token_flags: Sequence[bool], session: int,
                     requires: Sequence[int], invalid: RV, fn: Callable[[NodeClient, int, list[int]], Awaitable[T]]
                     ) -> tuple[T, list[int], Member]:
        """Create objects (one new handle per flag) with `fn(client, node login, handles)` on
        one member holding every handle in `requires`: the least busy one, or for session
        objects the application's session home. Returns the result, the handles and the HSM."""
        rec = self.logins.rec(login)
        if any(token_flags) and self.pool.check_availability and len(self.pool.members) < 2:
            raise Pkcs11Error(RV.FUNCTION_FAILED, AVAILABILITY_MSG.format(handle="(new)")
                              + " Set disable_key_availability_check for a single-HSM cluster.")
        handles: list[int] = []

        def choose(cands: list[Member]) -> Member:
            # CloudHSM spreads work "based on each HSM's capacity": new objects go to the HSM
            # with the fewest requests in flight (ties keep the round-robin order).
            m = min(cands, key=lambda x: x.inflight)
            if not all(token_flags):
                # FIDELITY: where CloudHSM places session keys is not documented; an
                # application's session objects stay on one HSM here, so that calls using two
                # of them (wrap, unwrap, derive) find both.
                home = self.directory.home(login.login_id)
                m = next((c for c in cands if c.hsm_id == home), m)
            return m

        def call(m: Member, client: NodeClient, lid: int | None) -> Awaitable[T]:
            assert lid is not None
            handles[:] = self.handles.allocate(len(token_flags))
            return fn(client, lid, list(handles))

        def uncertain(m: Member) -> None:
            # The HSM may have created (or may still create) the objects: make sure they die
            # there (reconciliation destroys tombstoned handles).
            self.directory.tombstone(*handles)
            handles.clear()

        result, m = await self._retry(rec, requires, invalid, call, choose,
                                      max(30.0, self.pool.config.request_timeout_s), uncertain,
                                      creating=True)
        self.directory.created(handles, token_flags, m.hsm_id, login.login_id, session)
        return result, list(handles), m
