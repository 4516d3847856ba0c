"""User operations: login and logout (with lockout), bootstrap of the first users, user
management by a CO, and masked export/import of user records for sync."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn, TypeVar

from hsmsim.node.codec import Fields
from hsmsim.node.context import Conn, Login, NodeContext, Ops
from hsmsim.node.masking import USERS_KIND
from hsmsim.node.users import (UserRecord, check_password, check_role, check_username,
                               credential_key, decode_user, encode_user, hash_password,
                               next_cred_version, role_of, verify_password)
from hsmsim.node.values import ROLE_CO, ROLE_CU
from hsmsim.pkcs11.constants import RV
from hsmsim.pkcs11.errors import Pkcs11Error

# CloudHSM: "If you exceed five incorrect login attempts..."; counted per HSM, so a cluster may
# allow more attempts in total (as CloudHSM documents). FIDELITY: besides a password reset by
# an admin (CloudHSM's way), an admin may also unlock a user without changing its password.
LOCKOUT_AFTER = 5
# Password hashes (scrypt, slow on purpose) run in their own small pool, so that a burst of
# logins queues there and never in front of key operations (the crypto pool), health checks
# or other traffic. FIDELITY: CloudHSM does not document how an HSM schedules logins.
HASH_THREADS = 2
T = TypeVar("T")


class _Gate:
    """Login attempts of one user on this node: `pending` verifications in flight. An attempt
    is admitted only while failures so far plus attempts in flight stay below LOCKOUT_AFTER,
    so even if every one of them fails, no more than LOCKOUT_AFTER failures are ever verified;
    the others wait, then find the user locked (or not) as a sequential attempt would."""

    __slots__ = ("pending", "users", "changed")

    def __init__(self) -> None:
        self.pending = 0
        self.users = 0  # attempts holding this gate (it is dropped when none does)
        self.changed = asyncio.Condition()


def _retrieved(task: "asyncio.Future[Any]") -> None:
    """An attempt whose caller went away still ends in an answer nobody reads: no warning."""
    if not task.cancelled():
        task.exception()


class UserOps(Ops):
    def __init__(self, ctx: NodeContext) -> None:
        super().__init__(ctx)
        self._hashing = ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="node-kdf")
        self._gates: dict[str, _Gate] = {}

    async def _hash(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._hashing, fn, *args)

    async def login(self, conn: Conn, f: Fields) -> dict[str, Any]:
        user_type = f.int("user_type")
        role = role_of(user_type)
        username = check_username(f.str("username"))
        password = f.str("password")
        if self.users.get(username) is None:
            await self._unknown(username, role, password)
        # Check the lock, verify and count as one step per user (see _Gate); shielded so that a
        # client that hangs up mid-hash cannot take its attempt back uncounted.
        attempt = asyncio.ensure_future(self._attempt(username, role, password))
        attempt.add_done_callback(_retrieved)
        u, lid = await asyncio.shield(attempt)
        login = Login(lid, username, u.role)
        conn.logins[lid] = login
        self.ctx.logins[lid] = login
        return {"login_id": lid, "user_type": user_type, "username": username}

    async def _unknown(self, username: str, role: str, password: str) -> NoReturn:
        # Same cost and answer as a wrong password: no user enumeration.
        await self._hash(hash_password, password[:256])
        self.audit.record("login_failed", username=username, role=role, reason="unknown")
        raise Pkcs11Error(RV.PIN_INCORRECT, "wrong username or password")

    async def _attempt(self, username: str, role: str,
                       password: str) -> tuple[UserRecord, int]:
        """One login attempt: the user's record and a new login id once the password is
        verified (audited as `login`), or PIN_LOCKED /
        PIN_INCORRECT. Once locked, every attempt gets PIN_LOCKED without hashing, whatever the
        password, so the answer after the lock says nothing about the password."""
        gate = self._gates.setdefault(username, _Gate())
        gate.users += 1
        try:
            async with gate.changed:
                while True:
                    u = self.users.get(username)
                    if u is None:
                        break
                    if u.locked:
                        self.audit.record("login_failed", username=username, role=role,
                                          reason="locked")
                        raise Pkcs11Error(RV.PIN_LOCKED,
                                          "user is locked out; an admin must unlock it")
                    if gate.pending == 0 or u.failed + gate.pending < LOCKOUT_AFTER:
                        gate.pending += 1
                        break
                    await gate.changed.wait()
            if u is None:  # deleted while this attempt waited
                await self._unknown(username, role, password)
            return await self._verify(gate, u, role, password)
        finally:
            gate.users -= 1
            if gate.users == 0:
                self._gates.pop(username, None)

    async def _verify(self, gate: _Gate, u: UserRecord, role: str,
                      password: str) -> tuple[UserRecord, int]:
        """Verify an admitted attempt and count its outcome (see _attempt)."""
        username = u.username
        verified = False
        lid = 0
        try:
            ok = 0 < len(password) <= 256 and await self._hash(verify_password, u, password)
            verified = True
        finally:
            async with gate.changed:
                gate.pending -= 1
                gate.changed.notify_all()
                # Counted from the record as it is now, staged and audited in the same step (no
                # await in between): concurrent failures never overwrite each other's count,
                # and the audit log shows the count in the order it moved.
                fresh = self.users.get(username)
                changed: UserRecord | None = None
                if verified and fresh is not None and not fresh.locked:
                    if fresh.pw_hash != u.pw_hash:
                        ok = False  # the password changed meanwhile: the old one no longer counts
                    ok = ok and fresh.role == role
                    if not ok:
                        failed = fresh.failed + 1
                        changed = self.users.bump(fresh, failed=failed,
                                                  locked=failed >= LOCKOUT_AFTER)
                        self.audit.record("login_failed", username=username, role=role,
                                          failed=changed.failed, locked=changed.locked)
                    else:
                        if fresh.failed:
                            changed = self.users.bump(fresh, failed=0)
                        lid = next(self.ctx.login_ids)
                        self.audit.record("login", username=username, role=fresh.role,
                                          login_id=lid)
                    if changed is not None:
                        self.users.stage(changed)
        # Persisted in staging order: the store thread runs one job at a time, in order.
        if changed is not None:
            await self.ks.in_store(self.users.put, changed)
        if fresh is None:  # deleted meanwhile
            raise Pkcs11Error(RV.PIN_INCORRECT, "wrong username or password")
        if fresh.locked:  # locked meanwhile by an import (cluster sync)
            self.audit.record("login_failed", username=username, role=role, reason="locked")
            raise Pkcs11Error(RV.PIN_LOCKED, "user is locked out; an admin must unlock it")
        if not ok:
            # The count is for the daemon's log (the client sees only the code), as CloudHSM's
            # client logs report failed logins against the lockout.
            counted = (f" ({changed.failed} of {LOCKOUT_AFTER} failed logins before lockout on "
                       f"this HSM{'; now locked' if changed.locked else ''})"
                       if changed is not None and changed.failed else "")
            raise Pkcs11Error(RV.PIN_INCORRECT, f"wrong username or password{counted}")
        return changed or fresh, lid

    async def logout(self, conn: Conn, f: Fields) -> None:
        login = self.login_of(conn, f)
        del conn.logins[login.login_id]
        self.ctx.logins.pop(login.login_id, None)
        doomed = [r.handle for r in self.ks.catalog.records.values()
                  if r.session and r.login_id == login.login_id]
        if doomed:
            await self.destroy_records(doomed)
        self.audit.record("logout", username=login.username, login_id=login.login_id)

    async def _new_user(self, username: str, role: str, password: str) -> UserRecord:
        salt, digest = await self._hash(hash_password, password)
        return UserRecord(username, role, salt, digest, cred_version=next_cred_version(0))

    async def initialize_users(self, conn: Conn, f: Fields) -> None:
        co, cu = check_username(f.str("co_username")), check_username(f.str("cu_username"))
        co_pw, cu_pw = check_password(f.str("co_password")), check_password(f.str("cu_password"))
        if co == cu:
            raise Pkcs11Error(RV.ARGUMENTS_BAD, "the CO and CU need different usernames")
        if self.users.users:
            raise Pkcs11Error(RV.ACTION_PROHIBITED, "users are already initialised")
        a = await self._new_user(co, ROLE_CO, co_pw)
        b = await self._new_user(cu, ROLE_CU, cu_pw)
        if self.users.users:
            raise Pkcs11Error(RV.ACTION_PROHIBITED, "users are already initialised")
        await self.ks.in_store(self.users.put, a)
        await self.ks.in_store(self.users.put, b)
        self.audit.record("user_create", username=co, role=ROLE_CO, by="cluster")
        self.audit.record("user_create", username=cu, role=ROLE_CU, by="cluster")

    async def create_user(self, conn: Conn, f: Fields) -> None:
        co = self.co_of(conn, f)
        username, role = check_username(f.str("username")), check_role(f.str("role"))
        password = check_password(f.str("password"))
        if username in self.users.users:
            raise Pkcs11Error(RV.ARGUMENTS_BAD, f"user {username} already exists")
        if len(self.users.users) >= self.ctx.max_users:
            raise Pkcs11Error(RV.DEVICE_MEMORY, f"user quota reached ({self.ctx.max_users} per HSM)")
        u = await self._new_user(username, role, password)
        if username in self.users.users:
            raise Pkcs11Error(RV.ARGUMENTS_BAD, f"user {username} already exists")
        await self.ks.in_store(self.users.put, u)
        self.audit.record("user_create", username=username, role=role, by=co.username)

    def _user(self, username: str) -> UserRecord:
        u = self.users.get(username)
        if u is None:
            raise Pkcs11Error(RV.ARGUMENTS_BAD, f"no user {username}")
        return u

    async def delete_user(self, conn: Conn, f: Fields) -> None:
        co = self.co_of(conn, f)
        username = check_username(f.str("username"))
        u = self._user(username)
        if username == co.username:
            raise Pkcs11Error(RV.ACTION_PROHIBITED, "an admin cannot delete itself")
        if u.role == ROLE_CO and sum(1 for x in self.users.users.values() if x.role == ROLE_CO) <= 1:
            raise Pkcs11Error(RV.ACTION_PROHIBITED, "the last admin cannot be deleted")
        if any(r.owner == username for r in self.ks.catalog.records.values()):
            raise Pkcs11Error(RV.ACTION_PROHIBITED, f"user {username} still owns keys")
        await self.ks.in_store(self.users.delete, username)
        for lid, login in list(self.ctx.logins.items()):
            if login.username == username:
                self.ctx.logins.pop(lid, None)
        if conn.logins:
            for lid in [i for i, lg in conn.logins.items() if lg.username == username]:
                conn.logins.pop(lid, None)
        self.audit.record("user_delete", username=username, by=co.username)

    async def change_password(self, conn: Conn, f: Fields) -> None:
        login = self.login_of(conn, f)
        username = check_username(f.str("username"))
        password = check_password(f.str("password"))
        if login.username != username and login.role != ROLE_CO:
            raise Pkcs11Error(RV.USER_TYPE_INVALID, "only an admin may change another user's password")
        u = self._user(username)
        salt, digest = await self._hash(hash_password, password)
        u = self._user(username)
        u = self.users.bump(u, salt=salt, pw_hash=digest, failed=0, locked=False,
                            cred_version=next_cred_version(u.cred_version))
        self.users.stage(u)
        await self.ks.in_store(self.users.put, u)
        self.audit.record("user_password", username=username, by=login.username)

    async def unlock_user(self, conn: Conn, f: Fields) -> None:
        co = self.co_of(conn, f)
        username = check_username(f.str("username"))
        # An unlock is an admin's change that every HSM must see (like a password reset), so it
        # moves the credential version: an HSM that was down gets it when it returns.
        u = self._user(username)
        u = self.users.bump(u, failed=0, locked=False,
                            cred_version=next_cred_version(u.cred_version))
        self.users.stage(u)
        await self.ks.in_store(self.users.put, u)
        self.audit.record("user_unlock", username=username, by=co.username)

    def list_users(self, conn: Conn, f: Fields) -> list[dict[str, Any]]:
        if not conn.cluster:
            self.login_of(conn, f)
        return [{"username": u.username, "role": u.role, "locked": u.locked,
                 "failed_logins": u.failed, "version": u.cred_version} for u in sorted(self.users.users.values(),
                                                            key=lambda u: u.username)]

    def export_users(self) -> bytes:
        masking, _ = self.ks.require_masking()
        return masking.seal(USERS_KIND, {"users": [encode_user(u) for u in
                                                   self.users.users.values()]})

    async def import_users(self, f: Fields) -> int:
        """Converge this node's users with a blob of another node's (cluster sync): a user this
        node lacks is added, unless named in `skip` (users the cluster deleted: an HSM that
        missed the deletion must not bring them back); a user it has takes the incoming
        credential (role, salt, hash, credential version) only if that one is newer (see
        users.credential_key). The failure count and lock of this node are not imported: they
        are per HSM (CloudHSM); a newer credential clears them here, as the password change or
        unlock it carries did on the HSMs that saw it."""
        masking, _ = self.ks.require_masking()
        record = masking.open(USERS_KIND, f.bytes("blob"))
        skip_raw = f.raw("skip") or []
        if not isinstance(skip_raw, list) or not all(isinstance(x, str) for x in skip_raw):
            raise Pkcs11Error(RV.ARGUMENTS_BAD, "field 'skip' must be a list of usernames")
        skip = set(skip_raw)
        incoming = [decode_user(d) for d in record.get("users", [])]
        changed = 0
        for u in incoming:
            have = self.users.get(u.username)
            if have is None:
                if u.username in skip:
                    continue
                if len(self.users.users) >= self.ctx.max_users:
                    raise Pkcs11Error(RV.DEVICE_MEMORY,
                                      f"user quota reached ({self.ctx.max_users})")
                new = UserRecord(u.username, u.role, u.salt, u.pw_hash,
                                 cred_version=u.cred_version)
            elif credential_key(u) > credential_key(have):
                new = self.users.bump(have, role=u.role, salt=u.salt, pw_hash=u.pw_hash,
                                      cred_version=u.cred_version, failed=0, locked=False)
            else:
                continue
            self.users.stage(new)
            await self.ks.in_store(self.users.put, new)
            changed += 1
            self.audit.record("user_import", username=u.username, version=u.cred_version)
        return changed
