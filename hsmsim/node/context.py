"""What every node operation shares: the connection's principals (Conn, Login), the node's
state (keystore, users, audit, C-core contexts, live logins), and the access rules an HSM
enforces (roles, visibility, owner, usage flags). The operation families (ops_users,
ops_objects, ops_crypto, ops_keys, ops_masking) build on `Ops`, which binds them to one
NodeContext."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hsmsim.node import engine, policy
from hsmsim.node.audit import AuditLog
from hsmsim.node.codec import Fields
from hsmsim.node.index import ObjectRecord
from hsmsim.node.keystore import Keystore
from hsmsim.node.softhsm import raw_template
from hsmsim.node.users import UserStore
from hsmsim.node.values import ROLE_CO, ROLE_CU
from hsmsim.pkcs11.attributes import Template
from hsmsim.pkcs11.constants import RV, Attribute as A, ObjectClass
from hsmsim.pkcs11.errors import Pkcs11Error

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey


@dataclass(frozen=True)
class Login:
    login_id: int
    username: str
    role: str

    @property
    def is_cu(self) -> bool:
        return self.role == ROLE_CU


@dataclass
class Conn:
    """One client connection's principals."""

    conn_id: int
    nonce: bytes
    cluster: bool = False
    hello: bool = False
    logins: dict[int, Login] = field(default_factory=dict)


class NodeContext:
    """The node's shared state and access rules."""

    def __init__(self, hsm_id: str, az: str, keystore: Keystore, users: UserStore,
                 audit: AuditLog, *, max_users: int) -> None:
        self.hsm_id = hsm_id
        self.az = az
        self.ks = keystore
        self.users = users
        self.audit = audit
        self.max_users = max_users
        self.login_ids = itertools.count(1)
        self.logins: dict[int, Login] = {}  # every live login (ids are node-wide)
        self.engine = engine.ContextCache()
        self.batchers: dict[int, engine.SignBatcher] = {}
        self.clone_key: RSAPrivateKey | None = None

    def login_of(self, conn: Conn, f: Fields) -> Login:
        lid = f.opt_int("login_id")
        login = conn.logins.get(lid) if lid is not None else None
        if login is None:
            raise Pkcs11Error(RV.USER_NOT_LOGGED_IN, "login_id is not a login of this connection")
        return login

    def cu_of(self, conn: Conn, f: Fields) -> Login:
        login = self.login_of(conn, f)
        if not login.is_cu:
            # FIDELITY: CloudHSM lets only crypto users manage and use keys; the error code for
            # an admin trying is not documented, CKR_USER_TYPE_INVALID is our choice.
            raise Pkcs11Error(RV.USER_TYPE_INVALID, "only crypto users can manage or use keys")
        return login

    def co_of(self, conn: Conn, f: Fields) -> Login:
        login = self.login_of(conn, f)
        if login.role != ROLE_CO:
            raise Pkcs11Error(RV.USER_TYPE_INVALID, "only an admin (CO) can manage users")
        return login

    def visible(self, login: Login, r: ObjectRecord) -> bool:
        if r.session and r.login_id != login.login_id:
            return False
        if login.role == ROLE_CO:
            # FIDELITY: admins see every object's non-sensitive attributes (CloudHSM CLI
            # `key list` as admin); they cannot use keys.
            return True
        return sees(login.username, r)

    def record(self, login: Login, handle: int, rv: RV = RV.OBJECT_HANDLE_INVALID) -> ObjectRecord:
        r = self.ks.get(handle)
        if r is None or not self.visible(login, r):
            raise Pkcs11Error(rv, f"object {handle} does not exist or is not visible")
        return r

    def owned(self, login: Login, handle: int, rv: RV = RV.OBJECT_HANDLE_INVALID) -> ObjectRecord:
        r = self.record(login, handle, rv)
        if r.owner != login.username:
            raise Pkcs11Error(RV.ACTION_PROHIBITED, "only the key's owner may do this")
        return r

    def usable(self, login: Login, handle: int, usage: int, mech: int | None = None) -> ObjectRecord:
        """A key the login may use for `usage` (and, when given, with mechanism `mech`:
        CKA_ALLOWED_MECHANISMS, when set and non-empty, lists the only ones allowed)."""
        if not login.is_cu:
            raise Pkcs11Error(RV.USER_TYPE_INVALID, "only crypto users can use keys")
        r = self.record(login, handle, RV.KEY_HANDLE_INVALID)
        if not r.is_key:
            raise Pkcs11Error(RV.KEY_HANDLE_INVALID, "object is not a key")
        if not r.flag(usage):
            raise Pkcs11Error(RV.KEY_FUNCTION_NOT_PERMITTED,
                              f"key does not allow this use (attribute 0x{usage:x} is false)")
        allowed = r.attrs.get(A.ALLOWED_MECHANISMS)
        if mech is not None and isinstance(allowed, list) and allowed and mech not in allowed:
            raise Pkcs11Error(RV.MECHANISM_INVALID, "mechanism not in the key's CKA_ALLOWED_MECHANISMS")
        return r

    async def destroy_records(self, handles: list[int]) -> None:
        for h in handles:
            self.engine.drop(h)
            self.batchers.pop(h, None)
        await self.ks.destroy(handles)

    def new_record(self, login: Login, handle: int, attrs: Template, session: int) -> ObjectRecord:
        token = bool(attrs.get(A.TOKEN, False))
        if not token and not session:
            # FIDELITY: session objects need the caller's session number; 0 is not one.
            raise Pkcs11Error(RV.ARGUMENTS_BAD, "session objects need a session number")
        return ObjectRecord(handle, attrs, login.username, frozenset(),
                            session=0 if token else session,
                            login_id=0 if token else login.login_id)

    async def public_material(self, r: ObjectRecord) -> Template:
        if r.cls == ObjectClass.PUBLIC_KEY:
            return {a: r.attrs[a] for a in policy.PUBLIC_MATERIAL[(r.cls, r.key_type)]  # type: ignore[index]
                    if a in r.attrs}
        value = await self.ks.in_hsm(self.ks.hsm.get_attribute, self.ks.soft_handle(r.handle),
                                     A.VALUE)
        return {A.VALUE: value or b""}

    @staticmethod
    def check_key_type(r: ObjectRecord, cls: int, kt: int) -> None:
        if r.cls != cls or r.key_type != kt:
            raise Pkcs11Error(RV.KEY_TYPE_INCONSISTENT, "key type does not fit the mechanism")


