"""The node's operations: users and logins, objects, crypto, masking, cloning, audit and
status, with the access rules an HSM enforces (roles, owner, sharing, usage flags,
sensitive/extractable, quotas). Wire-independent except for the typed `Fields` accessor.

Every method raises Pkcs11Error on failure and changes nothing when it does."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import logging
import os
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa as pyca_rsa
from cryptography.hazmat.primitives.keywrap import (InvalidUnwrap, aes_key_unwrap,
                                                    aes_key_unwrap_with_padding, aes_key_wrap,
                                                    aes_key_wrap_with_padding)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from hsmsim.core import AesGcmKey, RsaPrivateKey, RsaPublicKey
from hsmsim.node import engine, policy
from hsmsim.node.audit import AuditLog
from hsmsim.node.codec import Fields, results_to_wire, template_to_wire
from hsmsim.node.index import ObjectRecord, encode_record
from hsmsim.node.keystore import Keystore, value_len
from hsmsim.node.masking import OBJECT_KIND, USERS_KIND, clone_padding
from hsmsim.node.softhsm import raw_template
from hsmsim.node.users import (UserRecord, UserStore, check_password, check_role, check_username,
                               decode_user, encode_user, hash_password, role_of, verify_password)
from hsmsim.node.values import ROLE_CO, ROLE_CU, AttributeSlot
from hsmsim.pkcs11.attributes import Template
from hsmsim.pkcs11.constants import RV, Attribute as A, KeyType, Mechanism as M, ObjectClass
from hsmsim.pkcs11.errors import Pkcs11Error
from hsmsim.pkcs11.params import MechanismSpec

log = logging.getLogger("hsmsim.node.service")
LOCKOUT_AFTER = 5
MAX_RANDOM = 64 * 1024
DIGESTS = {M.SHA_1: "sha1", M.SHA224: "sha224", M.SHA256: "sha256", M.SHA384: "sha384",
           M.SHA512: "sha512"}
ECDSA_HASH = {M.ECDSA_SHA1: "sha1", M.ECDSA_SHA224: "sha224", M.ECDSA_SHA256: "sha256",
              M.ECDSA_SHA384: "sha384", M.ECDSA_SHA512: "sha512"}
AES_WRAPS = {M.AES_KEY_WRAP: M.AES_KEY_WRAP, M.AES_KEY_WRAP_PAD: M.AES_KEY_WRAP_PAD,
             M.CLOUDHSM_AES_KEY_WRAP_NO_PAD: M.AES_KEY_WRAP,
             M.CLOUDHSM_AES_KEY_WRAP_PKCS5_PAD: M.AES_KEY_WRAP_PAD}
SOFTHSM_SYMMETRIC = frozenset({M.AES_CBC, M.AES_CBC_PAD, M.AES_ECB, M.AES_CTR})
HMACS = frozenset({M.SHA_1_HMAC, M.SHA224_HMAC, M.SHA256_HMAC, M.SHA384_HMAC, M.SHA512_HMAC})


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


class NodeService:
    def __init__(self, hsm_id: str, az: str, keystore: Keystore, users: UserStore,
                 audit: AuditLog, *, max_users: int, secret: bytes) -> None:
        self.hsm_id = hsm_id
        self.az = az
        self.ks = keystore
        self.users = users
        self.audit = audit
        self.max_users = max_users
        self._secret = secret
        self._login_ids = itertools.count(1)
        self._logins: dict[int, Login] = {}  # all live logins (ids are node-wide)
        self._clone_key: pyca_rsa.RSAPrivateKey | None = None
        self.engine = engine.ContextCache()
        self._batchers: dict[int, engine.SignBatcher] = {}
        self.connections = 0
        self.recovery: dict[str, int] = {}

    # -- principals --------------------------------------------------------------------------------

    def check_proof(self, conn: Conn, proof: bytes) -> None:
        expected = hmac.new(self._secret, b"hsmsim-node-auth-v1" + conn.nonce
                            + self.hsm_id.encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(expected, proof):
            raise Pkcs11Error(RV.PIN_INCORRECT, "cluster authentication failed")
        conn.cluster = True

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

    async def disconnect(self, conn: Conn) -> None:
        """A closed connection ends its logins, and with them their session objects."""
        for lid in list(conn.logins):
            self._logins.pop(lid, None)
        ids = set(conn.logins)
        conn.logins.clear()
        doomed = [r.handle for r in self.ks.catalog.records.values()
                  if r.session and r.login_id in ids]
        if doomed:
            await self._destroy_records(doomed)

    # -- visibility and permissions ---------------------------------------------------------------

    def visible(self, login: Login, r: ObjectRecord) -> bool:
        if r.session and r.login_id != login.login_id:
            return False
        if login.role == ROLE_CO:
            return True  # admins list keys (CloudHSM CLI `key list`), cannot use them
        return (r.owner == login.username or login.username in r.shared
                or r.cls == ObjectClass.PUBLIC_KEY)

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

    def usable(self, login: Login, handle: int, usage: int) -> ObjectRecord:
        if not login.is_cu:
            raise Pkcs11Error(RV.USER_TYPE_INVALID, "only crypto users can use keys")
        r = self.record(login, handle, RV.KEY_HANDLE_INVALID)
        if not r.is_key:
            raise Pkcs11Error(RV.KEY_HANDLE_INVALID, "object is not a key")
        if not r.flag(usage):
            raise Pkcs11Error(RV.KEY_FUNCTION_NOT_PERMITTED,
                              f"key does not allow this use (attribute 0x{usage:x} is false)")
        return r

    # -- status, hello -----------------------------------------------------------------------------

    def status(self, faults: dict[str, Any]) -> dict[str, Any]:
        c = self.ks.catalog
        session = sum(1 for r in c.records.values() if r.session)
        return {"hsm_id": self.hsm_id, "az": self.az, "has_masking_key": self.ks.masking is not None,
                "users": len(self.users.users), "token_objects": len(c.records) - session,
                "session_objects": session, "asymmetric_objects": c.asymmetric,
                "connections": self.connections, "audit_seq": self.audit.next_seq,
                "faults": faults, "recovery": self.recovery}

    # -- users -------------------------------------------------------------------------------------

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
        u = self.users.get(username) or u  # may have changed while hashing
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
        lid = next(self._login_ids)
        login = Login(lid, username, u.role)
        conn.logins[lid] = login
        self._logins[lid] = login
        self.audit.record("login", username=username, role=u.role, login_id=lid)
        return {"login_id": lid, "user_type": user_type, "username": username}

    async def logout(self, conn: Conn, f: Fields) -> None:
        login = self.login_of(conn, f)
        del conn.logins[login.login_id]
        self._logins.pop(login.login_id, None)
        doomed = [r.handle for r in self.ks.catalog.records.values()
                  if r.session and r.login_id == login.login_id]
        if doomed:
            await self._destroy_records(doomed)
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
        if len(self.users.users) >= self.max_users:
            raise Pkcs11Error(RV.DEVICE_MEMORY, f"user quota reached ({self.max_users} per HSM)")
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
        for lid, login in list(self._logins.items()):
            if login.username == username:
                self._logins.pop(lid, None)
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
            if have is None and len(self.users.users) >= self.max_users:
                raise Pkcs11Error(RV.DEVICE_MEMORY, f"user quota reached ({self.max_users})")
            if have is None or u.version > have.version:
                await self.ks.in_store(self.users.put, u)
                changed += 1
        if changed:
            self.audit.record("user_import", count=changed)
        return changed

    # -- object creation ---------------------------------------------------------------------------

    def _new_record(self, login: Login, handle: int, attrs: Template, session: int) -> ObjectRecord:
        token = bool(attrs.get(A.TOKEN, False))
        if not token and not session:
            # FIDELITY: session objects need the caller's session number; 0 is not one.
            raise Pkcs11Error(RV.ARGUMENTS_BAD, "session objects need a session number")
        return ObjectRecord(handle, attrs, login.username, frozenset(),
                            session=0 if token else session,
                            login_id=0 if token else login.login_id)

    async def generate_key(self, conn: Conn, f: Fields) -> int:
        login = self.cu_of(conn, f)
        mech, template = f.mech(), f.template()
        handle, session = f.handle(), f.int("session", 0)
        policy.check_user_template(template, creating=True)
        kt, length = policy.gen_key_type(mech.mechanism, template)
        attrs = policy.build_attrs(ObjectClass.SECRET_KEY, kt, template, local=True,
                                   gen_mech=mech.mechanism)
        attrs[A.VALUE_LEN] = length
        rec = self._new_record(login, handle, attrs, session)
        soft_t = policy.softhsm_template(ObjectClass.SECRET_KEY, kt, handle, rec.token,
                                         {A.VALUE_LEN: length})
        hsm = self.ks.hsm
        await self.ks.create([rec], lambda: [hsm.generate_key(
            MechanismSpec(mech.mechanism), raw_template(soft_t.items()))])
        self.audit.record("key_generate", handle=handle, owner=login.username, key_type=kt,
                          token=rec.token)
        return handle

    async def generate_key_pair(self, conn: Conn, f: Fields) -> list[int]:
        login = self.cu_of(conn, f)
        mech = f.mech()
        pub_t, priv_t = f.template("public_template"), f.template("private_template")
        ph, sh, session = f.handle("public_handle"), f.handle("private_handle"), f.int("session", 0)
        policy.check_user_template(pub_t, creating=True)
        policy.check_user_template(priv_t, creating=True)
        pub_extra: Template
        if mech.mechanism == M.RSA_PKCS_KEY_PAIR_GEN:
            kt = KeyType.RSA
            bits = pub_t.get(A.MODULUS_BITS)
            if not isinstance(bits, int) or isinstance(bits, bool):
                raise Pkcs11Error(RV.TEMPLATE_INCOMPLETE, "CKA_MODULUS_BITS is required")
            if bits not in policy.RSA_BITS:
                raise Pkcs11Error(RV.KEY_SIZE_RANGE, "RSA keys are 2048 to 4096 bits in steps of 256")
            exp = pub_t.get(A.PUBLIC_EXPONENT, b"\x01\x00\x01")
            if not isinstance(exp, bytes) or int.from_bytes(exp, "big") not in (3, 65537):
                raise Pkcs11Error(RV.ATTRIBUTE_VALUE_INVALID, "public exponent must be 3 or 65537")
            pub_extra = {A.MODULUS_BITS: bits, A.PUBLIC_EXPONENT: exp}
        elif mech.mechanism == M.EC_KEY_PAIR_GEN:
            kt = KeyType.EC
            params = pub_t.get(A.EC_PARAMS)
            if not isinstance(params, bytes):
                raise Pkcs11Error(RV.TEMPLATE_INCOMPLETE, "CKA_EC_PARAMS is required")
            if params not in policy.CURVES:
                raise Pkcs11Error(RV.CURVE_NOT_SUPPORTED, "curves: P-224, P-256, P-384, P-521, secp256k1")
            pub_extra = {A.EC_PARAMS: params}
        else:
            raise Pkcs11Error(RV.MECHANISM_INVALID, "key pair mechanisms: RSA, EC")
        for t, cls in ((pub_t, ObjectClass.PUBLIC_KEY), (priv_t, ObjectClass.PRIVATE_KEY)):
            if t.get(A.CLASS, cls) != cls or t.get(A.KEY_TYPE, kt) != kt:
                raise Pkcs11Error(RV.TEMPLATE_INCONSISTENT, "class/key type do not match the mechanism")
        pub_attrs = policy.build_attrs(ObjectClass.PUBLIC_KEY, kt, pub_t, local=True,
                                       gen_mech=mech.mechanism)
        priv_attrs = policy.build_attrs(ObjectClass.PRIVATE_KEY, kt, priv_t, local=True,
                                        gen_mech=mech.mechanism)
        pub = self._new_record(login, ph, pub_attrs, session)
        priv = self._new_record(login, sh, priv_attrs, session)
        soft_pub = policy.softhsm_template(ObjectClass.PUBLIC_KEY, kt, ph, pub.token, pub_extra)
        soft_priv = policy.softhsm_template(ObjectClass.PRIVATE_KEY, kt, sh, priv.token)
        hsm = self.ks.hsm
        await self.ks.create([pub, priv], lambda: hsm.generate_key_pair(
            MechanismSpec(mech.mechanism), raw_template(soft_pub.items()),
            raw_template(soft_priv.items())))
        self.audit.record("key_generate_pair", public_handle=ph, private_handle=sh,
                          owner=login.username, key_type=kt, token=priv.token)
        return [ph, sh]

    def _material_template(self, cls: int, kt: int | None, template: Template) -> Template:
        """Material attributes of a create template that SoftHSM2 must receive."""
        keep = {A.VALUE, A.PRIVATE_EXPONENT, A.PRIME_1, A.PRIME_2, A.EXPONENT_1, A.EXPONENT_2,
                A.COEFFICIENT, A.MODULUS, A.PUBLIC_EXPONENT, A.EC_PARAMS, A.EC_POINT}
        out = {a: v for a, v in template.items() if a in keep}
        if cls not in policy.KEY_CLASSES:
            return {A.VALUE: template.get(A.VALUE, b"")}
        return out

    async def create_object(self, conn: Conn, f: Fields) -> int:
        login = self.cu_of(conn, f)
        template, handle, session = f.template(), f.handle(), f.int("session", 0)
        policy.check_user_template(template, creating=True)
        cls = template.get(A.CLASS)
        if cls not in policy.SUPPORTED_CLASSES:
            raise Pkcs11Error(RV.TEMPLATE_INCOMPLETE if cls is None else RV.ATTRIBUTE_VALUE_INVALID,
                              "CKA_CLASS must be data, certificate or a key class")
        kt: int | None = None
        if cls in policy.KEY_CLASSES:
            kt_v = template.get(A.KEY_TYPE)
            if kt_v not in policy.SUPPORTED_KEY_TYPES[cls]:  # type: ignore[index]
                raise Pkcs11Error(RV.TEMPLATE_INCOMPLETE if kt_v is None else
                                  RV.ATTRIBUTE_VALUE_INVALID, "unsupported or missing CKA_KEY_TYPE")
            kt = int(kt_v)  # type: ignore[arg-type]
            if cls == ObjectClass.SECRET_KEY:
                value = template.get(A.VALUE)
                if not isinstance(value, bytes):
                    raise Pkcs11Error(RV.TEMPLATE_INCOMPLETE, "CKA_VALUE is required")
                policy.check_secret_len(kt, len(value))
                if A.VALUE_LEN in template and template[A.VALUE_LEN] != len(value):
                    raise Pkcs11Error(RV.TEMPLATE_INCONSISTENT, "CKA_VALUE_LEN differs from CKA_VALUE")
            if kt == KeyType.EC and template.get(A.EC_PARAMS) not in policy.CURVES:
                raise Pkcs11Error(RV.ATTRIBUTE_VALUE_INVALID, "unsupported or missing CKA_EC_PARAMS")
        attrs = policy.build_attrs(int(cls), kt, template, local=False, gen_mech=None)  # type: ignore[arg-type]
        if cls == ObjectClass.SECRET_KEY:
            attrs[A.VALUE_LEN] = len(template[A.VALUE])  # type: ignore[arg-type]
        rec = self._new_record(login, handle, attrs, session)
        soft_t = policy.softhsm_template(int(cls), kt, handle, rec.token,  # type: ignore[arg-type]
                                         self._material_template(int(cls), kt, template))  # type: ignore[arg-type]
        hsm = self.ks.hsm
        try:
            await self.ks.create([rec], lambda: [hsm.create_object(raw_template(soft_t.items()))])
        finally:
            soft_t.clear()
        self.audit.record("key_create" if rec.is_key else "object_create", handle=handle,
                          owner=login.username, cls=int(cls), token=rec.token)  # type: ignore[arg-type]
        return handle

    async def _clone_object(self, r: ObjectRecord, new: ObjectRecord) -> None:
        """Create `new` as a copy of r's material (masking wrap/unwrap; public parts as
        attributes) in SoftHSM2."""
        soft = self.ks.soft_handle(r.handle)
        hsm = self.ks.hsm
        ks = self.ks
        if r.cls in (ObjectClass.SECRET_KEY, ObjectClass.PRIVATE_KEY):
            soft_t = policy.softhsm_template(r.cls, r.key_type, new.handle, new.token)
            vlen = value_len(r)

            def make() -> list[int]:
                return [ks.unwrap_masked_sync(ks.wrap_masked_sync(soft, vlen), soft_t)]
        else:
            extra = await self._public_material(r)
            soft_t = policy.softhsm_template(r.cls, r.key_type, new.handle, new.token, extra)

            def make() -> list[int]:
                return [hsm.create_object(raw_template(soft_t.items()))]
        await self.ks.create([new], make, replacing=False)

    async def _public_material(self, r: ObjectRecord) -> Template:
        if r.cls == ObjectClass.PUBLIC_KEY:
            return {a: r.attrs[a] for a in policy.PUBLIC_MATERIAL[(r.cls, r.key_type)]  # type: ignore[index]
                    if a in r.attrs}
        value = await self.ks.in_hsm(self.ks.hsm.get_attribute, self.ks.soft_handle(r.handle),
                                     A.VALUE)
        return {A.VALUE: value or b""}

    async def copy_object(self, conn: Conn, f: Fields) -> int:
        login = self.cu_of(conn, f)
        r = self.owned(login, f.handle())
        template, new_handle, session = f.template(), f.handle("new_handle"), f.int("session", 0)
        policy.check_user_template(template, creating=True)
        if not r.flag(A.COPYABLE) and A.COPYABLE in r.attrs:
            raise Pkcs11Error(RV.ACTION_PROHIBITED, "object is not copyable")
        for a in template:
            if a not in policy.MODIFIABLE and a not in (A.COPYABLE,):
                raise Pkcs11Error(RV.ATTRIBUTE_READ_ONLY, f"attribute 0x{a:x} cannot be set on copy")
        attrs = dict(r.attrs)
        attrs.update(template)
        self._check_one_way(r.attrs, template)
        new = self._new_record(login, new_handle, attrs, session)
        await self._clone_object(r, new)
        self.audit.record("key_copy", handle=new_handle, source=r.handle, owner=login.username)
        return new_handle

    # -- object management -------------------------------------------------------------------------

    async def _destroy_records(self, handles: list[int]) -> None:
        for h in handles:
            self.engine.drop(h)
            self._batchers.pop(h, None)
        await self.ks.destroy(handles)

    async def destroy_object(self, conn: Conn, f: Fields) -> None:
        handle = f.handle()
        if f.raw("login_id") is None:
            if not conn.cluster:
                raise Pkcs11Error(RV.USER_NOT_LOGGED_IN, "destroy needs a login_id")
            if self.ks.get(handle) is None:
                raise Pkcs11Error(RV.OBJECT_HANDLE_INVALID, f"object {handle} does not exist")
            by = "cluster"
        else:
            login = self.cu_of(conn, f)
            r = self.owned(login, handle)
            if A.DESTROYABLE in r.attrs and not r.flag(A.DESTROYABLE):
                raise Pkcs11Error(RV.ACTION_PROHIBITED, "object is not destroyable")
            by = login.username
        await self._destroy_records([handle])
        self.audit.record("key_delete", handle=handle, by=by)

    async def get_attributes(self, conn: Conn, f: Fields) -> list[list[Any]]:
        login = self.login_of(conn, f)
        r = self.record(login, f.handle())
        out: list[AttributeSlot] = []
        for a in f.attrs():
            out.append(await self._attribute(login, r, a))
        return results_to_wire(out)

    async def _attribute(self, login: Login, r: ObjectRecord, a: int) -> AttributeSlot:
        secret = policy.SECRET_ATTRS.get(r.cls, frozenset())  # type: ignore[call-overload]
        if a in secret:
            if policy.is_sensitive_value(r.attrs) or not login.is_cu or r.owner != login.username:
                return AttributeSlot(a, None, int(RV.ATTRIBUTE_SENSITIVE))
            return AttributeSlot(a, await self._secret_attribute(r, a), 0)
        if a == A.VALUE and r.cls in (ObjectClass.DATA, ObjectClass.CERTIFICATE):
            value = await self.ks.in_hsm(self.ks.hsm.get_attribute,
                                         self.ks.soft_handle(r.handle), A.VALUE)
            return AttributeSlot(a, value or b"", 0)
        if a in r.attrs:
            return AttributeSlot(a, r.attrs[a], 0)
        return AttributeSlot(a, None, int(RV.ATTRIBUTE_TYPE_INVALID))

    async def _secret_attribute(self, r: ObjectRecord, a: int) -> bytes | None:
        """Secret material of a non-sensitive, extractable key: by unmasking."""
        material = await self.ks.material(r)
        if r.cls == ObjectClass.SECRET_KEY:
            return material
        from cryptography.hazmat.primitives.serialization import load_der_private_key
        key = load_der_private_key(material, password=None)
        if r.key_type == KeyType.RSA:
            nums = key.private_numbers()  # type: ignore[union-attr]
            values = {A.PRIVATE_EXPONENT: nums.d, A.PRIME_1: nums.p, A.PRIME_2: nums.q,
                      A.EXPONENT_1: nums.dmp1, A.EXPONENT_2: nums.dmq1, A.COEFFICIENT: nums.iqmp}
            v = values.get(a)  # type: ignore[call-overload]
            return v.to_bytes((v.bit_length() + 7) // 8, "big") if v is not None else None
        if a == A.VALUE:
            n = key.private_numbers().private_value  # type: ignore[union-attr]
            size = (key.curve.key_size + 7) // 8  # type: ignore[union-attr]
            return int(n).to_bytes(size, "big")
        return None

    @staticmethod
    def _check_one_way(old: Template, changes: Template) -> None:
        rules = {A.TOKEN: (False, True), A.SENSITIVE: (False, True), A.EXTRACTABLE: (True, False),
                 A.WRAP_WITH_TRUSTED: (False, True)}
        for a, (before, after) in rules.items():
            if a in changes and a in old and changes[a] != old[a]:
                if not (old[a] == before and changes[a] == after):
                    raise Pkcs11Error(RV.ATTRIBUTE_READ_ONLY, f"attribute 0x{a:x} cannot change back")

    async def set_attributes(self, conn: Conn, f: Fields) -> None:
        login = self.cu_of(conn, f)
        r = self.owned(login, f.handle())
        template = f.template()
        if A.MODIFIABLE in r.attrs and not r.flag(A.MODIFIABLE):
            raise Pkcs11Error(RV.ACTION_PROHIBITED, "object is not modifiable")
        for a in template:
            if a not in policy.MODIFIABLE:
                raise Pkcs11Error(RV.ATTRIBUTE_READ_ONLY, f"attribute 0x{a:x} cannot be modified")
            if a not in r.attrs:
                raise Pkcs11Error(RV.ATTRIBUTE_TYPE_INVALID, f"attribute 0x{a:x} is not valid here")
        if A.TRUSTED in template and template[A.TRUSTED]:
            # CloudHSM: only an admin sets CKA_TRUSTED.
            raise Pkcs11Error(RV.ATTRIBUTE_READ_ONLY, "only an admin may set CKA_TRUSTED")
        if r.cls == ObjectClass.PUBLIC_KEY and template.get(A.DERIVE):
            raise Pkcs11Error(RV.ATTRIBUTE_VALUE_INVALID, "CKA_DERIVE must be false on public keys")
        self._check_one_way(r.attrs, template)
        new = r.with_attrs(template)
        if new.token and not r.token:
            # session -> token object: a new token-backed copy under the same handle.
            new = replace(new, session=0, login_id=0)
            await self._clone_object_replacing(r, new)
        else:
            await self.ks.update(new)
        self.audit.record("key_modify", handle=r.handle, by=login.username,
                          attrs=sorted(int(a) for a in template))

    async def _clone_object_replacing(self, r: ObjectRecord, new: ObjectRecord) -> None:
        soft = self.ks.soft_handle(r.handle)
        ks = self.ks
        hsm = self.ks.hsm
        if r.cls in (ObjectClass.SECRET_KEY, ObjectClass.PRIVATE_KEY):
            soft_t = policy.softhsm_template(r.cls, r.key_type, new.handle, True)
            vlen = value_len(r)

            def make() -> list[int]:
                return [ks.unwrap_masked_sync(ks.wrap_masked_sync(soft, vlen), soft_t)]
        else:
            extra = await self._public_material(r)
            soft_t = policy.softhsm_template(r.cls, r.key_type, new.handle, True, extra)

            def make() -> list[int]:
                return [hsm.create_object(raw_template(soft_t.items()))]
        await self.ks.create([new], make, replacing=True)

    def find_objects(self, conn: Conn, f: Fields) -> list[int]:
        login = self.login_of(conn, f)
        template = f.template()
        session = f.opt_int("session")
        out = []
        for h in self.ks.catalog.find(template):
            r = self.ks.catalog.records[h]
            if not self.visible(login, r):
                continue
            if r.session and session is not None and r.session != session:
                continue
            out.append(h)
        return out

    async def close_session(self, conn: Conn, f: Fields) -> int:
        session = f.int("session", lo=1)
        if conn.cluster and f.raw("login_id") is None:
            ids = None
        else:
            ids = {self.login_of(conn, f).login_id}
        doomed = [r.handle for r in self.ks.catalog.records.values()
                  if r.session == session and (ids is None or r.login_id in ids)]
        if doomed:
            await self._destroy_records(doomed)
        return len(doomed)

    async def share(self, conn: Conn, f: Fields, add: bool) -> None:
        login = self.cu_of(conn, f)
        r = self.owned(login, f.handle())
        username = check_username(f.str("username"))
        if r.cls == ObjectClass.PUBLIC_KEY:
            raise Pkcs11Error(RV.ACTION_PROHIBITED, "public keys are visible to all users; "
                              "they cannot be shared")
        u = self.users.get(username)
        if u is None or u.role != ROLE_CU:
            raise Pkcs11Error(RV.ARGUMENTS_BAD, f"{username} is not a crypto user")
        if username == login.username:
            raise Pkcs11Error(RV.ARGUMENTS_BAD, "the owner cannot share a key with itself")
        shared = r.shared | {username} if add else r.shared - {username}
        if shared == r.shared:
            raise Pkcs11Error(RV.ARGUMENTS_BAD, f"key is {'already' if add else 'not'} shared "
                              f"with {username}")
        await self.ks.update(replace(r, shared=frozenset(shared), version=r.version + 1))
        self.audit.record("key_share" if add else "key_unshare", handle=r.handle,
                          username=username, by=login.username)

    # -- crypto ------------------------------------------------------------------------------------

    async def _aes_ctx(self, r: ObjectRecord) -> AesGcmKey:
        async def load() -> AesGcmKey:
            material = await self.ks.material(r)
            return AesGcmKey(material)
        ctx = await self.engine.get(r.handle, load)
        assert isinstance(ctx, AesGcmKey)
        return ctx

    async def _rsa_private(self, r: ObjectRecord) -> RsaPrivateKey | None:
        """The cached C-core key, or None for a key the core does not take (size)."""
        bits = r.attrs.get(A.MODULUS_BITS)
        if not isinstance(bits, int) or not 2048 <= bits <= 4096:
            return None

        async def load() -> RsaPrivateKey:
            der = await self.ks.material(r)
            return await self.ks.in_hsm(RsaPrivateKey.from_der, der)
        ctx = await self.engine.get(r.handle, load)
        assert isinstance(ctx, RsaPrivateKey)
        return ctx

    async def _rsa_public(self, r: ObjectRecord) -> RsaPublicKey | None:
        n, e = r.attrs.get(A.MODULUS), r.attrs.get(A.PUBLIC_EXPONENT)
        if not isinstance(n, bytes) or not isinstance(e, bytes) or not 2048 <= len(n) * 8 <= 4096:
            return None

        async def load() -> RsaPublicKey:
            return RsaPublicKey.from_components(int.from_bytes(n, "big"), int.from_bytes(e, "big"))
        ctx = await self.engine.get(r.handle, load)
        assert isinstance(ctx, RsaPublicKey)
        return ctx

    def _batcher(self, handle: int, key: RsaPrivateKey) -> engine.SignBatcher:
        b = self._batchers.get(handle)
        if b is None or b.key is not key:
            b = self._batchers[handle] = engine.SignBatcher(key, self.ks.in_hsm)
        return b

    @staticmethod
    def _check_key_type(r: ObjectRecord, cls: int, kt: int) -> None:
        if r.cls != cls or r.key_type != kt:
            raise Pkcs11Error(RV.KEY_TYPE_INCONSISTENT, "key type does not fit the mechanism")

    async def encrypt(self, conn: Conn, f: Fields) -> dict[str, Any]:
        login = self.cu_of(conn, f)
        mech, data = f.mech(), f.bytes("data")
        r = self.usable(login, f.handle(), A.ENCRYPT)
        m = mech.mechanism
        if m in engine.GCM_MECHS:
            self._check_key_type(r, ObjectClass.SECRET_KEY, KeyType.AES)
            key = await self._aes_ctx(r)
            if len(data) > engine.INLINE_LIMIT:
                ct, iv = await self.ks.in_hsm(engine.gcm_encrypt, key, mech.param, data)
            else:
                ct, iv = engine.gcm_encrypt(key, mech.param, data)
            return {"data": ct, "iv": iv}
        if m in engine.RSA_CRYPT_MECHS:
            self._check_key_type(r, ObjectClass.PUBLIC_KEY, KeyType.RSA)
            pub = await self._rsa_public(r)
            if pub is not None:
                return {"data": await self.ks.in_hsm(engine.rsa_encrypt, pub, m, mech.param, data),
                        "iv": None}
        elif m in SOFTHSM_SYMMETRIC:
            self._check_key_type(r, ObjectClass.SECRET_KEY, KeyType.AES)
        else:
            raise Pkcs11Error(RV.MECHANISM_INVALID, f"mechanism 0x{m:x} cannot encrypt")
        out = await self.ks.in_hsm(self.ks.hsm.encrypt, mech, self.ks.soft_handle(r.handle), data)
        return {"data": out, "iv": None}

    async def decrypt(self, conn: Conn, f: Fields) -> bytes:
        login = self.cu_of(conn, f)
        mech, data = f.mech(), f.bytes("data")
        r = self.usable(login, f.handle(), A.DECRYPT)
        m = mech.mechanism
        if m in engine.GCM_MECHS:
            self._check_key_type(r, ObjectClass.SECRET_KEY, KeyType.AES)
            key = await self._aes_ctx(r)
            if len(data) > engine.INLINE_LIMIT:
                return await self.ks.in_hsm(engine.gcm_decrypt, key, mech.param, data)
            return engine.gcm_decrypt(key, mech.param, data)
        if m in engine.RSA_CRYPT_MECHS:
            self._check_key_type(r, ObjectClass.PRIVATE_KEY, KeyType.RSA)
            priv = await self._rsa_private(r)
            if priv is not None:
                return await self.ks.in_hsm(engine.rsa_decrypt, priv, m, mech.param, data)
        elif m in SOFTHSM_SYMMETRIC:
            self._check_key_type(r, ObjectClass.SECRET_KEY, KeyType.AES)
        else:
            raise Pkcs11Error(RV.MECHANISM_INVALID, f"mechanism 0x{m:x} cannot decrypt")
        return await self.ks.in_hsm(self.ks.hsm.decrypt, mech, self.ks.soft_handle(r.handle), data)

    def _softhsm_sign_mech(self, r: ObjectRecord, mech: MechanismSpec,
                           data: bytes) -> tuple[MechanismSpec, bytes]:
        m = mech.mechanism
        if m == M.ECDSA or m in ECDSA_HASH:
            if r.key_type != KeyType.EC:
                raise Pkcs11Error(RV.KEY_TYPE_INCONSISTENT, "ECDSA needs an EC key")
            if m in ECDSA_HASH:
                # Hash in the node, sign the digest with CKM_ECDSA: same signature.
                return (MechanismSpec(M.ECDSA),
                        hashlib.new(ECDSA_HASH[m], data).digest())  # type: ignore[index]
            return mech, data
        if m in HMACS:
            if r.cls != ObjectClass.SECRET_KEY:
                raise Pkcs11Error(RV.KEY_TYPE_INCONSISTENT, "HMAC needs a secret key")
            return mech, data
        if m == M.AES_CMAC:
            if r.key_type != KeyType.AES:
                raise Pkcs11Error(RV.KEY_TYPE_INCONSISTENT, "AES-CMAC needs an AES key")
            return mech, data
        raise Pkcs11Error(RV.MECHANISM_INVALID, f"mechanism 0x{m:x} cannot sign")

    async def _generic_key_for_hmac(self, r: ObjectRecord, mech: MechanismSpec) -> None:
        if mech.mechanism in HMACS and r.key_type == KeyType.AES:
            # FIDELITY: SoftHSM2 computes HMAC only with generic secret keys; CloudHSM also
            # accepts AES keys. We refuse AES keys for HMAC.
            raise Pkcs11Error(RV.KEY_TYPE_INCONSISTENT, "HMAC needs a generic secret key")

    async def sign(self, conn: Conn, f: Fields) -> bytes:
        login = self.cu_of(conn, f)
        mech, data = f.mech(), f.bytes("data")
        r = self.usable(login, f.handle(), A.SIGN)
        if mech.mechanism in engine.RSA_SIGN_MECHS:
            self._check_key_type(r, ObjectClass.PRIVATE_KEY, KeyType.RSA)
            priv = await self._rsa_private(r)
            if priv is not None:
                batchable = engine.pkcs1_batchable(mech.mechanism, data)
                if batchable is not None:
                    return await self._batcher(r.handle, priv).sign(*batchable)
                return await self.ks.in_hsm(engine.rsa_sign, priv, mech.mechanism, mech.param, data)
            return await self.ks.in_hsm(self.ks.hsm.sign, mech, self.ks.soft_handle(r.handle), data)
        soft_mech, soft_data = self._softhsm_sign_mech(r, mech, data)
        await self._generic_key_for_hmac(r, mech)
        return await self.ks.in_hsm(self.ks.hsm.sign, soft_mech, self.ks.soft_handle(r.handle),
                                    soft_data)

    async def verify(self, conn: Conn, f: Fields) -> None:
        login = self.cu_of(conn, f)
        mech, data, sig = f.mech(), f.bytes("data"), f.bytes("signature")
        r = self.usable(login, f.handle(), A.VERIFY)
        if mech.mechanism in engine.RSA_SIGN_MECHS:
            self._check_key_type(r, ObjectClass.PUBLIC_KEY, KeyType.RSA)
            pub = await self._rsa_public(r)
            if pub is not None:
                engine.rsa_verify(pub, mech.mechanism, mech.param, data, sig)
                return
            await self.ks.in_hsm(self.ks.hsm.verify, mech, self.ks.soft_handle(r.handle), data, sig)
            return
        soft_mech, soft_data = self._softhsm_sign_mech(r, mech, data)
        await self._generic_key_for_hmac(r, mech)
        await self.ks.in_hsm(self.ks.hsm.verify, soft_mech, self.ks.soft_handle(r.handle),
                             soft_data, sig)

    async def digest(self, f: Fields) -> bytes:
        mech, data = f.mech(), f.bytes("data")
        name = DIGESTS.get(mech.mechanism)  # type: ignore[call-overload]
        if name is None:
            raise Pkcs11Error(RV.MECHANISM_INVALID, f"mechanism 0x{mech.mechanism:x} is not a digest")
        return hashlib.new(name, data).digest()

    async def generate_random(self, f: Fields) -> bytes:
        length = f.int("length", lo=1, hi=MAX_RANDOM)
        return await self.ks.in_hsm(self.ks.hsm.generate_random, length)

    async def wrap_key(self, conn: Conn, f: Fields) -> bytes:
        login = self.cu_of(conn, f)
        wrapping = self.usable(login, f.handle("wrapping"), A.WRAP)
        mech = f.mech()
        key = self.record(login, f.handle("key"), RV.KEY_HANDLE_INVALID)
        if key.cls not in (ObjectClass.SECRET_KEY, ObjectClass.PRIVATE_KEY):
            raise Pkcs11Error(RV.KEY_NOT_WRAPPABLE, "only secret and private keys can be wrapped")
        if key.owner != login.username:
            raise Pkcs11Error(RV.ACTION_PROHIBITED, "only the key's owner may wrap it")
        if not key.flag(A.EXTRACTABLE):
            raise Pkcs11Error(RV.KEY_UNEXTRACTABLE, "key is not extractable")
        if key.flag(A.WRAP_WITH_TRUSTED) and not wrapping.flag(A.TRUSTED):
            raise Pkcs11Error(RV.KEY_NOT_WRAPPABLE, "key may be wrapped only with a trusted key")
        m = mech.mechanism
        if m in AES_WRAPS:
            self._check_key_type(wrapping, ObjectClass.SECRET_KEY, KeyType.AES)
            # SoftHSM 2.6.1 zero-pads keys to a multiple of 8 before RFC 5649 wrapping (output
            # no other implementation unwraps), so the node wraps: both keys are unmasked
            # inside this process and the result is RFC 3394/5649 exact.
            kek = await self.ks.material(wrapping)
            material = await self.ks.material(key)
            if AES_WRAPS[m] == M.AES_KEY_WRAP_PAD:  # type: ignore[index]
                return aes_key_wrap_with_padding(kek, material)
            if len(material) % 8 or len(material) < 16:
                raise Pkcs11Error(RV.KEY_SIZE_RANGE, "AES key wrap without padding needs a "
                                  "multiple of 8 bytes (use CKM_AES_KEY_WRAP_PAD)")
            return aes_key_wrap(kek, material)
        if m == M.RSA_PKCS_OAEP:
            self._check_key_type(wrapping, ObjectClass.PUBLIC_KEY, KeyType.RSA)
            if key.cls != ObjectClass.SECRET_KEY:
                raise Pkcs11Error(RV.KEY_NOT_WRAPPABLE, "RSA-OAEP wraps secret keys only")
            pub = await self._rsa_public(wrapping)
            if pub is None:
                raise Pkcs11Error(RV.WRAPPING_KEY_SIZE_RANGE, "wrapping key must be RSA 2048..4096")
            material = await self.ks.material(key)
            return await self.ks.in_hsm(engine.rsa_encrypt, pub, m, mech.param, material)
        raise Pkcs11Error(RV.MECHANISM_INVALID, f"mechanism 0x{m:x} cannot wrap")

    async def unwrap_key(self, conn: Conn, f: Fields) -> int:
        login = self.cu_of(conn, f)
        unwrapping = self.usable(login, f.handle("unwrapping"), A.UNWRAP)
        mech, data, template = f.mech(), f.bytes("data"), f.template()
        handle, session = f.handle(), f.int("session", 0)
        policy.check_user_template(template, creating=True)
        cls, kt = template.get(A.CLASS), template.get(A.KEY_TYPE)
        if cls not in (ObjectClass.SECRET_KEY, ObjectClass.PRIVATE_KEY) or \
                kt not in policy.SUPPORTED_KEY_TYPES[cls]:  # type: ignore[index]
            raise Pkcs11Error(RV.TEMPLATE_INCOMPLETE, "unwrap needs CKA_CLASS and CKA_KEY_TYPE "
                              "of a supported secret or private key")
        attrs = policy.build_attrs(int(cls), int(kt), template, local=False, gen_mech=None)  # type: ignore[arg-type]
        rec = self._new_record(login, handle, attrs, session)
        soft_t = policy.softhsm_template(int(cls), int(kt), handle, rec.token)  # type: ignore[arg-type]
        m = mech.mechanism
        hsm = self.ks.hsm
        if m in AES_WRAPS:
            self._check_key_type(unwrapping, ObjectClass.SECRET_KEY, KeyType.AES)
            # Unwrapped in the node (SoftHSM 2.6.1 loses CKA_VALUE_LEN on unwrap); the KEK is
            # unmasked inside this process only.
            kek = await self.ks.material(unwrapping)
            try:
                if AES_WRAPS[m] == M.AES_KEY_WRAP_PAD:  # type: ignore[index]
                    material = aes_key_unwrap_with_padding(kek, data)
                else:
                    material = aes_key_unwrap(kek, data)
            except (InvalidUnwrap, ValueError):
                raise Pkcs11Error(RV.WRAPPED_KEY_INVALID, "wrapped key does not unwrap") from None
        elif m == M.RSA_PKCS_OAEP:
            self._check_key_type(unwrapping, ObjectClass.PRIVATE_KEY, KeyType.RSA)
            if cls != ObjectClass.SECRET_KEY:
                raise Pkcs11Error(RV.TEMPLATE_INCONSISTENT, "RSA-OAEP unwraps secret keys only")
            priv = await self._rsa_private(unwrapping)
            if priv is None:
                raise Pkcs11Error(RV.UNWRAPPING_KEY_SIZE_RANGE, "unwrapping key must be RSA 2048..4096")
            try:
                material = await self.ks.in_hsm(engine.rsa_decrypt, priv, m, mech.param, data)
            except Pkcs11Error:
                raise Pkcs11Error(RV.WRAPPED_KEY_INVALID, "wrapped key does not decrypt") from None
        else:
            raise Pkcs11Error(RV.MECHANISM_INVALID, f"mechanism 0x{m:x} cannot unwrap")
        if cls == ObjectClass.SECRET_KEY:
            policy.check_secret_len(int(kt), len(material))  # type: ignore[arg-type]
            if A.VALUE_LEN in template and template[A.VALUE_LEN] != len(material):
                raise Pkcs11Error(RV.TEMPLATE_INCONSISTENT, "CKA_VALUE_LEN differs from the key")
            rec = replace(rec, attrs={**rec.attrs, A.VALUE_LEN: len(material)})
            soft_t[A.VALUE] = material
        else:
            real_kt, parts = policy.private_key_material(material)
            if real_kt != kt:
                raise Pkcs11Error(RV.TEMPLATE_INCONSISTENT, "CKA_KEY_TYPE differs from the key")
            soft_t.update(parts)

        def make() -> list[int]:
            return [hsm.create_object(raw_template(soft_t.items()))]
        try:
            await self.ks.create([rec], make)
        finally:
            soft_t.clear()
        self.audit.record("key_unwrap", handle=handle, owner=login.username, token=rec.token)
        return handle

    async def derive_key(self, conn: Conn, f: Fields) -> int:
        login = self.cu_of(conn, f)
        base = self.usable(login, f.handle("base"), A.DERIVE)
        if base.owner != login.username:
            raise Pkcs11Error(RV.ACTION_PROHIBITED, "only the key's owner may derive from it")
        mech, template = f.mech(), f.template()
        handle, session = f.handle(), f.int("session", 0)
        if mech.mechanism != M.ECDH1_DERIVE:
            raise Pkcs11Error(RV.MECHANISM_INVALID, "derive supports CKM_ECDH1_DERIVE")
        self._check_key_type(base, ObjectClass.PRIVATE_KEY, KeyType.EC)
        policy.check_user_template(template, creating=True)
        kt = template.get(A.KEY_TYPE, KeyType.GENERIC_SECRET)
        if template.get(A.CLASS, ObjectClass.SECRET_KEY) != ObjectClass.SECRET_KEY or \
                kt not in (KeyType.AES, KeyType.GENERIC_SECRET):
            raise Pkcs11Error(RV.TEMPLATE_INCONSISTENT, "ECDH derives AES or generic secret keys")
        length = template.get(A.VALUE_LEN)
        if not isinstance(length, int) or isinstance(length, bool):
            raise Pkcs11Error(RV.TEMPLATE_INCOMPLETE, "CKA_VALUE_LEN is required")
        policy.check_secret_len(int(kt), length)  # type: ignore[arg-type]
        attrs = policy.build_attrs(ObjectClass.SECRET_KEY, int(kt), template, local=False,  # type: ignore[arg-type]
                                   gen_mech=None)
        attrs[A.VALUE_LEN] = length
        rec = self._new_record(login, handle, attrs, session)
        soft_t = policy.softhsm_template(ObjectClass.SECRET_KEY, int(kt), handle, rec.token,  # type: ignore[arg-type]
                                         {A.VALUE_LEN: length})
        hsm, soft_b = self.ks.hsm, self.ks.soft_handle(base.handle)
        await self.ks.create([rec], lambda: [hsm.derive_key(mech, soft_b,
                                                            raw_template(soft_t.items()))])
        self.audit.record("key_derive", handle=handle, base=base.handle, owner=login.username)
        return handle

    # -- masking -----------------------------------------------------------------------------------

    async def export_masked(self, f: Fields) -> bytes:
        masking, _ = self.ks.require_masking()
        handle = f.handle()
        r = self.ks.get(handle)
        if r is None:
            raise Pkcs11Error(RV.OBJECT_HANDLE_INVALID, f"object {handle} does not exist")
        soft = self.ks.soft_handle(handle)
        material: bytes | None = None
        extra: Template = {}
        if r.cls in (ObjectClass.SECRET_KEY, ObjectClass.PRIVATE_KEY):
            material = await self.ks.in_hsm(self.ks.wrap_masked_sync, soft, value_len(r))
        else:
            extra = await self._public_material(r)
        blob = masking.seal(OBJECT_KIND, {
            "handle": r.handle, "attrs": template_to_wire(r.attrs), "owner": r.owner,
            "shared": sorted(r.shared), "session": r.session, "version": r.version,
            "material": material, "public": template_to_wire(extra)})
        self.audit.record("masked_extract", handle=handle)
        return blob

    async def import_masked(self, f: Fields) -> int:
        masking, _ = self.ks.require_masking()
        d = masking.open(OBJECT_KIND, f.bytes("blob"))
        replacing = f.bool("replace", False)
        try:
            from hsmsim.node.codec import template_from_wire
            attrs = template_from_wire(d["attrs"])
            public = template_from_wire(d["public"])
            rec = ObjectRecord(int(d["handle"]), attrs, str(d["owner"]),
                               frozenset(str(s) for s in d["shared"]), 0, 0, int(d["version"]))
            material = d["material"]
        except (KeyError, TypeError, ValueError, Pkcs11Error):
            raise Pkcs11Error(RV.WRAPPED_KEY_INVALID, "masked blob content is malformed") from None
        if not rec.token:
            # FIDELITY: session objects never leave their node.
            raise Pkcs11Error(RV.ARGUMENTS_BAD, "session objects cannot be imported")
        if rec.handle in self.ks.catalog and not replacing:
            raise Pkcs11Error(RV.TEMPLATE_INCONSISTENT, f"handle {rec.handle} is already in use")
        ks, hsm = self.ks, self.ks.hsm
        if rec.cls in (ObjectClass.SECRET_KEY, ObjectClass.PRIVATE_KEY):
            if not isinstance(material, bytes):
                raise Pkcs11Error(RV.WRAPPED_KEY_INVALID, "masked blob lacks key material")
            soft_t = policy.softhsm_template(rec.cls, rec.key_type, rec.handle, True)

            def make() -> list[int]:
                return [ks.unwrap_masked_sync(material, soft_t)]
        else:
            soft_t = policy.softhsm_template(rec.cls, rec.key_type, rec.handle, True, public)

            def make() -> list[int]:
                return [hsm.create_object(raw_template(soft_t.items()))]
        self.engine.drop(rec.handle)
        await self.ks.create([rec], make, replacing=replacing)
        self.audit.record("masked_insert", handle=rec.handle, owner=rec.owner)
        return rec.handle

    def inventory(self) -> list[list[Any]]:
        return [[r.handle, hashlib.sha256(encode_record(r)).digest()[:16]]
                for r in sorted(self.ks.catalog.records.values(), key=lambda r: r.handle)
                if r.token]

    # -- cloning -----------------------------------------------------------------------------------

    async def clone_offer(self) -> bytes:
        if self.ks.masking is not None:
            raise Pkcs11Error(RV.ACTION_PROHIBITED, "this node already has a masking key")
        key = await self.ks.in_hsm(pyca_rsa.generate_private_key, 65537, 3072)
        self._clone_key = key
        return key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)

    def clone_export(self, f: Fields) -> bytes:
        masking, _ = self.ks.require_masking()
        blob = masking.export_to(f.bytes("public_key"))
        self.audit.record("masking_key_export")
        return blob

    async def clone_accept(self, f: Fields) -> None:
        blob = f.bytes("blob")
        if self._clone_key is None:
            raise Pkcs11Error(RV.OPERATION_NOT_INITIALIZED, "call clone_offer first")
        if self.ks.masking is not None:
            raise Pkcs11Error(RV.ACTION_PROHIBITED, "this node already has a masking key")
        try:
            key = self._clone_key.decrypt(blob, clone_padding())
        except ValueError:
            raise Pkcs11Error(RV.WRAPPED_KEY_INVALID, "clone blob does not decrypt") from None
        if len(key) != 32:
            raise Pkcs11Error(RV.WRAPPED_KEY_INVALID, "clone blob does not hold a masking key")
        await self.ks.in_store(self.ks.install_masking_key, key)
        self._clone_key = None
        self.audit.record("masking_key_clone")


def random_nonce() -> bytes:
    return os.urandom(32)

