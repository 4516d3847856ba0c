"""The cluster client the daemon plays (CloudHSM's client SDK): implements `ClusterClient` over
the members' NodeClients — logins on every HSM, routing round-robin over the healthy HSMs that
hold an object, key sync with the key availability check, retries with backoff, failover, and
the object directory that maps cluster-wide handles to the HSMs holding them."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from hsmsim.cluster.api import (AttributeResult, ClusterInfo, DirectRoute, EncryptResult, HsmInfo,
                                Login, UserInfo)
from hsmsim.cluster.config import ClusterConfig
from hsmsim.cluster.journal import HandleAllocator, Journal
from hsmsim.cluster.members import ACTIVE, DEGRADED, Member
from hsmsim.cluster.state import ClusterSpec, StateDir
from hsmsim.node.client import NodeBusy, NodeClient, NodeThrottled, NodeUnavailable
from hsmsim.node.values import LoginInfo
from hsmsim.pkcs11.attributes import Template
from hsmsim.pkcs11.constants import RV, Attribute, UserType
from hsmsim.pkcs11.errors import Pkcs11Error
from hsmsim.pkcs11.params import MechanismSpec

log = logging.getLogger("hsmsim.cluster")
T = TypeVar("T")

BACKGROUND_BUSY = 2  # requests in flight above which background key-sync copies wait
BACKGROUND_MAX_WAIT_S = 5.0  # ...but never longer than this
_NO_TICKET = (b"", b"", "")  # a node that gives no direct-path tickets
AVAILABILITY_MSG = ("Key {handle} does not meet the availability requirements - The key must be "
                    "available on at least 2 HSMs before being used.")


@dataclass
class Obj:
    """Directory entry of one object: which members hold it. Session objects live on exactly
    one member and belong to one (login, session)."""

    token: bool
    holders: set[str]
    login_id: int | None = None
    session: int | None = None


@dataclass
class LoginRecord:
    login: Login
    # FIDELITY: like the CloudHSM client, the daemon keeps the application's credentials in
    # memory (never on disk or in logs) to log it in to an HSM that joins or restarts later.
    password: str


class Cluster:
    """The daemon's view of the cluster; one instance per daemon."""

    def __init__(self, state: StateDir, spec: ClusterSpec, config: ClusterConfig) -> None:
        self.state, self.spec, self.config = state, spec, config
        self.members: dict[str, Member] = {h.hsm_id: Member(h.hsm_id, h.az, state) for h in spec.hsms}
        self.handles = HandleAllocator(state.handles)
        self.journal = Journal(state.journal)
        self.objects: dict[int, Obj] = {}
        # The HSM holding each application's session objects (login id -> HSM id).
        self.session_homes: dict[int, str] = {}
        self._logins: dict[int, LoginRecord] = {}
        self._login_ids = itertools.count(1)
        self._rr = itertools.count()
        self._bg: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._reconciling: set[str] = set()
        self._member_locks: dict[str, asyncio.Lock] = {}
        self.ca_pem = state.ca_cert.read_bytes() if state.ca_cert.exists() else b""
        self.converge_events = 0
        # direct-path tickets: (HSM, its connection generation, node login id) -> (ticket,
        # descriptor key, direct address). A node login dies with the connection, and its
        # ticket with it on the node.
        self._tickets: dict[tuple[str, int, int], tuple[bytes, bytes, str]] = {}

    # -- helpers ---------------------------------------------------------------------------------
    def spawn_bg(self, coro: Awaitable[Any], name: str = "") -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._bg.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._bg.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.warning("background %s failed: %s", name or "task", t.exception())
        task.add_done_callback(done)
        return task

    def lock_for(self, hsm_id: str) -> asyncio.Lock:
        return self._member_locks.setdefault(hsm_id, asyncio.Lock())

    async def timed(self, member: Member, aw: Awaitable[T], timeout: float | None = None) -> T:
        """Await a node call; a member that does not answer in time is marked down."""
        member.inflight += 1
        # injected latency is expected, not a failure
        limit = (timeout or self.config.request_timeout_s) + member.latency_ms / 1000.0
        try:
            # asyncio.timeout, not wait_for: wait_for wraps the call in a new task (a task and two
            # extra loop passes per node request)
            async with asyncio.timeout(limit):
                return await aw
        except asyncio.TimeoutError:
            raise self._timed_out(member, limit) from None
        finally:
            member.inflight -= 1

    def liveness_window(self) -> float:
        """How recently a node must have answered something to count as alive (two health
        checks' worth)."""
        return max(2.0, self.config.health_interval_s * 4)

    def _timed_out(self, member: Member, limit: float) -> Exception:
        """The error for a request that got no answer within `limit`. A node that keeps
        answering (health checks, other requests) is busy with slow expected work, not dead:
        NodeBusy (retried like a throttled request), and nothing is marked down. Only a silent
        node is marked down, so load alone never takes every HSM out of the cluster.
        FIDELITY: how CloudHSM's client tells a busy HSM from a failed one is not documented."""
        if member.answering(self.liveness_window()):
            return NodeBusy(RV.FUNCTION_FAILED, f"{member.hsm_id} is busy: no answer within "
                            f"{limit:.1f}s")
        member.mark_down(f"no answer within {limit:.1f}s")
        return NodeUnavailable(f"{member.hsm_id} did not answer in time")

    def usable(self) -> list[Member]:
        return [m for m in self.members.values() if m.usable]

    def routable(self) -> list[Member]:
        return [m for m in self.members.values() if m.routable]

    def _rotate(self, members: list[Member]) -> list[Member]:
        if not members:
            return members
        k = next(self._rr) % len(members)
        return members[k:] + members[:k]

    def live_token_handles(self) -> set[int]:
        return {h for h, o in self.objects.items() if o.token}

    def _backoff(self, attempt: int) -> float:
        return float(self.config.retry_base_ms) / 1000.0 * float(2 ** max(0, attempt - 1))

    @property
    def check_availability(self) -> bool:
        return not self.config.disable_key_availability_check

    # -- logins ----------------------------------------------------------------------------------
    async def node_login(self, member: Member, rec: LoginRecord) -> int:
        """This application's login id on `member`, logging in there first if needed (an HSM
        that joined or restarted since the application's C_Login)."""
        lid = member.logins.get(rec.login.login_id)
        if lid is not None:
            return lid
        if rec.login.login_id in member.login_refused:
            raise Pkcs11Error(RV.USER_NOT_LOGGED_IN, f"{member.hsm_id} refused this login")
        pending = member.login_pending.get(rec.login.login_id)
        if pending is not None:  # another request is logging this application in already
            return await asyncio.shield(pending)
        if member.client is None:
            raise NodeUnavailable(f"{member.hsm_id} is not connected")
        client, gen = member.client, member.generation
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        member.login_pending[rec.login.login_id] = fut
        try:
            try:
                info = await self._login_on(member, client, rec.login.user_type,
                                            rec.login.username, rec.password)
            except Pkcs11Error as exc:
                if not isinstance(exc, NodeThrottled):
                    # Do not try again on this HSM until it reconnects: a stale password
                    # would otherwise count towards the user's lockout on every request.
                    member.login_refused.add(rec.login.login_id)
                    log.warning("login of %s on %s refused (CKR_%s) while the cluster accepted "
                                "it: that HSM is not asked again for this login until it is "
                                "reconciled", rec.login.username, member.hsm_id, exc.rv.name)
                raise
            if member.generation != gen:
                raise NodeUnavailable(f"{member.hsm_id} reconnected during login")
            member.logins[rec.login.login_id] = info.login_id
            fut.set_result(info.login_id)
            return info.login_id
        except BaseException as exc:
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # retrieved: waiters re-raise it, nobody else must
            raise
        finally:
            member.login_pending.pop(rec.login.login_id, None)

    async def _login_on(self, m: Member, client: NodeClient, user_type: UserType | int,
                        username: str, password: str) -> LoginInfo:
        """One login on one HSM. Logins queue in the daemon per HSM (Member.login_window) and
        the wait is not timed; the login itself gets the creation timeout, as a password hash
        on a busy HSM is slow expected work (and a late answer from an HSM that keeps
        answering is NodeBusy, never a reason to mark it down: see _timed_out)."""
        async with m.login_window:
            if client.closed:
                raise NodeUnavailable(f"{m.hsm_id} is not connected")
            return await self.timed(m, client.login(user_type, username, password),
                                    timeout=max(30.0, self.config.request_timeout_s))

    def _rec(self, login: Login) -> LoginRecord:
        rec = self._logins.get(login.login_id)
        if rec is None:
            raise Pkcs11Error(RV.USER_NOT_LOGGED_IN, "the application is not logged in")
        return rec

    async def login(self, user_type: UserType, username: str, password: str) -> Login:
        members = self.usable()
        if not members:
            raise Pkcs11Error(RV.DEVICE_ERROR, "no HSM of the cluster is reachable")
        # Converge first, then log in: a password sent to an HSM holding an older record of the
        # user would count as a failed login there, and the lockout is per HSM.
        await self._converge_before_login(members, username)
        results = await asyncio.gather(
            *(self._login_on(m, m.client, user_type, username, password)  # type: ignore[arg-type]
              for m in members), return_exceptions=True)
        ok: list[tuple[Member, int]] = []
        errors: list[Pkcs11Error] = []
        for m, r in zip(members, results):
            if isinstance(r, Pkcs11Error) and not isinstance(r, NodeThrottled):
                errors.append(r)
            elif isinstance(r, BaseException):
                if isinstance(r, NodeUnavailable):
                    m.mark_down(str(r))
            else:
                ok.append((m, r.login_id))
        # A locked account anywhere, or a refusal by every HSM, fails the login. An HSM that
        # refused while others accepted (a user not yet synced to it) is retried lazily.
        locked = [e for e in errors if e.rv == RV.PIN_LOCKED]
        if errors and ok and not locked:
            # Never hidden: the user's records still differ (an HSM unreachable while they
            # converged, or a change racing this login). Reported with counts, and converged
            # now in the background; that HSM is not asked again for this login (node_login).
            refused = [m.hsm_id for m, r in zip(members, results)
                       if isinstance(r, Pkcs11Error) and not isinstance(r, NodeThrottled)]
            log.warning("login of %s refused by %d of %d HSMs (%s: CKR_%s) while the others "
                        "accepted it: its user records differ; converging them",
                        username, len(refused), len(members), ", ".join(refused),
                        errors[0].rv.name)
            self.spawn_bg(self.converge_users(), "converge-users")
        if locked or not ok:
            for m, lid in ok:
                self.spawn_bg(self._quiet(m.client.logout(lid)))  # type: ignore[union-attr]
            if locked:
                raise locked[0]
            if errors:
                raise errors[0]
            raise Pkcs11Error(RV.DEVICE_ERROR, "no HSM of the cluster answered the login")
        login = Login(next(self._login_ids), UserType(int(user_type)), username)
        self._logins[login.login_id] = LoginRecord(login, password)
        for m, lid in ok:
            m.logins[login.login_id] = lid
        # the direct path's tickets, one per HSM (docs/direct-protocol.md)
        await asyncio.gather(*(self._ticket(m, lid) for m, lid in ok), return_exceptions=True)
        return login

    async def logout(self, login: Login) -> None:
        rec = self._logins.pop(login.login_id, None)
        self.session_homes.pop(login.login_id, None)
        if rec is None:
            raise Pkcs11Error(RV.USER_NOT_LOGGED_IN, "the application is not logged in")
        calls = []
        for m in self.members.values():
            lid = m.logins.pop(login.login_id, None)
            if lid is not None:
                self._tickets.pop((m.hsm_id, m.generation, lid), None)
            if lid is not None and m.usable:
                calls.append(self._quiet(self.timed(m, m.client.logout(lid))))  # type: ignore[union-attr]
        await asyncio.gather(*calls)
        for h, o in list(self.objects.items()):
            if not o.token and o.login_id == login.login_id:
                del self.objects[h]  # PKCS#11: the node drops a logged-out user's session objects

    @staticmethod
    async def _quiet(aw: Awaitable[Any]) -> None:
        try:
            await aw
        except Exception:
            pass

    # -- the direct data path ----------------------------------------------------------------------
    async def _ticket(self, m: Member, lid: int) -> tuple[bytes, bytes, str] | None:
        """The direct-path ticket of node login `lid` on `m` (fetched once per login)."""
        key = (m.hsm_id, m.generation, lid)
        t = self._tickets.get(key)
        if t is None and m.client is not None:
            try:
                t = await self.timed(m, m.client.direct_ticket(lid))
            except NodeThrottled:
                raise
            except Pkcs11Error:  # e.g. no direct listener: remembered, never asked again
                t = _NO_TICKET
            if m.generation == key[1]:
                if len(self._tickets) > 100_000:
                    self._tickets.clear()
                self._tickets[key] = t
        return None if t is _NO_TICKET else t

    def _direct_candidates(self, login: Login, handle: int) -> list[tuple[Member, int]]:
        """The holders of `handle` with this application's node login, in run()'s order."""
        obj = self.objects.get(handle)
        if login.login_id not in self._logins or obj is None or handle in self.journal.tombstones:
            return []
        try:
            self._check_available(handle, obj)
            cands = self._candidates((handle,), RV.KEY_HANDLE_INVALID, set(), login.login_id)
        except Pkcs11Error:
            return []
        out = []
        for m in cands:
            lid = m.logins.get(login.login_id)
            if lid is not None:
                out.append((m, lid))
        return out

    def _route(self, m: Member, t: tuple[bytes, bytes, str]) -> DirectRoute:
        return DirectRoute(t[2], t[0], t[1], self.config.request_timeout_s + m.latency_ms / 1000.0)

    def direct_route_cached(self, login: Login, handle: int) -> list[DirectRoute] | None:
        """direct_route() without waiting: None when a holder's ticket must be fetched first."""
        out = []
        for m, lid in self._direct_candidates(login, handle):
            t = self._tickets.get((m.hsm_id, m.generation, lid))
            if t is None:
                return None
            if t is not _NO_TICKET:
                out.append(self._route(m, t))
        return out

    async def direct_route(self, login: Login, handle: int) -> list[DirectRoute]:
        """The HSMs holding `handle` that this application may call directly, in the order
        run() would try them (round-robin over the converged holders). Empty when the call
        must go through the daemon (the key fails the availability check, no holder has the
        application's login yet, or a node has no direct listener)."""
        out: list[DirectRoute] = []
        for m, lid in self._direct_candidates(login, handle):
            try:
                t = await self._ticket(m, lid)
            except (NodeUnavailable, Pkcs11Error) as exc:
                log.info("no direct ticket from %s: %s", m.hsm_id, exc)
                continue
            if t is not None:
                out.append(self._route(m, t))
        return out

    # -- routing and retries ---------------------------------------------------------------------
    def _entry(self, handle: int, invalid: RV) -> Obj:
        obj = self.objects.get(handle)
        if obj is None or handle in self.journal.tombstones:
            raise Pkcs11Error(invalid, f"object handle {handle} is not valid")
        return obj

    def _check_available(self, handle: int, obj: Obj) -> None:
        # CloudHSM SDK 5 key availability check: a token key must be on at least 2 HSMs to be
        # used. FIDELITY: holders count HSMs that hold the key durably even while one of them is
        # briefly down (CloudHSM's exact rule for a temporarily failed HSM is not documented).
        if self.check_availability and obj.token and len(obj.holders & set(self.members)) < 2:
            # FIDELITY: CloudHSM documents only the log message; the PKCS#11 return value is not
            # documented. We return CKR_FUNCTION_FAILED with that message.
            raise Pkcs11Error(RV.FUNCTION_FAILED, AVAILABILITY_MSG.format(handle=handle))

    def _candidates(self, handles: Sequence[int], invalid: RV, tried: set[str],
                    login_id: int | None = None) -> list[Member]:
        holders: set[str] | None = None
        for h in handles:
            obj = self._entry(h, invalid)
            holders = set(obj.holders) if holders is None else holders & obj.holders
        if holders is None:
            members = [m for m in self.members.values() if m.hsm_id not in tried]
        else:
            members = [self.members[h] for h in sorted(holders) if h in self.members and h not in tried]
        usable = [m for m in members if m.usable and not (login_id is not None
                                                          and login_id in m.login_refused)]
        converged = [m for m in usable if m.converged]
        if not handles:
            # A search goes to an HSM with no key copies still queued for it, so a key whose
            # creation was acknowledged is found at once (its last copies are asynchronous).
            complete = [m for m in converged if m.pending_sync == 0]
            return self._rotate(complete or converged or usable)
        return self._rotate(converged or usable)

    async def run(self, login: Login | None, handles: Sequence[int], invalid: RV,
                  fn: Callable[[Member, int | None], Awaitable[T]]) -> T:
        """Run `fn(member, node_login_id)` on a member holding every handle, retrying throttled
        calls with exponential backoff and failing over when a member is lost."""
        rec = self._rec(login) if login is not None else None
        tried: set[str] = set()
        attempt = 0
        last: BaseException | None = None
        while True:
            for h in handles:
                obj = self._entry(h, invalid)
                self._check_available(h, obj)
            cands = self._candidates(handles, invalid, tried,
                                     rec.login.login_id if rec is not None else None)
            if not cands:
                if isinstance(last, NodeThrottled):
                    raise last
                if handles and all(not self._entry(h, invalid).token for h in handles):
                    raise Pkcs11Error(invalid, "the HSM holding this session object is gone")
                raise Pkcs11Error(RV.DEVICE_ERROR, "no HSM holding the object is reachable")
            m = cands[0]
            try:
                lid = await self.node_login(m, rec) if rec is not None else None
                return await self.timed(m, fn(m, lid))
            except NodeThrottled as exc:
                last = exc
            except NodeUnavailable as exc:
                last = exc
                m.mark_down(str(exc))
                tried.add(m.hsm_id)
                self._drop_session_objects(m)
            except Pkcs11Error as exc:
                if rec is not None and m.logins.get(rec.login.login_id) is None:
                    # This HSM refused the application's login (not yet in sync): try another.
                    last = exc
                    tried.add(m.hsm_id)
                    continue
                raise
            attempt += 1
            if attempt > self.config.retries:
                if isinstance(last, NodeThrottled):
                    raise last  # CKR_FUNCTION_FAILED: CloudHSM SDK 5's busy error
                # FIDELITY: what SDK 5 returns when every HSM holding a key is lost is not
                # documented; we return CKR_DEVICE_ERROR.
                raise Pkcs11Error(RV.DEVICE_ERROR, f"the HSM was lost: {last}")
            if isinstance(last, NodeThrottled):
                await asyncio.sleep(self._backoff(attempt))

    def _drop_session_objects(self, m: Member) -> None:
        """Session objects live on one HSM and are lost with it (CloudHSM). FIDELITY: the SDK's
        behaviour afterwards is not documented; later use of such a handle gets
        CKR_KEY_HANDLE_INVALID / CKR_OBJECT_HANDLE_INVALID. A paused or partitioned HSM counts
        as lost for its session objects (the daemon closes its connection)."""
        for h, o in list(self.objects.items()):
            if not o.token and m.hsm_id in o.holders:
                del self.objects[h]

    # -- creation and key sync -------------------------------------------------------------------
    async def create(self, login: Login, token_flags: Sequence[bool], session: int,
                     requires: Sequence[int], invalid: RV,
                     fn: Callable[[Member, int, list[int]], Awaitable[T]]) -> tuple[T, list[int]]:
        """Create objects (one handle per flag) on one member, then sync the token ones."""
        rec = self._rec(login)
        if any(token_flags) and self.check_availability and len(self.members) < 2:
            raise Pkcs11Error(RV.FUNCTION_FAILED, AVAILABILITY_MSG.format(handle="(new)")
                              + " Set disable_key_availability_check for a single-HSM cluster.")
        tried: set[str] = set()
        attempt = 0
        last: BaseException | None = None
        while True:
            for h in requires:
                self._check_available(h, self._entry(h, invalid))
            cands = self._candidates(requires, invalid, tried, rec.login.login_id)
            if not cands:
                if isinstance(last, NodeThrottled):
                    raise last
                raise Pkcs11Error(RV.DEVICE_ERROR, "no HSM of the cluster is reachable")
            # CloudHSM spreads work "based on each HSM's capacity": new objects go to the HSM
            # with the fewest requests in flight (ties keep the round-robin order).
            m = min(cands, key=lambda x: x.inflight)
            if not all(token_flags):
                # FIDELITY: where CloudHSM places session keys is not documented; an
                # application's session objects stay on one HSM here, so that calls using two
                # of them (wrap, unwrap, derive) find both.
                home = self.session_homes.get(login.login_id)
                m = next((c for c in cands if c.hsm_id == home), m)
            handles = self.handles.allocate(len(token_flags))
            try:
                lid = await self.node_login(m, rec)
                result = await self.timed(m, fn(m, lid, handles), timeout=max(
                    30.0, self.config.request_timeout_s))
                break
            except NodeThrottled as exc:
                last = exc
                if isinstance(exc, NodeBusy):
                    # The slow HSM may still create the objects: make sure they die there
                    # (reconciliation destroys tombstoned handles) and try elsewhere.
                    self.journal.tombstone(*handles)
                    m.converged = False
                    tried.add(m.hsm_id)
            except NodeUnavailable as exc:
                last = exc
                # The HSM may have created the objects before it was lost: make sure they die.
                self.journal.tombstone(*handles)
                m.mark_down(str(exc))
                tried.add(m.hsm_id)
                self._drop_session_objects(m)
            except Pkcs11Error as exc:
                if m.logins.get(rec.login.login_id) is None:
                    last = exc
                    tried.add(m.hsm_id)
                    continue
                raise
            attempt += 1
            if attempt > self.config.retries:
                if isinstance(last, NodeThrottled):
                    raise last
                raise Pkcs11Error(RV.DEVICE_ERROR, f"the HSM was lost: {last}")
            if isinstance(last, NodeThrottled):
                await asyncio.sleep(self._backoff(attempt))
        for h, tok in zip(handles, token_flags):
            self.objects[h] = Obj(tok, {m.hsm_id}, None if tok else login.login_id,
                                  None if tok else session)
        if not all(token_flags):
            self.session_homes[login.login_id] = m.hsm_id
        token_handles = [h for h, tok in zip(handles, token_flags) if tok]
        if token_handles:
            await self.replicate_new(m, token_handles)
        return result, handles

    def quorum_needed(self) -> int:
        """Other HSMs that must hold a new token object before it is acknowledged."""
        if not self.check_availability or len(self.members) < 2:
            return 0
        return 1

    async def replicate_new(self, source: Member, handles: list[int]) -> None:
        """Copy new token objects from `source` to every other usable member as masked blobs;
        return once the key availability check is met (the rest finish in the background)."""
        need = self.quorum_needed()
        try:
            assert source.client is not None
            blobs = await self.timed(source, asyncio.gather(
                *(source.client.export_masked(h) for h in handles)))
        except (NodeUnavailable, Pkcs11Error) as exc:
            if isinstance(exc, NodeUnavailable):
                source.mark_down(str(exc))
            if need == 0:
                return  # reconciliation copies them when the HSM is back
            self._abandon(handles)
            raise Pkcs11Error(RV.FUNCTION_FAILED,
                              AVAILABILITY_MSG.format(handle=handles[0])) from None
        targets = sorted((m for m in self.usable() if m is not source), key=lambda x: x.inflight)
        if len(targets) < need:
            self._abandon(handles)
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
            self.spawn_bg(background(m), "key sync")
        if ok < need:
            self._abandon(handles)
            raise Pkcs11Error(RV.FUNCTION_FAILED, AVAILABILITY_MSG.format(handle=handles[0]))

    async def import_blob(self, m: Member, handle: int, blob: bytes, replace: bool = False) -> None:
        if m.client is None or not m.usable:
            raise NodeUnavailable(f"{m.hsm_id} is not usable")
        gen = m.generation
        try:
            await self.timed(m, m.client.import_masked(blob, replace=replace))
        except NodeUnavailable as exc:
            m.mark_down(str(exc))
            raise
        except Pkcs11Error as exc:
            if exc.rv != RV.TEMPLATE_INCONSISTENT:
                raise
            # Already there: a key-sync copy and a reconciliation copy raced. The copies come
            # from the same masked object; reconciliation compares fingerprints anyway.
        obj = self.objects.get(handle)
        if handle in self.journal.tombstones:
            self.spawn_bg(self._quiet(m.client.destroy_object(None, handle)))
        elif obj is not None and m.generation == gen:
            obj.holders.add(m.hsm_id)

    def _abandon(self, handles: Iterable[int]) -> None:
        """A creation that cannot be acknowledged: tombstone it everywhere (SDK 3 did this)."""
        hs = list(handles)
        self.journal.tombstone(*hs)
        for h in hs:
            obj = self.objects.pop(h, None)
            if obj is None:
                continue
            for hid in obj.holders:
                m = self.members.get(hid)
                if m is not None and m.usable:
                    self.spawn_bg(self._quiet(m.client.destroy_object(None, h)))  # type: ignore[union-attr]

    # -- ClusterClient: info -----------------------------------------------------------------------
    def sync_lag(self, m: Member) -> int:
        return sum(1 for h, o in self.objects.items() if o.token and m.hsm_id not in o.holders)

    def held(self, m: Member) -> int:
        return sum(1 for o in self.objects.values() if o.token and m.hsm_id in o.holders)

    def cluster_state(self) -> str:
        members = list(self.members.values())
        if members and all(m.usable and m.converged for m in members):
            return ACTIVE
        return DEGRADED

    async def info(self) -> ClusterInfo:
        hsms = tuple(HsmInfo(m.hsm_id, m.az, m.hsm_state if m.usable else DEGRADED
                             if m.hsm_state == ACTIVE else m.hsm_state,
                             self.held(m), self.sync_lag(m), m.last_error)
                     for m in self.members.values())
        return ClusterInfo(self.spec.cluster_id, self.cluster_state(), hsms, self.ca_pem)

    # -- ClusterClient: objects --------------------------------------------------------------------
    @staticmethod
    def _is_token(template: Template) -> bool:
        return bool(template.get(int(Attribute.TOKEN), False))

    async def generate_key(self, login: Login, mech: MechanismSpec, template: Template,
                           session: int) -> int:
        _, handles = await self.create(
            login, [self._is_token(template)], session, (), RV.KEY_HANDLE_INVALID,
            lambda m, lid, hs: m.client.generate_key(lid, mech, template, handle=hs[0],  # type: ignore[union-attr]
                                                     session=session))
        return handles[0]

    async def generate_key_pair(self, login: Login, mech: MechanismSpec, public: Template,
                                private: Template, session: int) -> tuple[int, int]:
        _, handles = await self.create(
            login, [self._is_token(public), self._is_token(private)], session, (),
            RV.KEY_HANDLE_INVALID,
            lambda m, lid, hs: m.client.generate_key_pair(  # type: ignore[union-attr]
                lid, mech, public, private, public_handle=hs[0], private_handle=hs[1],
                session=session))
        return handles[0], handles[1]

    async def create_object(self, login: Login, template: Template, session: int) -> int:
        _, handles = await self.create(
            login, [self._is_token(template)], session, (), RV.OBJECT_HANDLE_INVALID,
            lambda m, lid, hs: m.client.create_object(lid, template, handle=hs[0],  # type: ignore[union-attr]
                                                      session=session))
        return handles[0]

    async def copy_object(self, login: Login, handle: int, template: Template, session: int) -> int:
        src = self._entry(handle, RV.OBJECT_HANDLE_INVALID)
        token = self._is_token(template) if int(Attribute.TOKEN) in template else src.token
        _, handles = await self.create(
            login, [token], session, (handle,), RV.OBJECT_HANDLE_INVALID,
            lambda m, lid, hs: m.client.copy_object(lid, handle, template, new_handle=hs[0],  # type: ignore[union-attr]
                                                    session=session))
        return handles[0]

    async def unwrap_key(self, login: Login, unwrapping: int, mech: MechanismSpec, wrapped: bytes,
                         template: Template, session: int) -> int:
        _, handles = await self.create(
            login, [self._is_token(template)], session, (unwrapping,),
            RV.UNWRAPPING_KEY_HANDLE_INVALID,
            lambda m, lid, hs: m.client.unwrap_key(lid, unwrapping, mech, wrapped, template,  # type: ignore[union-attr]
                                                   handle=hs[0], session=session))
        return handles[0]

    async def derive_key(self, login: Login, base: int, mech: MechanismSpec, template: Template,
                         session: int) -> int:
        _, handles = await self.create(
            login, [self._is_token(template)], session, (base,), RV.KEY_HANDLE_INVALID,
            lambda m, lid, hs: m.client.derive_key(lid, base, mech, template, handle=hs[0],  # type: ignore[union-attr]
                                                   session=session))
        return handles[0]

    async def destroy_object(self, login: Login, handle: int) -> None:
        obj = self._entry(handle, RV.OBJECT_HANDLE_INVALID)
        await self.run(login, (handle,), RV.OBJECT_HANDLE_INVALID,
                       lambda m, lid: m.client.destroy_object(lid, handle))  # type: ignore[union-attr]
        if obj.token:
            self.journal.tombstone(handle)
        self.objects.pop(handle, None)
        for hid in obj.holders:
            m = self.members.get(hid)
            if m is not None and m.usable:
                self.spawn_bg(self._destroy_replica(m, handle))

    async def _destroy_replica(self, m: Member, handle: int) -> None:
        try:
            await self.timed(m, m.client.destroy_object(None, handle))  # type: ignore[union-attr]
        except Pkcs11Error as exc:
            if exc.rv not in (RV.OBJECT_HANDLE_INVALID, RV.KEY_HANDLE_INVALID):
                raise

    async def get_attributes(self, login: Login, handle: int,
                             attrs: Sequence[int]) -> list[AttributeResult]:
        slots = await self.run(login, (handle,), RV.OBJECT_HANDLE_INVALID,
                               lambda m, lid: m.client.get_attributes(lid, handle, attrs))  # type: ignore[union-attr, arg-type]
        return list(slots)

    async def _apply_everywhere(self, login: Login, handle: int,
                                fn: Callable[[Member, int], Awaitable[Any]]) -> None:
        """A change to a token object: on one holder first (the HSM checks the user may make
        it), then on every other usable holder; a holder that misses it is reconciled."""
        obj = self._entry(handle, RV.OBJECT_HANDLE_INVALID)
        first: list[str] = []

        async def once(m: Member, lid: int | None) -> None:
            assert lid is not None
            await fn(m, lid)
            first.append(m.hsm_id)

        await self.run(login, (handle,), RV.OBJECT_HANDLE_INVALID, once)
        if not obj.token:
            return
        rec = self._rec(login)
        others = [self.members[h] for h in obj.holders if h in self.members and h not in first]

        async def follow(m: Member) -> None:
            try:
                lid = await self.node_login(m, rec)
                await self.timed(m, fn(m, lid))
            except Exception as exc:
                log.info("change of %s on %s failed (%s): reconciling", handle, m.hsm_id, exc)
                m.converged = False
        await asyncio.gather(*(follow(m) for m in others if m.usable))
        for m in others:
            if not m.usable:
                m.converged = False

    async def set_attributes(self, login: Login, handle: int, template: Template) -> None:
        await self._apply_everywhere(login, handle, lambda m, lid: m.client.set_attributes(  # type: ignore[union-attr]
            lid, handle, template))

    async def share_key(self, login: Login, handle: int, username: str) -> None:
        await self._apply_everywhere(login, handle, lambda m, lid: m.client.share_key(  # type: ignore[union-attr]
            lid, handle, username))

    async def unshare_key(self, login: Login, handle: int, username: str) -> None:
        await self._apply_everywhere(login, handle, lambda m, lid: m.client.unshare_key(  # type: ignore[union-attr]
            lid, handle, username))

    async def find_objects(self, login: Login, template: Template, session: int,
                           as_user: str | None = None) -> list[int]:
        """Handles the login may see that match `template`; an admin's `as_user` narrows them to
        what that crypto user sees (owned, shared with it, public keys)."""
        rec = self._rec(login)
        found: set[int] = set()
        session_homes = {hid for o in self.objects.values()
                         if not o.token and o.login_id == login.login_id for hid in o.holders}

        async def on(m: Member, lid: int | None) -> list[int]:
            assert lid is not None
            return await m.client.find_objects(lid, template, None, as_user)  # type: ignore[union-attr]

        primary: list[int] = await self.run(login, (), RV.OBJECT_HANDLE_INVALID, on)
        found.update(primary)
        for hid in session_homes:
            m = self.members.get(hid)
            if m is None or not m.usable:
                continue
            try:
                lid = await self.node_login(m, rec)
                found.update(await self.timed(m, m.client.find_objects(lid, template, None)))  # type: ignore[union-attr]
            except (NodeUnavailable, Pkcs11Error):
                pass
        out = []
        for h in sorted(found):
            o = self.objects.get(h)
            if o is None or h in self.journal.tombstones:
                continue
            if not o.token and o.login_id != login.login_id:
                continue
            out.append(h)
        return out

    async def close_session(self, login: Login | None, session: int) -> None:
        homes: set[str] = set()
        for h, o in list(self.objects.items()):
            if not o.token and o.session == session and (login is None or o.login_id == login.login_id):
                homes |= o.holders
                del self.objects[h]
        for hid in homes:
            m = self.members.get(hid)
            if m is None or not m.usable:
                continue
            lid = m.logins.get(login.login_id) if login is not None else None
            try:
                await self.timed(m, m.client.close_session(session, lid))  # type: ignore[union-attr]
            except (NodeUnavailable, Pkcs11Error) as exc:
                log.info("close_session on %s: %s", hid, exc)

    # -- ClusterClient: crypto ---------------------------------------------------------------------
    async def encrypt(self, login: Login, handle: int, mech: MechanismSpec, data: bytes) -> EncryptResult:
        r: EncryptResult = await self.run(
            login, (handle,), RV.KEY_HANDLE_INVALID,
            lambda m, lid: m.client.encrypt(lid, handle, mech, data))  # type: ignore[union-attr, arg-type]
        return r

    async def decrypt(self, login: Login, handle: int, mech: MechanismSpec, data: bytes) -> bytes:
        return await self.run(login, (handle,), RV.KEY_HANDLE_INVALID,
                              lambda m, lid: m.client.decrypt(lid, handle, mech, data))  # type: ignore[union-attr, arg-type]

    async def sign(self, login: Login, handle: int, mech: MechanismSpec, data: bytes) -> bytes:
        return await self.run(login, (handle,), RV.KEY_HANDLE_INVALID,
                              lambda m, lid: m.client.sign(lid, handle, mech, data))  # type: ignore[union-attr, arg-type]

    async def verify(self, login: Login, handle: int, mech: MechanismSpec, data: bytes,
                     signature: bytes) -> None:
        await self.run(login, (handle,), RV.KEY_HANDLE_INVALID,
                       lambda m, lid: m.client.verify(lid, handle, mech, data, signature))  # type: ignore[union-attr, arg-type]

    async def wrap_key(self, login: Login, wrapping: int, mech: MechanismSpec, key: int) -> bytes:
        self._entry(wrapping, RV.WRAPPING_KEY_HANDLE_INVALID)
        return await self.run(login, (wrapping, key), RV.KEY_HANDLE_INVALID,
                              lambda m, lid: m.client.wrap_key(lid, wrapping, mech, key))  # type: ignore[union-attr, arg-type]

    async def generate_random(self, login: Login | None, length: int) -> bytes:
        return await self.run(None, (), RV.DEVICE_ERROR,
                              lambda m, lid: m.client.generate_random(length))  # type: ignore[union-attr]

    # -- ClusterClient: users ----------------------------------------------------------------------
    async def create_user(self, login: Login, username: str, role: str, password: str) -> None:
        rec = self._rec(login)
        first: list[Member] = []

        async def once(m: Member, lid: int | None) -> None:
            assert lid is not None
            await m.client.create_user(lid, username, role, password)  # type: ignore[union-attr]
            first.append(m)

        await self.run(login, (), RV.DEVICE_ERROR, once)
        self.journal.append({"t": "user_live", "u": username})
        src = first[0]
        ok = 0
        try:
            blob = await self.timed(src, src.client.export_users())  # type: ignore[union-attr]
            targets = [m for m in self.usable() if m is not src]
            results = await asyncio.gather(
                *(self.timed(m, m.client.import_users(blob)) for m in targets),  # type: ignore[union-attr]
                return_exceptions=True)
            for m, r in zip(targets, results):
                if isinstance(r, BaseException):
                    m.converged = False
                else:
                    ok += 1
        except (NodeUnavailable, Pkcs11Error) as exc:
            log.info("user sync from %s failed: %s", src.hsm_id, exc)
        if ok < self.quorum_needed():
            # Like a key, a user is acknowledged only once 2 HSMs hold it: undo and refuse.
            self.journal.append({"t": "user_tomb", "u": username})
            try:
                lid = await self.node_login(src, rec)
                await self.timed(src, src.client.delete_user(lid, username))  # type: ignore[union-attr]
            except (NodeUnavailable, Pkcs11Error):
                pass  # reconciliation applies the tombstone when the HSM is back
            raise Pkcs11Error(RV.FUNCTION_FAILED, f"user {username} could not be synchronized "
                              "to 2 HSMs")

    async def _user_everywhere(self, login: Login,
                               fn: Callable[[Member, int], Awaitable[Any]]) -> None:
        rec = self._rec(login)
        done: list[str] = []

        async def once(m: Member, lid: int | None) -> None:
            assert lid is not None
            await fn(m, lid)
            done.append(m.hsm_id)

        await self.run(login, (), RV.DEVICE_ERROR, once)

        async def follow(m: Member) -> None:
            try:
                lid = await self.node_login(m, rec)
                await self.timed(m, fn(m, lid))
            except Exception as exc:
                log.info("user change on %s failed (%s)", m.hsm_id, exc)
                m.converged = False
        await asyncio.gather(*(follow(m) for m in self.usable() if m.hsm_id not in done))
        for m in self.members.values():
            if not m.usable:
                m.converged = False

    async def delete_user(self, login: Login, username: str) -> None:
        await self._user_everywhere(login, lambda m, lid: m.client.delete_user(lid, username))  # type: ignore[union-attr]
        self.journal.append({"t": "user_tomb", "u": username})

    async def _credential_change(self, login: Login,
                                 fn: Callable[[Member, int], Awaitable[Any]]) -> None:
        """A change of a user's credential (password, unlock): made on one HSM, whose new
        record (salt, hash, credential version) is then copied to the others, so that every
        HSM holds the same record with the same version. An HSM that misses it gets it when
        it is reconciled (converge_users)."""
        done: list[Member] = []

        async def once(m: Member, lid: int | None) -> None:
            assert lid is not None
            await fn(m, lid)
            done.append(m)

        await self.run(login, (), RV.DEVICE_ERROR, once)
        src = done[0]
        others = [m for m in self.usable() if m is not src]
        if not await self.converge_users([src, *others]):
            for m in others:
                m.converged = False
        for m in self.members.values():
            if not m.usable:
                m.converged = False

    async def change_password(self, login: Login, username: str, password: str) -> None:
        await self._credential_change(login, lambda m, lid: m.client.change_password(  # type: ignore[union-attr]
            lid, username, password))
        rec = self._logins.get(login.login_id)
        if rec is not None and rec.login.username == username:
            rec.password = password

    async def unlock_user(self, login: Login, username: str) -> None:
        await self._credential_change(login, lambda m, lid: m.client.unlock_user(lid, username))  # type: ignore[union-attr]

    async def list_users(self, login: Login) -> list[UserInfo]:
        users = await self.run(login, (), RV.DEVICE_ERROR,
                               lambda m, lid: m.client.list_users(lid))  # type: ignore[union-attr]
        return [UserInfo(u.username, u.role, u.locked, u.failed_logins) for u in users]

    async def converge_users(self, members: Sequence[Member] | None = None) -> bool:
        """Converge the user records of `members` (default: every usable HSM): the first one
        imports every other one's records, then the others import its own; an import keeps,
        per user, the newest credential (hsmsim.node.users.credential_key), so all end with
        the newest record each user has anywhere. Records travel masked (salted hashes, never
        a password); users the cluster deleted are not added back. False if an HSM could not
        take part (it stays behind until its next reconciliation)."""
        ms = [m for m in (self.usable() if members is None else members) if m.client is not None]
        if len(ms) < 2:
            return True
        hub, others = ms[0], ms[1:]
        skip = sorted(self.journal.user_tombstones)
        ok = True

        async def pull(x: Member) -> None:
            blob = await self.timed(x, x.client.export_users())  # type: ignore[union-attr]
            await self.timed(hub, hub.client.import_users(blob, skip))  # type: ignore[union-attr]

        async def push(x: Member, blob: bytes) -> None:
            await self.timed(x, x.client.import_users(blob, skip))  # type: ignore[union-attr]

        for x in others:  # one at a time: the hub's imports are its own store's writes
            try:
                await pull(x)
            except (NodeUnavailable, Pkcs11Error) as exc:
                log.info("user convergence: records of %s not read (%s)", x.hsm_id, exc)
                ok = False
        try:
            blob = await self.timed(hub, hub.client.export_users())  # type: ignore[union-attr]
        except (NodeUnavailable, Pkcs11Error) as exc:
            log.info("user convergence: records of %s not read (%s)", hub.hsm_id, exc)
            return False
        results = await asyncio.gather(*(push(x, blob) for x in others), return_exceptions=True)
        for x, r in zip(others, results):
            if isinstance(r, BaseException):
                log.info("user convergence: %s not updated (%s)", x.hsm_id, r)
                ok = False
        return ok

    async def _user_versions(self, members: Sequence[Member], username: str | None = None
                             ) -> tuple[dict[str, dict[str, int]], set[str]]:
        """({username: {hsm_id: credential version}}, the HSMs that answered)."""
        out: dict[str, dict[str, int]] = {}
        answered: set[str] = set()
        ms = [m for m in members if m.client is not None]
        results = await asyncio.gather(
            *(self.timed(m, m.client.list_users(None)) for m in ms),  # type: ignore[union-attr]
            return_exceptions=True)
        for m, r in zip(ms, results):
            if isinstance(r, BaseException):
                continue
            answered.add(m.hsm_id)
            for u in r:
                if username is None or u.username == username:
                    out.setdefault(u.username, {})[m.hsm_id] = u.version
        return out, answered

    async def _converge_before_login(self, members: Sequence[Member], username: str) -> None:
        """Converge the users first when `username`'s record differs across `members` (an HSM
        that missed a change and has not been reconciled yet). One user listing per HSM (no
        password hash), so a login costs little more than before. FIDELITY: CloudHSM does not
        document this; it keeps a stale HSM from counting failed logins (README, "Fidelity")."""
        try:
            found, answered = await self._user_versions(members, username)
        except Exception as exc:  # best effort: the login itself reports what is wrong
            log.info("user versions before the login of %s not read: %s", username, exc)
            return
        versions = found.get(username, {})
        # An HSM that did not answer (busy) is left to the login itself and reconciliation.
        if versions and (len(set(versions.values())) > 1 or len(versions) < len(answered)):
            log.warning("user %s differs across HSMs (versions %s): converging the user "
                        "records before logging in", username,
                        ", ".join(f"{h}={v}" for h, v in sorted(versions.items())))
            await self.converge_users(members)

    async def list_users_cluster(self) -> list[dict[str, Any]]:
        """`user list` for the CLI (no login, as CloudHSM CLI): each user's coverage across
        the reachable HSMs ("full", or "inconsistent" when an HSM lacks the user or holds
        another version of its record: `versions` maps HSM ids to them)."""
        members = self.usable()
        per: dict[str, dict[str, Any]] = {}
        results = await asyncio.gather(
            *(self.timed(m, m.client.list_users(None)) for m in members),  # type: ignore[union-attr]
            return_exceptions=True)
        ok = 0
        for m, r in zip(members, results):
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

    # -- lifecycle ---------------------------------------------------------------------------------
    async def close(self) -> None:
        self._closing = True
        for t in list(self._bg):
            t.cancel()
        await asyncio.gather(*self._bg, return_exceptions=True)
        await asyncio.gather(*(m.terminate() for m in self.members.values()),
                             return_exceptions=True)
        self.journal.close()