def sees(username: str, r: ObjectRecord) -> bool:
    """What a crypto user sees: the objects it owns, those shared with it, and public keys."""
    return r.owner == username or username in r.shared or r.cls == ObjectClass.PUBLIC_KEY


class Ops:
    """Base of an operation family: the shared context and its access helpers."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self.ks = ctx.ks
        self.users = ctx.users
        self.audit = ctx.audit
        self.engine = ctx.engine
        self.login_of = ctx.login_of
        self.cu_of = ctx.cu_of
        self.co_of = ctx.co_of
        self.visible = ctx.visible
        self.record = ctx.record
        self.owned = ctx.owned
        self.usable = ctx.usable
        self.new_record = ctx.new_record
        self.destroy_records = ctx.destroy_records
        self.public_material = ctx.public_material
        self.check_key_type = ctx.check_key_type

    async def create_from_template(self, rec: ObjectRecord, soft_t: Template) -> None:
        """Creates `rec` in SoftHSM2 as one object of `soft_t`, its template with the value
        given, unwrapped or derived in this process (C_CreateObject, C_UnwrapKey,
        C_DeriveKey), and clears the template, the key material with it, whatever the outcome."""
        hsm = self.ks.hsm

        def make() -> list[int]:
            return [hsm.create_object(raw_template(soft_t.items()))]
        try:
            await self.ks.create([rec], make)
        finally:
            soft_t.clear()
