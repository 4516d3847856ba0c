"""An in-memory stand-in for `ClusterClient`, used ONLY by the KMS's own ring-1 logic tests
(operations, blob, keystores state machine) so they run without node processes. It is never
shipped: rings 2 and 3 run against the real daemon and cluster.

It models what the KMS relies on: users with passwords and lockout, logins, non-extractable
AES keys with labels, AES-GCM with an HSM-generated IV, random bytes, and cluster info."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hsmsim.cluster.api import AttributeResult, ClusterInfo, EncryptResult, HsmInfo, Login, UserInfo
from hsmsim.pkcs11.constants import RV, Attribute, Mechanism, UserType
from hsmsim.pkcs11.errors import Pkcs11Error
from hsmsim.pkcs11.params import GcmParams, MechanismSpec


@dataclass
class _User:
    role: str
    password: str
    failed: int = 0
    external_logins: int = 0  # logins by applications other than the KMS


@dataclass(frozen=True)
class _UserInfoWithLogins(UserInfo):
    logged_in: int = 0


@dataclass
class InMemoryClusterDouble:
    cluster_id: str = "cluster-abcdefghij234"
    state: str = "ACTIVE"
    ca_cert_pem: bytes = b""
    hsms: list[HsmInfo] = field(default_factory=lambda: [
        HsmInfo("hsm-aaaaaaaaaaa", "us-east-1a", "ACTIVE", 0, 0, None),
        HsmInfo("hsm-bbbbbbbbbbb", "us-east-1b", "ACTIVE", 0, 0, None)])
    users: dict[str, _User] = field(default_factory=dict)
    objects: dict[int, dict[str, Any]] = field(default_factory=dict)
    logins: dict[int, Login] = field(default_factory=dict)
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        self.users.setdefault("admin", _User("admin", "adminpw1"))

    async def info(self) -> ClusterInfo:
        return ClusterInfo(self.cluster_id, self.state, tuple(self.hsms), self.ca_cert_pem)

    async def login(self, user_type: UserType, username: str, password: str) -> Login:
        await asyncio.sleep(0)  # a real cluster answers later: let other requests interleave
        if not any(h.state == "ACTIVE" for h in self.hsms):
            raise Pkcs11Error(RV.DEVICE_ERROR)
        u = self.users.get(username)
        if u is None:
            raise Pkcs11Error(RV.PIN_INCORRECT)
        if u.failed >= 5:
            raise Pkcs11Error(RV.PIN_LOCKED)
        if u.password != password:
            u.failed += 1
            raise Pkcs11Error(RV.PIN_INCORRECT)
        u.failed = 0
        login = Login(next(self._ids), user_type, username)
        self.logins[login.login_id] = login
        return login

    async def logout(self, login: Login) -> None:
        self.logins.pop(login.login_id, None)

    def _check(self, login: Login | None) -> None:
        if login is None or login.login_id not in self.logins:
            raise Pkcs11Error(RV.USER_NOT_LOGGED_IN)
        if not any(h.state == "ACTIVE" for h in self.hsms):
            raise Pkcs11Error(RV.DEVICE_ERROR)

    async def generate_key(self, login: Login, mech: MechanismSpec, template: dict[int, Any],
                           session: int) -> int:
        await asyncio.sleep(0)
        self._check(login)
        handle = next(self._ids)
        self.objects[handle] = {"owner": login.username, "value": os.urandom(int(template[Attribute.VALUE_LEN])),
                                "label": template.get(Attribute.LABEL), "class": template.get(Attribute.CLASS)}
        return handle

    async def find_objects(self, login: Login, template: dict[int, Any], session: int) -> list[int]:
        await asyncio.sleep(0)
        self._check(login)
        return [h for h, o in self.objects.items() if o["owner"] == login.username
                and o["label"] == template.get(Attribute.LABEL)]

    async def destroy_object(self, login: Login, handle: int) -> None:
        self._check(login)
        if handle not in self.objects:
            raise Pkcs11Error(RV.OBJECT_HANDLE_INVALID)
        del self.objects[handle]

    def _key(self, login: Login, handle: int) -> bytes:
        self._check(login)
        obj = self.objects.get(handle)
        if obj is None or obj["owner"] != login.username:
            raise Pkcs11Error(RV.KEY_HANDLE_INVALID)
        return bytes(obj["value"])

    async def encrypt(self, login: Login, handle: int, mech: MechanismSpec, data: bytes) -> EncryptResult:
        key = self._key(login, handle)
        assert mech.mechanism == Mechanism.AES_GCM and isinstance(mech.param, GcmParams)
        iv = os.urandom(12)
        return EncryptResult(AESGCM(key).encrypt(iv, data, mech.param.aad), iv)

    async def decrypt(self, login: Login, handle: int, mech: MechanismSpec, data: bytes) -> bytes:
        key = self._key(login, handle)
        assert isinstance(mech.param, GcmParams)
        try:
            return AESGCM(key).decrypt(mech.param.iv, data, mech.param.aad)
        except InvalidTag:
            raise Pkcs11Error(RV.ENCRYPTED_DATA_INVALID) from None

    async def generate_random(self, login: Login | None, length: int) -> bytes:
        if not any(h.state == "ACTIVE" for h in self.hsms):
            raise Pkcs11Error(RV.DEVICE_ERROR)
        return os.urandom(length)

    async def create_user(self, login: Login, username: str, role: str, password: str) -> None:
        self._check(login)
        self.users[username] = _User(role, password)

    async def delete_user(self, login: Login, username: str) -> None:
        self._check(login)
        self.users.pop(username, None)

    async def change_password(self, login: Login, username: str, password: str) -> None:
        self._check(login)
        self.users[username].password = password

    async def list_users(self, login: Login) -> list[UserInfo]:
        self._check(login)
        return [_UserInfoWithLogins(n, u.role, u.failed >= 5, u.failed,
                                    sum(1 for g in self.logins.values() if g.username == n) + u.external_logins)
                for n, u in self.users.items()]

    async def get_attributes(self, login: Login, handle: int, attrs: Sequence[int]) -> list[AttributeResult]:
        raise NotImplementedError

    async def close_session(self, login: Login | None, session: int) -> None:
        return None
