"""Key operations that carry key material across the HSM's boundary: C_WrapKey, C_UnwrapKey
(AES key wrap RFC 3394/5649, AES-GCM, RSA-OAEP/PKCS #1 v1.5 and CKM_RSA_AES_KEY_WRAP) and
C_DeriveKey (ECDH with CloudHSM's X9.63 KDFs, SP 800-108 counter KDF). Key material is
unmasked inside this process only; the C core's contexts come from ops_crypto.KeyContexts."""

from __future__ import annotations

import secrets
from dataclasses import replace

from cryptography.hazmat.primitives.keywrap import (InvalidUnwrap, aes_key_unwrap,
                                                    aes_key_unwrap_with_padding, aes_key_wrap,
                                                    aes_key_wrap_with_padding)

from hsmsim.core import RsaPrivateKey, RsaPublicKey
from hsmsim.node import engine, kdf, policy
from hsmsim.node.codec import Fields
from hsmsim.node.context import Conn
from hsmsim.node.index import ObjectRecord
from hsmsim.node.ops_crypto import KeyContexts
from hsmsim.pkcs11.constants import RV, Attribute as A, KeyType, Mechanism as M, ObjectClass
from hsmsim.pkcs11.errors import Pkcs11Error
from hsmsim.pkcs11.mechanisms import HASH_OF_KDF
from hsmsim.pkcs11.params import Ecdh1Params, GcmParams, RawParams, RsaAesKeyWrapParams

AES_WRAPS = {M.AES_KEY_WRAP: M.AES_KEY_WRAP, M.AES_KEY_WRAP_PAD: M.AES_KEY_WRAP_PAD,
             M.CLOUDHSM_AES_KEY_WRAP_NO_PAD: M.AES_KEY_WRAP,
             M.CLOUDHSM_AES_KEY_WRAP_PKCS5_PAD: M.AES_KEY_WRAP_PAD}
RSA_WRAPS = frozenset({M.RSA_PKCS_OAEP, M.RSA_PKCS, M.RSA_AES_KEY_WRAP})
RSA_AES_KEY_BITS = (128, 192, 256)


def _wrapping_key_type(r: ObjectRecord, cls: int, kt: int, *, unwrap: bool = False) -> None:
    """PKCS#11 2.40 C_WrapKey/C_UnwrapKey: a (un)wrapping key of the wrong class or type is
    CKR_(UN)WRAPPING_KEY_TYPE_INCONSISTENT (SoftHSM2 answers the same).
    FIDELITY: CloudHSM's codes for wrong wrapping keys are undocumented; these are PKCS#11's."""
    if r.cls != cls or r.key_type != kt:
        if unwrap:
            raise Pkcs11Error(RV.UNWRAPPING_KEY_TYPE_INCONSISTENT,
                              "unwrapping key does not fit the mechanism")
        raise Pkcs11Error(RV.WRAPPING_KEY_TYPE_INCONSISTENT, "wrapping key does not fit the mechanism")


def _rsa_aes_params(p: object) -> RsaAesKeyWrapParams:
    if not isinstance(p, RsaAesKeyWrapParams) or p.aes_key_bits not in RSA_AES_KEY_BITS:
        raise Pkcs11Error(RV.MECHANISM_PARAM_INVALID,
                          "CKM_RSA_AES_KEY_WRAP needs CK_RSA_AES_KEY_WRAP_PARAMS with 128/192/256 bits")
    return p


