"""User operations: login and logout (with lockout), bootstrap of the first users, user
management by a CO, and masked export/import of user records for sync."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from hsmsim.node.codec import Fields
from hsmsim.node.context import Conn, Login, Ops
from hsmsim.node.masking import USERS_KIND
from hsmsim.node.users import (UserRecord, check_password, check_role, check_username,
                               decode_user, encode_user, hash_password, role_of, verify_password)
from hsmsim.node.values import ROLE_CO, ROLE_CU
from hsmsim.pkcs11.constants import RV
from hsmsim.pkcs11.errors import Pkcs11Error

# CloudHSM: "If you exceed five incorrect login attempts..."; counted per HSM, so a cluster may
# allow more attempts in total (as CloudHSM documents). FIDELITY: besides a password reset by
# an admin (CloudHSM's way), an admin may also unlock a user without changing its password.
LOCKOUT_AFTER = 5


class UserOps(Ops):
    async def login(self, conn: Conn, f: Fields) -> dict[str, Any]:
        user_type = f.int("user_type")
        role = role_of(user_type)
        username = check_username(f.str("username"))
        password = f.str("password")
        u = self.users.get(username)
        if u is not None and u.locked:
            self.audit.record("login_failed", username=username, role=role, reason="locked")
            raise Pkcs11Error(RV.PIN_LOCKED, "user is locked out; an admin must unlock it")
        ok = False
        if u is not None and 0 < len(password) <= 256:
            ok = await self.ks.in_hsm(verify_password, u, password)
            ok = ok and u.role == role
        if u is None:
            # Same cost and answer as a wrong password: no user enumeration.
            await self.ks.in_hsm(hash_password, password[:256])
            self.audit.record("login_failed", username=username, role=role, reason="unknown")
            raise Pkcs11Error(RV.PIN_INCORRECT, "wrong username or password")
        fresh = self.users.get(username)  # the record may have changed while hashing
        if fresh is None:
            raise Pkcs11Error(RV.PIN_INCORRECT, "wrong username or password")
        if fresh.pw_hash != u.pw_hash:
            ok = False  # the password changed meanwhile: the old one no longer counts
        u = fresh
        if not ok:
            failed = u.failed + 1
            changed = self.users.bump(u, failed=failed, locked=failed >= LOCKOUT_AFTER)
            await self.ks.in_store(self.users.put, changed)
            self.audit.record("login_failed", username=username, role=role, failed=failed,
                              locked=changed.locked)
            raise Pkcs11Error(RV.PIN_INCORRECT, "wrong username or password")
        if u.locked:
            raise Pkcs11Error(RV.PIN_LOCKED, "user is locked out; an admin must unlock it")
        if u.failed:
            await self.ks.in_store(self.users.put, replace(u, failed=0))
        lid = next(self.ctx.login_ids)
        login = Login(lid, username, u.role)
        conn.logins[lid] = login
        self.ctx.logins[lid] = login
        self.audit.record("login", username=username, role=u.role, login_id=lid)
        return {"login_id": lid, "user_type": user_type, "username": username}

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
        salt, digest = await self.ks.in_hsm(hash_password, password)
        return UserRecord(username, role, salt, digest)

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
        salt, digest = await self.ks.in_hsm(hash_password, password)
        u = self._user(username)
        await self.ks.in_store(self.users.put, self.users.bump(u, salt=salt, pw_hash=digest,
                                                               failed=0, locked=False))
        self.audit.record("user_password", username=username, by=login.username)

    async def unlock_user(self, conn: Conn, f: Fields) -> None:
        co = self.co_of(conn, f)
        username = check_username(f.str("username"))
        u = self._user(username)
        await self.ks.in_store(self.users.put, self.users.bump(u, failed=0, locked=False))
        self.audit.record("user_unlock", username=username, by=co.username)

    def list_users(self, conn: Conn, f: Fields) -> list[dict[str, Any]]:
        if not conn.cluster:
            self.login_of(conn, f)
        return [{"username": u.username, "role": u.role, "locked": u.locked,
                 "failed_logins": u.failed} for u in sorted(self.users.users.values(),
                                                            key=lambda u: u.username)]

    def export_users(self) -> bytes:
        masking, _ = self.ks.require_masking()
        return masking.seal(USERS_KIND, {"users": [encode_user(u) for u in
                                                   self.users.users.values()]})

    async def import_users(self, f: Fields) -> int:
        masking, _ = self.ks.require_masking()
        record = masking.open(USERS_KIND, f.bytes("blob"))
        incoming = [decode_user(d) for d in record.get("users", [])]
        changed = 0
        for u in incoming:
            have = self.users.get(u.username)
            if have is None and len(self.users.users) >= self.ctx.max_users:
                raise Pkcs11Error(RV.DEVICE_MEMORY, f"user quota reached ({self.ctx.max_users})")
            if have is None or u.version > have.version:
                await self.ks.in_store(self.users.put, u)
                changed += 1
        if changed:
            self.audit.record("user_import", count=changed)
        return changed
