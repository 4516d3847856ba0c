"""Object operations: generate, create, copy, destroy, attributes, find, sharing and
session-object cleanup, keeping the index, the token and the C-core caches consistent."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_der_private_key

from hsmsim.node import policy
from hsmsim.node.codec import Fields, results_to_wire
from hsmsim.node.context import Conn, Login, Ops, sees
from hsmsim.node.index import ObjectRecord
from hsmsim.node.keystore import value_len
from hsmsim.node.softhsm import raw_template
from hsmsim.node.users import check_username
from hsmsim.node.values import ROLE_CO, ROLE_CU
from hsmsim.pkcs11.values import AttributeResult
from hsmsim.pkcs11.attributes import Template
from hsmsim.pkcs11.constants import RV, Attribute as A, KeyType, Mechanism as M, ObjectClass
from hsmsim.pkcs11.errors import Pkcs11Error
from hsmsim.pkcs11.params import MechanismSpec


class ObjectOps(Ops):
    async def generate_key(self, conn: Conn, f: Fields) -> int:
        login = self.cu_of(conn, f)
        mech, template = f.mech(), f.template()
        handle, session = f.handle(), f.int("session", 0)
        policy.check_user_template(template, creating=True)
        kt, length = policy.gen_key_type(mech.mechanism, template)
        attrs = policy.build_attrs(ObjectClass.SECRET_KEY, kt, template, local=True,
                                   gen_mech=mech.mechanism)
        attrs.update(policy.value_len_attr(kt, length))
        rec = self.new_record(login, handle, attrs, session)
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
        pub = self.new_record(login, ph, pub_attrs, session)
        priv = self.new_record(login, sh, priv_attrs, session)
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
            kt = int(kt_v)
            if cls == ObjectClass.SECRET_KEY:
                value = template.get(A.VALUE)
                if not isinstance(value, bytes):
                    raise Pkcs11Error(RV.TEMPLATE_INCOMPLETE, "CKA_VALUE is required")
                policy.check_secret_len(kt, len(value))
                if A.VALUE_LEN in template and template[A.VALUE_LEN] != len(value):
                    raise Pkcs11Error(RV.TEMPLATE_INCONSISTENT, "CKA_VALUE_LEN differs from CKA_VALUE")
            if kt == KeyType.EC and template.get(A.EC_PARAMS) not in policy.CURVES:
                raise Pkcs11Error(RV.ATTRIBUTE_VALUE_INVALID, "unsupported or missing CKA_EC_PARAMS")
        attrs = policy.build_attrs(int(cls), kt, template, local=False, gen_mech=None)
        if cls == ObjectClass.SECRET_KEY:
            attrs.update(policy.value_len_attr(int(kt), len(template[A.VALUE])))  # type: ignore[arg-type]
        elif cls == ObjectClass.CERTIFICATE:
            cert = template.get(A.VALUE, b"")
            attrs[A.CHECK_VALUE] = policy.certificate_check_value(
                cert if isinstance(cert, bytes) else b"")
        rec = self.new_record(login, handle, attrs, session)
        soft_t = policy.softhsm_template(int(cls), kt, handle, rec.token,
                                         self._material_template(int(cls), kt, template))
        await self.create_from_template(rec, soft_t)
        self.audit.record("key_create" if rec.is_key else "object_create", handle=handle,
                          owner=login.username, cls=int(cls), token=rec.token)
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
            extra = await self.public_material(r)
            soft_t = policy.softhsm_template(r.cls, r.key_type, new.handle, new.token, extra)

            def make() -> list[int]:
                return [hsm.create_object(raw_template(soft_t.items()))]
        await self.ks.create([new], make, replacing=False)

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
        new = self.new_record(login, new_handle, attrs, session)
        await self._clone_object(r, new)
        self.audit.record("key_copy", handle=new_handle, source=r.handle, owner=login.username)
        return new_handle

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
        await self.destroy_records([handle])
        self.audit.record("key_delete", handle=handle, by=by)

    async def get_attributes(self, conn: Conn, f: Fields) -> list[list[Any]]:
        login = self.login_of(conn, f)
        r = self.record(login, f.handle())
        out: list[AttributeResult] = []
        for a in f.attrs():
            out.append(await self._attribute(login, r, a))
        return results_to_wire(out)

    async def _attribute(self, login: Login, r: ObjectRecord, a: int) -> AttributeResult:
        secret = policy.SECRET_ATTRS.get(r.cls, frozenset())  # type: ignore[call-overload]
        if a in secret:
            if policy.is_sensitive_value(r.attrs) or not login.is_cu or r.owner != login.username:
                return AttributeResult(a, None, int(RV.ATTRIBUTE_SENSITIVE))
            return AttributeResult(a, await self._secret_attribute(r, a), 0)
        if a == A.VALUE and r.cls in (ObjectClass.DATA, ObjectClass.CERTIFICATE):
            value = await self.ks.in_hsm(self.ks.hsm.get_attribute,
                                         self.ks.soft_handle(r.handle), A.VALUE)
            return AttributeResult(a, value or b"", 0)
        if a in r.attrs:
            return AttributeResult(a, r.attrs[a], 0)
        return AttributeResult(a, None, int(RV.ATTRIBUTE_TYPE_INVALID))

    async def _secret_attribute(self, r: ObjectRecord, a: int) -> bytes | None:
        """Secret material of a non-sensitive, extractable key: by unmasking."""
        material = await self.ks.material(r)
        if r.cls == ObjectClass.SECRET_KEY:
            return material
        key = load_der_private_key(material, password=None)
        if isinstance(key, rsa.RSAPrivateKey):
            nums = key.private_numbers()
            values: dict[int, int] = {
                A.PRIVATE_EXPONENT: nums.d, A.PRIME_1: nums.p, A.PRIME_2: nums.q,
                A.EXPONENT_1: nums.dmp1, A.EXPONENT_2: nums.dmq1, A.COEFFICIENT: nums.iqmp}
            v = values.get(a)
            return v.to_bytes((v.bit_length() + 7) // 8, "big") if v is not None else None
        if isinstance(key, ec.EllipticCurvePrivateKey) and a == A.VALUE:
            size = (key.curve.key_size + 7) // 8
            return key.private_numbers().private_value.to_bytes(size, "big")
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
        login = self.login_of(conn, f)
        handle, template = f.handle(), f.template()
        if not login.is_cu:
            await self._set_trusted(login, handle, template)
            return
        r = self.owned(login, handle)
        if A.MODIFIABLE in r.attrs and not r.flag(A.MODIFIABLE):
            raise Pkcs11Error(RV.ACTION_PROHIBITED, "object is not modifiable")
        for a in template:
            if a not in policy.MODIFIABLE:
                raise Pkcs11Error(RV.ATTRIBUTE_READ_ONLY, f"attribute 0x{a:x} cannot be modified")
            if a not in r.attrs:
                raise Pkcs11Error(RV.ATTRIBUTE_TYPE_INVALID, f"attribute 0x{a:x} is not valid here")
        if A.TRUSTED in template and template[A.TRUSTED] != r.attrs.get(A.TRUSTED):
            # CloudHSM: only an admin sets CKA_TRUSTED.
            raise Pkcs11Error(RV.ATTRIBUTE_READ_ONLY, "only an admin may change CKA_TRUSTED")
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

    async def _set_trusted(self, login: Login, handle: int, template: Template) -> None:
        """An admin (CO) may change CKA_TRUSTED of a key and nothing else (CloudHSM)."""
        if set(template) != {A.TRUSTED}:
            raise Pkcs11Error(RV.USER_TYPE_INVALID, "an admin may only change CKA_TRUSTED")
        r = self.record(login, handle)
        if A.TRUSTED not in r.attrs:
            raise Pkcs11Error(RV.ATTRIBUTE_TYPE_INVALID, "CKA_TRUSTED is not valid for this object")
        await self.ks.update(r.with_attrs(template))
        self.audit.record("key_modify", handle=handle, by=login.username, attrs=[int(A.TRUSTED)])

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
            extra = await self.public_material(r)
            soft_t = policy.softhsm_template(r.cls, r.key_type, new.handle, True, extra)

            def make() -> list[int]:
                return [hsm.create_object(raw_template(soft_t.items()))]
        await self.ks.create([new], make, replacing=True)

    def find_objects(self, conn: Conn, f: Fields) -> list[int]:
        login = self.login_of(conn, f)
        template = f.template()
        session = f.opt_int("session")
        # An admin may ask for the objects one crypto user sees (`hsmsim key list --user`):
        # the ones it owns or that are shared with it, and the public keys.
        as_user = f.opt_str("as_user")
        if as_user is not None and login.role != ROLE_CO:
            raise Pkcs11Error(RV.USER_TYPE_INVALID, "only an admin (CO) can list another user's keys")
        out = []
        for h in self.ks.catalog.find(template):
            r = self.ks.catalog.records[h]
            if not self.visible(login, r):
                continue
            if as_user is not None and not sees(as_user, r):
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
            await self.destroy_records(doomed)
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
