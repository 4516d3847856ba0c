"""Crypto operations: encrypt/decrypt, sign/verify, digest and random. AES-GCM and RSA run in
the C core on cached contexts (RSA PKCS#1 signatures batched); everything else runs in
SoftHSM2. Key wrapping, unwrapping and derivation are in ops_keys, on the same cached
contexts (KeyContexts)."""

from __future__ import annotations

import hashlib
from functools import partial
import hmac
from typing import Any

from hsmsim.core import AesGcmKey, RsaPrivateKey, RsaPublicKey
from hsmsim.node import engine
from hsmsim.node.codec import Fields
from hsmsim.node.context import Conn, Ops
from hsmsim.node.index import ObjectRecord
from hsmsim.node.keystore import value_len
from hsmsim.pkcs11.constants import RV, Attribute as A, KeyType, Mechanism as M, ObjectClass
from hsmsim.pkcs11.errors import Pkcs11Error
from hsmsim.pkcs11.mechanisms import HASH_OF_ECDSA, HASH_OF_HMAC, HASH_OF_MECHANISM
from hsmsim.pkcs11.params import MechanismSpec

MAX_RANDOM = 64 * 1024
SOFTHSM_SYMMETRIC = {M.AES_CBC: KeyType.AES, M.AES_CBC_PAD: KeyType.AES, M.AES_ECB: KeyType.AES,
                     M.AES_CTR: KeyType.AES, M.DES3_ECB: KeyType.DES3, M.DES3_CBC: KeyType.DES3,
                     M.DES3_CBC_PAD: KeyType.DES3}


class KeyContexts(Ops):
    """The C core's cached key contexts (AES-GCM, RSA private and public), loaded by unmasking
    a key on its first use: shared by the crypto operations and the wrapping ones (ops_keys)."""

    async def aes_ctx(self, r: ObjectRecord) -> AesGcmKey:
        async def load() -> AesGcmKey:
            material = await self.ks.material(r)
            return AesGcmKey(material)
        ctx = await self.engine.get(r.handle, load)
        assert isinstance(ctx, AesGcmKey)
        return ctx

    async def rsa_private(self, r: ObjectRecord) -> RsaPrivateKey | None:
        """The cached C-core key, or None for a key the core does not take (size)."""
        bits = r.attrs.get(A.MODULUS_BITS)
        if not isinstance(bits, int) or not 2048 <= bits <= 4096:
            return None

        async def load() -> RsaPrivateKey:
            der = await self.ks.material(r)
            return await self.ks.in_hsm(partial(RsaPrivateKey.from_der, der,
                                                 batch_threads=engine.RSA_BATCH_THREADS))
        ctx = await self.engine.get(r.handle, load)
        assert isinstance(ctx, RsaPrivateKey)
        return ctx

    async def rsa_public(self, r: ObjectRecord) -> RsaPublicKey | None:
        n, e = r.attrs.get(A.MODULUS), r.attrs.get(A.PUBLIC_EXPONENT)
        if not isinstance(n, bytes) or not isinstance(e, bytes) or not 2048 <= len(n) * 8 <= 4096:
            return None

        async def load() -> RsaPublicKey:
            return RsaPublicKey.from_components(int.from_bytes(n, "big"), int.from_bytes(e, "big"))
        ctx = await self.engine.get(r.handle, load)
        assert isinstance(ctx, RsaPublicKey)
        return ctx


