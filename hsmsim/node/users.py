"""HSM users of one node: CO and CU records with scrypt-hashed passwords (per-user salt),
consecutive-failure counting and lockout, persisted in the node's SQLite file.

Passwords are never stored, logged or returned; only (salt, scrypt hash) are kept. Hashing
is slow on purpose, so callers run `hash_password`/`verify_password` in a worker thread (the
node's bounded password-hashing pool, hsmsim.node.ops_users)."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import sqlite3
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import msgpack

from hsmsim.node.values import ROLE_CO, ROLE_CU, ROLES
from hsmsim.pkcs11.constants import RV, UserType
from hsmsim.pkcs11.errors import Pkcs11Error

# FIDELITY: CloudHSM documents the 31-character limit and lowercase storage, not the exact
# character set; we allow letters, digits, '_' and '-'.
USERNAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,30}$")
PASSWORD_LEN = (8, 32)  # CloudHSM hsm2m.medium (reference §2.6)
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 14, 8, 1
SALT_LEN = 16


@dataclass(frozen=True)
class UserRecord:
    username: str
    role: str
    salt: bytes
    pw_hash: bytes
    failed: int = 0
    locked: bool = False
    # This node's revision of the record, bumped on every change (a counted failure too): the
    # record in memory only moves forward (UserStore.put). Never compared across HSMs.
    version: int = 1
    # FIDELITY: CloudHSM does not document how HSMs reconcile users after an outage; hsmsim
    # converges them by this version (README, "Fidelity"). The credential's version, kept by the
    # cluster: set by a change an admin or the user makes
    # (create, password change, unlock: see next_cred_version) and carried as is by export and
    # import. The credential (role, salt, hash) with the highest (cred_version, hash, salt)
    # wins when HSMs converge. Failed-login counts and the lockout stay per HSM (CloudHSM:
    # "counted per node") and never change it.
    cred_version: int = 0

    @property
    def user_type(self) -> int:
        return int(UserType.SO) if self.role == ROLE_CO else int(UserType.USER)


def next_cred_version(previous: int) -> int:
    """The credential version of a change made now: above `previous` (per user, monotonic) and
    at least the wall clock in microseconds, so that changes made on different HSMs while they
    could not see each other are ordered by when they were made (a hybrid logical clock; the
    HSMs of a cluster share one host clock here)."""
    return max(previous + 1, time.time_ns() // 1000)


def credential_key(u: UserRecord) -> tuple[int, bytes, bytes]:
    """Order of credentials across HSMs: the newest wins; an exact tie on the version (two
    changes in the same microsecond) is broken by the hash, the same way on every HSM."""
    return (u.cred_version, u.pw_hash, u.salt)


def role_of(user_type: int) -> str:
    if user_type == UserType.SO:
        return ROLE_CO
    if user_type == UserType.USER:
        return ROLE_CU
    raise Pkcs11Error(RV.USER_TYPE_INVALID, "user_type must be 0 (CO) or 1 (CU)")


def check_username(username: object) -> str:
    """CloudHSM usernames: up to 31 characters, stored lowercase."""
    if not isinstance(username, str):
        raise Pkcs11Error(RV.ARGUMENTS_BAD, "username must be a string")
    name = username.lower()
    if not USERNAME.match(name):
        raise Pkcs11Error(RV.ARGUMENTS_BAD, "username must be 1-31 of [a-z0-9_-], starting "
                          "with a letter or digit")
    return name


def check_role(role: object) -> str:
    if role not in ROLES:
        raise Pkcs11Error(RV.ARGUMENTS_BAD, f"role must be one of {', '.join(ROLES)}")
    return str(role)


def check_password(password: object) -> str:
    if not isinstance(password, str):
        raise Pkcs11Error(RV.ARGUMENTS_BAD, "password must be a string")
    if not PASSWORD_LEN[0] <= len(password) <= PASSWORD_LEN[1]:
        raise Pkcs11Error(RV.PIN_LEN_RANGE,
                          f"passwords are {PASSWORD_LEN[0]} to {PASSWORD_LEN[1]} characters")
    return password


def hash_password(password: str, salt: bytes | None = None) -> tuple[bytes, bytes]:
    salt = salt if salt is not None else os.urandom(SALT_LEN)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                            dklen=32)
    return salt, digest


def verify_password(record: UserRecord, password: str) -> bool:
    _, digest = hash_password(password, record.salt)
    return hmac.compare_digest(digest, record.pw_hash)


def encode_user(u: UserRecord) -> dict[str, object]:
    return {"username": u.username, "role": u.role, "salt": u.salt, "hash": u.pw_hash,
            "failed": u.failed, "locked": u.locked, "version": u.version,
            "cred_version": u.cred_version}


def decode_user(d: dict[str, object]) -> UserRecord:
    try:
        salt, digest = d["salt"], d["hash"]
        if not isinstance(salt, bytes) or not isinstance(digest, bytes):
            raise TypeError("salt and hash must be bytes")
        version = int(d["version"])  # type: ignore[call-overload]
        # A record written before credential versions existed: its revision stands in.
        cred = int(d.get("cred_version", version))  # type: ignore[call-overload]
        u = UserRecord(check_username(d["username"]), check_role(d["role"]), salt, digest,
                       int(d["failed"]), bool(d["locked"]), version, cred)  # type: ignore[call-overload]
    except (KeyError, TypeError, ValueError):
        raise Pkcs11Error(RV.WRAPPED_KEY_INVALID, "malformed user record") from None
    return u


class UserStore:
    """Users in memory, persisted to the `users` table of the node's SQLite file. Mutations are
    made from the node's store thread."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS users (username TEXT PRIMARY KEY, "
                         "record BLOB NOT NULL)")
        self.users: dict[str, UserRecord] = {}
        # `put` (store thread) and `stage` (event loop) both move records in memory: the
        # compare-and-set below must not interleave with a stage, or a newer count is lost.
        self._memory = threading.Lock()
        for name, raw in self._db.execute("SELECT username, record FROM users"):
            self.users[name] = decode_user(msgpack.unpackb(raw, raw=False))

    def get(self, username: str) -> UserRecord | None:
        return self.users.get(username)

    def put(self, u: UserRecord) -> None:
        """Persist `u` (store thread). The record in memory only moves forward: a change staged
        on the event loop since (`stage`) is newer and stays."""
        self._db.execute("INSERT OR REPLACE INTO users VALUES (?, ?)",
                         (u.username, msgpack.packb(encode_user(u), use_bin_type=True)))
        with self._memory:
            have = self.users.get(u.username)
            if have is None or have.version <= u.version:
                self.users[u.username] = u

    def stage(self, u: UserRecord) -> None:
        """Make `u` the record in memory now (event loop), before its `put` is persisted, so
        that the next request reads it: login failures are counted with no lost increments."""
        with self._memory:
            self.users[u.username] = u

    def delete(self, username: str) -> None:
        self._db.execute("DELETE FROM users WHERE username = ?", (username,))
        with self._memory:
            self.users.pop(username, None)

    def bump(self, u: UserRecord, **changes: object) -> UserRecord:
        return replace(u, version=u.version + 1, **changes)  # type: ignore[arg-type]

    def close(self) -> None:
        self._db.close()