def rsa_aes_wrap(pub: RsaPublicKey, param: object, material: bytes) -> bytes:
    """CKM_RSA_AES_KEY_WRAP (PKCS#11 2.40 §2.1.21): a fresh AES key of ulAESKeyBits, RSA-OAEP
    encrypted, followed by the key material wrapped under it with RFC 5649 (CKM_AES_KEY_WRAP_PAD).
    The ephemeral key exists only inside this call, in the node."""
    p = _rsa_aes_params(param)
    ephemeral = secrets.token_bytes(p.aes_key_bits // 8)
    head = engine.rsa_encrypt(pub, M.RSA_PKCS_OAEP, p.oaep, ephemeral)
    return head + aes_key_wrap_with_padding(ephemeral, material)


def rsa_aes_unwrap(priv: RsaPrivateKey, param: object, data: bytes) -> bytes:
    """The reverse of `rsa_aes_wrap`: the first modulus-length bytes give the ephemeral AES key
    (RSA-OAEP), the rest the key material (RFC 5649). Every failure after the parameter check
    is CKR_WRAPPED_KEY_INVALID (or _LEN_RANGE for a blob that cannot hold both parts)."""
    p = _rsa_aes_params(param)
    k = priv.key_size // 8
    if len(data) < k + 16 or (len(data) - k) % 8:
        raise Pkcs11Error(RV.WRAPPED_KEY_LEN_RANGE, "wrapped key is too short or misaligned")
    try:
        ephemeral = engine.rsa_decrypt(priv, M.RSA_PKCS_OAEP, p.oaep, data[:k])
    except Pkcs11Error as exc:
        if exc.rv == RV.MECHANISM_PARAM_INVALID:
            raise
        raise Pkcs11Error(RV.WRAPPED_KEY_INVALID, "wrapped AES key does not decrypt") from None
    # PKCS#11 does not tie the recovered key's length to ulAESKeyBits on unwrap; any AES size does.
    if len(ephemeral) * 8 not in RSA_AES_KEY_BITS:
        raise Pkcs11Error(RV.WRAPPED_KEY_INVALID, "wrapped AES key has no AES key size")
    try:
        return aes_key_unwrap_with_padding(ephemeral, data[k:])
    except (InvalidUnwrap, ValueError):
        raise Pkcs11Error(RV.WRAPPED_KEY_INVALID, "wrapped key does not unwrap") from None



class KeyOps(KeyContexts):
    async def wrap_key(self, conn: Conn, f: Fields) -> bytes:
        login = self.cu_of(conn, f)
        mech = f.mech()
        wrapping = self.usable(login, f.handle("wrapping"), A.WRAP, mech.mechanism)
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
            _wrapping_key_type(wrapping, ObjectClass.SECRET_KEY, KeyType.AES)
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
        if m in engine.GCM_MECHS:
            # AES-GCM over the key material (PKCS#8 DER for private keys) with an HSM-generated
            # IV, as C_Encrypt; both mechanisms return IV || ciphertext || tag (the gateway
            # writes the IV back into CK_GCM_PARAMS for CKM_AES_GCM).
            _wrapping_key_type(wrapping, ObjectClass.SECRET_KEY, KeyType.AES)
            gcm = await self.aes_ctx(wrapping)
            material = await self.ks.material(key)
            ct, iv = engine.gcm_encrypt(gcm, mech.param, material)
            return iv + ct
        if m in RSA_WRAPS:
            _wrapping_key_type(wrapping, ObjectClass.PUBLIC_KEY, KeyType.RSA)
            if m == M.RSA_AES_KEY_WRAP:
                _rsa_aes_params(mech.param)
            elif key.cls != ObjectClass.SECRET_KEY:
                # PKCS#11 2.40 §2.1.6/§2.1.8: RSA PKCS #1 v1.5 and OAEP wrap secret keys only.
                raise Pkcs11Error(RV.KEY_NOT_WRAPPABLE,
                                  "RSA-OAEP and RSA PKCS #1 v1.5 wrap secret keys only")
            pub = await self.rsa_public(wrapping)
            if pub is None:
                raise Pkcs11Error(RV.WRAPPING_KEY_SIZE_RANGE, "wrapping key must be RSA 2048..4096")
            material = await self.ks.material(key)
            if m == M.RSA_AES_KEY_WRAP:
                # Secret key value or PKCS#8 DER of a private key, as CloudHSM's import path expects.
                return await self.ks.in_hsm(rsa_aes_wrap, pub, mech.param, material)
            try:
                return await self.ks.in_hsm(engine.rsa_encrypt, pub, m, mech.param, material)
            except Pkcs11Error as exc:
                if exc.rv == RV.DATA_LEN_RANGE:
                    raise Pkcs11Error(RV.KEY_SIZE_RANGE,
                                      "the key is too long for this wrapping key") from None
                raise
        raise Pkcs11Error(RV.MECHANISM_INVALID, f"mechanism 0x{m:x} cannot wrap")

    async def unwrap_key(self, conn: Conn, f: Fields) -> int:
        login = self.cu_of(conn, f)
        mech, data, template = f.mech(), f.bytes("data"), f.template()
        unwrapping = self.usable(login, f.handle("unwrapping"), A.UNWRAP, mech.mechanism)
        handle, session = f.handle(), f.int("session", 0)
        policy.check_user_template(template, creating=True)
        cls, kt = template.get(A.CLASS), template.get(A.KEY_TYPE)
        if cls not in (ObjectClass.SECRET_KEY, ObjectClass.PRIVATE_KEY) or \
                kt not in policy.SUPPORTED_KEY_TYPES[cls]:  # type: ignore[index]
            raise Pkcs11Error(RV.TEMPLATE_INCOMPLETE, "unwrap needs CKA_CLASS and CKA_KEY_TYPE "
                              "of a supported secret or private key")
        attrs = policy.build_attrs(int(cls), int(kt), template, local=False, gen_mech=None)
        rec = self.new_record(login, handle, attrs, session)
        soft_t = policy.softhsm_template(int(cls), int(kt), handle, rec.token)
        m = mech.mechanism
        if m in AES_WRAPS:
            # RFC 3394 output is n+1 >= 3 blocks of 8 bytes, RFC 5649's >= 2: any other length is
            # CKR_WRAPPED_KEY_LEN_RANGE (PKCS#11 2.40 §5.14; SoftHSM2 checks the same bounds).
            padded = AES_WRAPS[m] == M.AES_KEY_WRAP_PAD  # type: ignore[index]
            if len(data) % 8 or len(data) < (16 if padded else 24):
                raise Pkcs11Error(RV.WRAPPED_KEY_LEN_RANGE, "wrapped key length is not a multiple "
                                  f"of 8 bytes of at least {16 if padded else 24}")
            _wrapping_key_type(unwrapping, ObjectClass.SECRET_KEY, KeyType.AES, unwrap=True)
            # Unwrapped in the node (SoftHSM 2.6.1 loses CKA_VALUE_LEN on unwrap); the KEK is
            # unmasked inside this process only.
            kek = await self.ks.material(unwrapping)
            try:
                if padded:
                    material = aes_key_unwrap_with_padding(kek, data)
                else:
                    material = aes_key_unwrap(kek, data)
            except (InvalidUnwrap, ValueError):
                raise Pkcs11Error(RV.WRAPPED_KEY_INVALID, "wrapped key does not unwrap") from None
        elif m in engine.GCM_MECHS:
            # IV || ciphertext || tag, as wrap_key returns it.
            _wrapping_key_type(unwrapping, ObjectClass.SECRET_KEY, KeyType.AES, unwrap=True)
            p = mech.param
            if not isinstance(p, GcmParams) or len(data) < engine.GCM_IV_LEN:
                raise Pkcs11Error(RV.MECHANISM_PARAM_INVALID if not isinstance(p, GcmParams)
                                  else RV.WRAPPED_KEY_LEN_RANGE, "bad AES-GCM wrapped key")
            gcm = await self.aes_ctx(unwrapping)
            try:
                material = engine.gcm_decrypt(gcm, replace(p, iv=data[:engine.GCM_IV_LEN]),
                                              data[engine.GCM_IV_LEN:])
            except Pkcs11Error as exc:
                if exc.rv == RV.MECHANISM_PARAM_INVALID:
                    raise
                raise Pkcs11Error(RV.WRAPPED_KEY_INVALID, "wrapped key does not decrypt") from None
        elif m in RSA_WRAPS:
            _wrapping_key_type(unwrapping, ObjectClass.PRIVATE_KEY, KeyType.RSA, unwrap=True)
            if m == M.RSA_AES_KEY_WRAP:
                _rsa_aes_params(mech.param)
            elif cls != ObjectClass.SECRET_KEY:
                raise Pkcs11Error(RV.TEMPLATE_INCONSISTENT,
                                  "RSA-OAEP and RSA PKCS #1 v1.5 unwrap secret keys only")
            priv = await self.rsa_private(unwrapping)
            if priv is None:
                raise Pkcs11Error(RV.UNWRAPPING_KEY_SIZE_RANGE, "unwrapping key must be RSA 2048..4096")
            if m == M.RSA_AES_KEY_WRAP:
                material = await self.ks.in_hsm(rsa_aes_unwrap, priv, mech.param, data)
            else:
                if len(data) != priv.key_size // 8:
                    raise Pkcs11Error(RV.WRAPPED_KEY_LEN_RANGE,
                                      "wrapped key length differs from the modulus")
                try:
                    material = await self.ks.in_hsm(engine.rsa_decrypt, priv, m, mech.param, data)
                except Pkcs11Error as exc:
                    if exc.rv == RV.MECHANISM_PARAM_INVALID:
                        raise
                    raise Pkcs11Error(RV.WRAPPED_KEY_INVALID, "wrapped key does not decrypt") from None
        else:
            raise Pkcs11Error(RV.MECHANISM_INVALID, f"mechanism 0x{m:x} cannot unwrap")
        if cls == ObjectClass.SECRET_KEY:
            policy.check_secret_len(int(kt), len(material))
            if A.VALUE_LEN in template and template[A.VALUE_LEN] != len(material):
                raise Pkcs11Error(RV.TEMPLATE_INCONSISTENT, "CKA_VALUE_LEN differs from the key")
            rec = replace(rec, attrs={**rec.attrs, **policy.value_len_attr(int(kt), len(material))})
            soft_t[A.VALUE] = material
        else:
            real_kt, parts = policy.private_key_material(material)
            if real_kt != kt:
                raise Pkcs11Error(RV.TEMPLATE_INCONSISTENT, "CKA_KEY_TYPE differs from the key")
            soft_t.update(parts)
        await self.create_from_template(rec, soft_t)
        self.audit.record("key_unwrap", handle=handle, owner=login.username, token=rec.token)
        return handle

    async def derive_key(self, conn: Conn, f: Fields) -> int:
        login = self.cu_of(conn, f)
        base = self.usable(login, f.handle("base"), A.DERIVE)
        if base.owner != login.username:
            raise Pkcs11Error(RV.ACTION_PROHIBITED, "only the key's owner may derive from it")
        mech, template = f.mech(), f.template()
        handle, session = f.handle(), f.int("session", 0)
        m = mech.mechanism
        if m == M.ECDH1_DERIVE:
            self.check_key_type(base, ObjectClass.PRIVATE_KEY, KeyType.EC)
            allowed: tuple[int, ...] = (KeyType.AES, KeyType.GENERIC_SECRET)
        elif m == M.SP800_108_COUNTER_KDF:
            if base.cls != ObjectClass.SECRET_KEY or \
                    base.key_type not in (KeyType.AES, KeyType.GENERIC_SECRET):
                raise Pkcs11Error(RV.KEY_TYPE_INCONSISTENT, "SP 800-108 needs an AES or generic "
                                  "secret base key")
            allowed = (KeyType.AES, KeyType.GENERIC_SECRET, KeyType.DES3)
        else:
            raise Pkcs11Error(RV.MECHANISM_INVALID, "derive supports CKM_ECDH1_DERIVE and "
                              "CKM_SP800_108_COUNTER_KDF")
        policy.check_user_template(template, creating=True)
        kt = template.get(A.KEY_TYPE, KeyType.GENERIC_SECRET)
        if template.get(A.CLASS, ObjectClass.SECRET_KEY) != ObjectClass.SECRET_KEY or \
                kt not in allowed:
            raise Pkcs11Error(RV.TEMPLATE_INCONSISTENT, "the mechanism cannot derive this key type")
        length = template.get(A.VALUE_LEN, policy.DES3_SIZE if kt == KeyType.DES3 else None)
        if not isinstance(length, int) or isinstance(length, bool):
            raise Pkcs11Error(RV.TEMPLATE_INCOMPLETE, "CKA_VALUE_LEN is required")
        policy.check_secret_len(int(kt), length)
        attrs = policy.build_attrs(ObjectClass.SECRET_KEY, int(kt), template, local=False,
                                   gen_mech=None)
        attrs.update(policy.value_len_attr(int(kt), length))
        p = mech.param
        if m == M.SP800_108_COUNTER_KDF:
            if not isinstance(p, RawParams):
                raise Pkcs11Error(RV.MECHANISM_PARAM_INVALID, "SP 800-108 needs its parameters")
            params = kdf.parse_counter_kdf(p.data)
            if params.prf == M.AES_CMAC and base.key_type != KeyType.AES:
                raise Pkcs11Error(RV.KEY_TYPE_INCONSISTENT, "the AES-CMAC PRF needs an AES key")
            material = kdf.counter_kdf(params, await self.ks.material(base), length)
        else:
            # CloudHSM's ECDH takes only its X9.63 KDFs (reference §1.4 Derive, checklist 36):
            # CKD_NULL (the raw shared secret, which SoftHSM2 derives) is refused like any other
            # KDF it lacks.
            if not isinstance(p, Ecdh1Params):
                raise Pkcs11Error(RV.MECHANISM_PARAM_INVALID, "ECDH needs CK_ECDH1_DERIVE_PARAMS")
            name = HASH_OF_KDF.get(p.kdf)
            if name is None:
                raise Pkcs11Error(RV.MECHANISM_PARAM_INVALID, f"unsupported ECDH KDF 0x{p.kdf:x} "
                                  "(CloudHSM: CKD_CLOUDHSM_X963_SHA*_KDF only)")
            z = await self.ks.in_hsm(kdf.ecdh_shared, await self.ks.material(base),
                                     p.public_data)
            material = kdf.x963(name, z, p.shared_data, length)
        rec = self.new_record(login, handle, attrs, session)
        soft_t = policy.softhsm_template(ObjectClass.SECRET_KEY, int(kt), handle, rec.token,
                                         {A.VALUE_LEN: length})
        # Created from the material derived in this process, as an unwrapped key.
        soft_t.pop(A.VALUE_LEN, None)  # computed by SoftHSM2 on creation
        soft_t[A.VALUE] = material
        await self.create_from_template(rec, soft_t)
        self.audit.record("key_derive", handle=handle, base=base.handle, owner=login.username)
        return handle
