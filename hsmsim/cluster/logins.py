"""Application logins: one C_Login logs the application in on every HSM (as CloudHSM's
client does), HSMs that join or restart later get the login on first use or before they take
traffic, and refusals by an HSM whose user records lag are remembered so that a stale
password does not count towards the user's lockout there."""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass

from hsmsim.cluster.api import Login
from hsmsim.cluster.directory import Directory
from hsmsim.cluster.members import Member
from hsmsim.cluster.pool import Pool
from hsmsim.cluster.tickets import Tickets
from hsmsim.cluster.usersync import UserSync
from hsmsim.node.client import NodeClient, NodeThrottled, NodeUnavailable
from hsmsim.node.values import LoginInfo
from hsmsim.pkcs11.constants import RV, UserType
from hsmsim.pkcs11.errors import Pkcs11Error

log = logging.getLogger("hsmsim.cluster")


@dataclass
class LoginRecord:
    login: Login
    # FIDELITY: like the CloudHSM client, the daemon keeps the application's credentials in
    # memory (never on disk or in logs) to log it in to an HSM that joins or restarts later.
    password: str


class Logins:
    def __init__(self, pool: Pool, directory: Directory, users: UserSync,
                 tickets: Tickets) -> None:
        self.pool, self.directory, self.users, self.tickets = pool, directory, users, tickets
        self._records: dict[int, LoginRecord] = {}
        self._ids = itertools.count(1)

    def rec(self, login: Login) -> LoginRecord:
        rec = self._records.get(login.login_id)
        if rec is None:
            raise Pkcs11Error(RV.USER_NOT_LOGGED_IN, "the application is not logged in")
        return rec

    def active(self, login: Login) -> bool:
        return login.login_id in self._records

    def password_changed(self, login: Login, username: str, password: str) -> None:
        """The application changed `username`'s password: later logins on HSMs use it."""
        rec = self._records.get(login.login_id)
        if rec is not None and rec.login.username == username:
            rec.password = password

    # -- one HSM ---------------------------------------------------------------------------------
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
        client, gen = member.connection(), member.generation
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        member.login_pending[rec.login.login_id] = fut
        try:
            try:
                info = await self._login_on(member, client, rec.login.user_type,
                                            rec.login.username, rec.password)
            except Pkcs11Error as exc:
                if not isinstance(exc, NodeThrottled):
                    # Do not try again on this HSM until it reconnects (or, once, as the last
                    # HSM left for a request: Router._retry_refused): a stale password would
                    # otherwise count towards the user's lockout on every request.
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
        answering is NodeBusy, never a reason to mark it down: see Pool._timed_out)."""
        async with m.login_window:
            if client.closed:
                raise NodeUnavailable(f"{m.hsm_id} is not connected")
            return await self.pool.timed(m, client.login(user_type, username, password),
                                         timeout=max(30.0, self.pool.config.request_timeout_s))

    async def prelogin(self, m: Member) -> None:
        """Log every application in on a member before it takes traffic again, so that no
        request pays for a login (a slow password hash) on the way."""
        recs = [r for r in self._records.values() if r.login.login_id not in m.logins]
        results = await asyncio.gather(*(self.node_login(m, r) for r in recs),
                                       return_exceptions=True)
        for r, res in zip(recs, results):
            if isinstance(res, BaseException):
                log.info("login of %s on %s failed: %s", r.login.username, m.hsm_id, res)

    # -- the application -------------------------------------------------------------------------
    async def login(self, user_type: UserType, username: str, password: str) -> Login:
        pool = self.pool
        members = [(m, m.client) for m in pool.usable() if m.client is not None]
        if not members:
            raise Pkcs11Error(RV.DEVICE_ERROR, "no HSM of the cluster is reachable")
        # Converge first, then log in: a password sent to an HSM holding an older record of the
        # user would count as a failed login there, and the lockout is per HSM.
        await self.users.converge_before_login([m for m, _ in members], username)
        results = await asyncio.gather(
            *(self._login_on(m, client, user_type, username, password) for m, client in members),
            return_exceptions=True)
        ok: list[tuple[Member, NodeClient, int]] = []
        errors: list[Pkcs11Error] = []
        for (m, client), r in zip(members, results):
            if isinstance(r, Pkcs11Error) and not isinstance(r, NodeThrottled):
                errors.append(r)
            elif isinstance(r, BaseException):
                if isinstance(r, NodeUnavailable):
                    m.mark_down(str(r))
            else:
                ok.append((m, client, r.login_id))
        # A locked account anywhere, or a refusal by every HSM, fails the login. An HSM that
        # refused while others accepted (a user not yet synced to it) is retried lazily.
        locked = [e for e in errors if e.rv == RV.PIN_LOCKED]
        if errors and ok and not locked:
            # Never hidden: the user's records still differ (an HSM unreachable while they
            # converged, or a change racing this login). Reported with counts, and converged
            # now in the background; that HSM is not asked again for this login (node_login).
            refused = [m.hsm_id for (m, _), r in zip(members, results)
                       if isinstance(r, Pkcs11Error) and not isinstance(r, NodeThrottled)]
            log.warning("login of %s refused by %d of %d HSMs (%s: CKR_%s) while the others "
                        "accepted it: its user records differ; converging them",
                        username, len(refused), len(members), ", ".join(refused),
                        errors[0].rv.name)
            pool.spawn_bg(self.users.converge(), "converge-users")
        if locked or not ok:
            for m, client, lid in ok:
                pool.spawn_bg(pool.quiet(client.logout(lid)))
            if locked:
                raise locked[0]
            if errors:
                raise errors[0]
            raise Pkcs11Error(RV.DEVICE_ERROR, "no HSM of the cluster answered the login")
        login = Login(next(self._ids), UserType(int(user_type)), username)
        self._records[login.login_id] = LoginRecord(login, password)
        for m, _, lid in ok:
            m.logins[login.login_id] = lid
        # the direct path's tickets, one per HSM (docs/direct-protocol.md)
        await asyncio.gather(*(self.tickets.fetch(m, client, lid) for m, client, lid in ok),
                             return_exceptions=True)
        return login

    async def logout(self, login: Login) -> None:
        rec = self._records.pop(login.login_id, None)
        self.directory.on_logout(login.login_id)
        if rec is None:
            raise Pkcs11Error(RV.USER_NOT_LOGGED_IN, "the application is not logged in")
        calls = []
        for m in self.pool.members.values():
            lid = m.logins.pop(login.login_id, None)
            if lid is None:
                continue
            self.tickets.forget(m, lid)
            if m.usable and m.client is not None:
                calls.append(self.pool.quiet(self.pool.timed(m, m.client.logout(lid))))
        await asyncio.gather(*calls)