class CryptoOps(KeyContexts):
    def _batcher(self, handle: int, key: RsaPrivateKey) -> engine.SignBatcher:
        b = self.ctx.batchers.get(handle)
        if b is None or b.key is not key:
            b = self.ctx.batchers[handle] = engine.SignBatcher(key)
        return b

    async def encrypt(self, conn: Conn, f: Fields) -> dict[str, Any]:
        login = self.cu_of(conn, f)
        mech, data = f.mech(), f.bytes("data")
        r = self.usable(login, f.handle(), A.ENCRYPT, mech.mechanism)
        m = mech.mechanism
        if m in engine.GCM_MECHS:
            self.check_key_type(r, ObjectClass.SECRET_KEY, KeyType.AES)
            key = await self.aes_ctx(r)
            if len(data) > engine.INLINE_LIMIT:
                ct, iv = await self.ks.in_hsm(engine.gcm_encrypt, key, mech.param, data)
            else:
                ct, iv = engine.gcm_encrypt(key, mech.param, data)
            return {"data": ct, "iv": iv}
        if m in engine.RSA_CRYPT_MECHS:
            self.check_key_type(r, ObjectClass.PUBLIC_KEY, KeyType.RSA)
            pub = await self.rsa_public(r)
            if pub is not None:
                return {"data": await self.ks.in_hsm(engine.rsa_encrypt, pub, m, mech.param, data),
                        "iv": None}
        elif m in SOFTHSM_SYMMETRIC:
            self.check_key_type(r, ObjectClass.SECRET_KEY, SOFTHSM_SYMMETRIC[m])  # type: ignore[index]
        else:
            raise Pkcs11Error(RV.MECHANISM_INVALID, f"mechanism 0x{m:x} cannot encrypt")
        out = await self.ks.in_hsm(self.ks.hsm.encrypt, mech, self.ks.soft_handle(r.handle), data)
        return {"data": out, "iv": None}

    async def decrypt(self, conn: Conn, f: Fields) -> bytes:
        login = self.cu_of(conn, f)
        mech, data = f.mech(), f.bytes("data")
        r = self.usable(login, f.handle(), A.DECRYPT, mech.mechanism)
        m = mech.mechanism
        if m in engine.GCM_MECHS:
            self.check_key_type(r, ObjectClass.SECRET_KEY, KeyType.AES)
            key = await self.aes_ctx(r)
            if len(data) > engine.INLINE_LIMIT:
                return await self.ks.in_hsm(engine.gcm_decrypt, key, mech.param, data)
            return engine.gcm_decrypt(key, mech.param, data)
        if m in engine.RSA_CRYPT_MECHS:
            self.check_key_type(r, ObjectClass.PRIVATE_KEY, KeyType.RSA)
            priv = await self.rsa_private(r)
            if priv is not None:
                return await self.ks.in_hsm(engine.rsa_decrypt, priv, m, mech.param, data)
        elif m in SOFTHSM_SYMMETRIC:
            self.check_key_type(r, ObjectClass.SECRET_KEY, SOFTHSM_SYMMETRIC[m])  # type: ignore[index]
        else:
            raise Pkcs11Error(RV.MECHANISM_INVALID, f"mechanism 0x{m:x} cannot decrypt")
        return await self.ks.in_hsm(self.ks.hsm.decrypt, mech, self.ks.soft_handle(r.handle), data)

    def _softhsm_sign_mech(self, r: ObjectRecord, mech: MechanismSpec,
                           data: bytes) -> tuple[MechanismSpec, bytes]:
        m = mech.mechanism
        if m == M.ECDSA or m in HASH_OF_ECDSA:
            if r.key_type != KeyType.EC:
                raise Pkcs11Error(RV.KEY_TYPE_INCONSISTENT, "ECDSA needs an EC key")
            if m in HASH_OF_ECDSA:
                # Hash in the node, sign the digest with CKM_ECDSA: same signature.
                return (MechanismSpec(M.ECDSA),
                        hashlib.new(HASH_OF_ECDSA[m], data).digest())
            return mech, data
        if m in HASH_OF_HMAC:
            if r.cls != ObjectClass.SECRET_KEY:
                raise Pkcs11Error(RV.KEY_TYPE_INCONSISTENT, "HMAC needs a secret key")
            return mech, data
        if m == M.AES_CMAC:
            if r.key_type != KeyType.AES:
                raise Pkcs11Error(RV.KEY_TYPE_INCONSISTENT, "AES-CMAC needs an AES key")
            return mech, data
        raise Pkcs11Error(RV.MECHANISM_INVALID, f"mechanism 0x{m:x} cannot sign")

    async def _own_hmac(self, r: ObjectRecord, mech: MechanismSpec, data: bytes) -> bytes | None:
        """HMAC computed by the node on the key loaded by unmasking, where SoftHSM2 would refuse
        a key CloudHSM takes: AES keys, and keys shorter than the digest (SoftHSM2 answers
        CKR_KEY_SIZE_RANGE). None: SoftHSM2 computes it, as for every other HMAC key."""
        name = HASH_OF_HMAC.get(mech.mechanism)
        if name is None or r.cls != ObjectClass.SECRET_KEY:
            return None
        short = (value_len(r) or 0) < hashlib.new(name).digest_size
        if r.key_type != KeyType.AES and not short:
            return None
        key = await self.ks.material(r)
        return hmac.new(key, data, name).digest()

    async def sign(self, conn: Conn, f: Fields) -> bytes:
        login = self.cu_of(conn, f)
        mech, data = f.mech(), f.bytes("data")
        r = self.usable(login, f.handle(), A.SIGN, mech.mechanism)
        if mech.mechanism in engine.RSA_SIGN_MECHS:
            self.check_key_type(r, ObjectClass.PRIVATE_KEY, KeyType.RSA)
            priv = await self.rsa_private(r)
            if priv is not None:
                batchable = engine.pkcs1_batchable(mech.mechanism, data)
                if batchable is not None:
                    return await self._batcher(r.handle, priv).sign(*batchable)
                return await self.ks.in_hsm(engine.rsa_sign, priv, mech.mechanism, mech.param, data)
            return await self.ks.in_hsm(self.ks.hsm.sign, mech, self.ks.soft_handle(r.handle), data)
        soft_mech, soft_data = self._softhsm_sign_mech(r, mech, data)
        mac = await self._own_hmac(r, mech, data)
        if mac is not None:
            return mac
        if soft_mech.mechanism == M.ECDSA and r.cls == ObjectClass.PRIVATE_KEY:
            signer = await self._ec_private(r)
            if signer is not None:
                sig = (signer.sign(soft_data) if signer.inline
                       else await self.ks.in_hsm(signer.sign, soft_data))
                if sig is not None:
                    return sig
        return await self.ks.in_hsm(self.ks.hsm.sign, soft_mech, self.ks.soft_handle(r.handle),
                                    soft_data)

    async def _ec_private(self, r: ObjectRecord) -> engine.EcSigner | None:
        """The cached EC signer (loaded by unmasking), or None to leave the key to SoftHSM2."""
        async def load() -> engine.EcSigner:
            der = await self.ks.material(r)
            return engine.EcSigner(der)
        try:
            ctx = await self.engine.get(r.handle, load)
        except (Pkcs11Error, ValueError, TypeError):
            return None  # e.g. a curve pyca does not load: SoftHSM2 signs
        return ctx if isinstance(ctx, engine.EcSigner) else None

    async def verify(self, conn: Conn, f: Fields) -> None:
        login = self.cu_of(conn, f)
        mech, data, sig = f.mech(), f.bytes("data"), f.bytes("signature")
        r = self.usable(login, f.handle(), A.VERIFY, mech.mechanism)
        if mech.mechanism in engine.RSA_SIGN_MECHS:
            self.check_key_type(r, ObjectClass.PUBLIC_KEY, KeyType.RSA)
            pub = await self.rsa_public(r)
            if pub is not None:
                engine.rsa_verify(pub, mech.mechanism, mech.param, data, sig)
                return
            await self.ks.in_hsm(self.ks.hsm.verify, mech, self.ks.soft_handle(r.handle), data, sig)
            return
        soft_mech, soft_data = self._softhsm_sign_mech(r, mech, data)
        mac = await self._own_hmac(r, mech, data)
        if mac is not None:
            if not hmac.compare_digest(mac, sig):
                raise Pkcs11Error(RV.SIGNATURE_INVALID, "HMAC mismatch")
            return
        await self.ks.in_hsm(self.ks.hsm.verify, soft_mech, self.ks.soft_handle(r.handle),
                             soft_data, sig)

    async def digest(self, f: Fields) -> bytes:
        mech, data = f.mech(), f.bytes("data")
        if mech.mechanism not in HASH_OF_MECHANISM or mech.param is not None:
            raise Pkcs11Error(RV.MECHANISM_INVALID, f"mechanism 0x{mech.mechanism:x} is not a digest")
        return await self.ks.in_hsm(self.ks.hsm.digest, mech, data)

    async def generate_random(self, f: Fields) -> bytes:
        length = f.int("length", lo=1, hi=MAX_RANDOM)
        return await self.ks.in_hsm(self.ks.hsm.generate_random, length)
