"""Mechanisms the node adds beyond SoftHSM2's own: DES3, AES-GCM key wrap, ECDH1 with X9.63
KDFs, and CloudHSM's SP 800-108 counter KDF, against a real node process, with known answers
or cross-checked with pyca/cryptography."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives import padding as sympad

from hsmsim.pkcs11.constants import RV, Attribute as A, KeyType, Mechanism as M, ObjectClass
from hsmsim.pkcs11.errors import error_class
from hsmsim.pkcs11.params import GcmParams, MechanismSpec as Spec, RawParams

from .nodeproc import NodeProc, run

USE = {A.ENCRYPT: True, A.DECRYPT: True, A.WRAP: True, A.UNWRAP: True, A.DERIVE: True}
READABLE = {A.SENSITIVE: False, A.EXTRACTABLE: True, A.TOKEN: False}


def _tdes(key: bytes):  # type: ignore[no-untyped-def]
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
    return TripleDES(key)


def test_des3_generate_and_modes_cross_checked(node_a: NodeProc, handles) -> None:
    async def body() -> None:
        c, lid = await node_a.login("alice")
        # Generated in the node: the defaults and sizes.
        g = await c.generate_key(lid, Spec(M.DES3_KEY_GEN), {**USE, **READABLE},
                                 handle=handles(), session=1)
        kt, vlen, mech = await c.get_attributes(lid, g, [A.KEY_TYPE, A.VALUE_LEN,
                                                         A.KEY_GEN_MECHANISM])
        assert (kt.value, vlen.value, mech.value) == (KeyType.DES3, 24, M.DES3_KEY_GEN)
        with pytest.raises(error_class(RV.KEY_SIZE_RANGE)):
            await c.generate_key(lid, Spec(M.DES3_KEY_GEN), {A.VALUE_LEN: 16},
                                 handle=handles(), session=1)
        # Imported with known material: ECB, CBC, CBC-PAD against pyca.
        key = os.urandom(24)
        h = await c.create_object(lid, {A.CLASS: ObjectClass.SECRET_KEY,  # type: ignore[arg-type]
                                        A.KEY_TYPE: KeyType.DES3, A.VALUE: key, A.TOKEN: False,
                                        **USE}, handle=handles(), session=1)
        iv, pt = os.urandom(8), os.urandom(32)
        ecb = (await c.encrypt(lid, h, Spec(M.DES3_ECB), pt)).data
        e = Cipher(_tdes(key), modes.ECB()).encryptor()
        assert ecb == e.update(pt) + e.finalize()
        cbc = (await c.encrypt(lid, h, Spec(M.DES3_CBC, RawParams(iv)), pt)).data
        e = Cipher(_tdes(key), modes.CBC(iv)).encryptor()
        assert cbc == e.update(pt) + e.finalize()
        odd = pt[:13]
        pad = (await c.encrypt(lid, h, Spec(M.DES3_CBC_PAD, RawParams(iv)), odd)).data
        pd = sympad.PKCS7(64).padder()
        e = Cipher(_tdes(key), modes.CBC(iv)).encryptor()
        assert pad == e.update(pd.update(odd) + pd.finalize()) + e.finalize()
        assert await c.decrypt(lid, h, Spec(M.DES3_ECB), ecb) == pt
        assert await c.decrypt(lid, h, Spec(M.DES3_CBC, RawParams(iv)), cbc) == pt
        assert await c.decrypt(lid, h, Spec(M.DES3_CBC_PAD, RawParams(iv)), pad) == odd
        # The generated key works too, and key types do not mix with mechanisms.
        ct = (await c.encrypt(lid, g, Spec(M.DES3_CBC_PAD, RawParams(iv)), b"x")).data
        assert await c.decrypt(lid, g, Spec(M.DES3_CBC_PAD, RawParams(iv)), ct) == b"x"
        with pytest.raises(error_class(RV.KEY_TYPE_INCONSISTENT)):
            await c.encrypt(lid, h, Spec(M.AES_ECB), b"\0" * 16)
        aes = await c.generate_key(lid, Spec(M.AES_KEY_GEN), {A.VALUE_LEN: 16, **USE},
                                   handle=handles(), session=1)
        with pytest.raises(error_class(RV.KEY_TYPE_INCONSISTENT)):
            await c.encrypt(lid, aes, Spec(M.DES3_ECB), b"\0" * 8)
        await c.close()
    run(body)


@pytest.mark.parametrize("mech", [M.AES_GCM, M.CLOUDHSM_AES_GCM])
def test_aes_gcm_wrap_unwrap_cross_checked(node_a: NodeProc, handles, mech: int) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.serialization import (Encoding, NoEncryption,
                                                              PrivateFormat, load_der_private_key)
    kek, secret = os.urandom(32), os.urandom(16)

    async def body() -> None:
        c, lid = await node_a.login("alice")
        w = await c.create_object(lid, {A.CLASS: ObjectClass.SECRET_KEY,  # type: ignore[arg-type]
                                        A.KEY_TYPE: KeyType.AES, A.VALUE: kek, A.TOKEN: False,
                                        **USE}, handle=handles(), session=1)
        k = await c.create_object(lid, {A.CLASS: ObjectClass.SECRET_KEY,  # type: ignore[arg-type]
                                        A.KEY_TYPE: KeyType.AES, A.VALUE: secret,
                                        A.TOKEN: False, A.ENCRYPT: True}, handle=handles(),
                                  session=1)
        spec = Spec(mech, GcmParams(b"", b"wrap aad"))
        blob = await c.wrap_key(lid, w, spec, k)
        assert len(blob) == 12 + 16 + 16
        assert AESGCM(kek).decrypt(blob[:12], blob[12:], b"wrap aad") == secret
        assert blob[:12] != (await c.wrap_key(lid, w, spec, k))[:12]  # HSM-generated IVs
        # pyca's blob unwraps in the node; the key's value is the wrapped one.
        iv = os.urandom(12)
        other = os.urandom(32)
        pblob = iv + AESGCM(kek).encrypt(iv, other, b"wrap aad")
        u = await c.unwrap_key(lid, w, spec, pblob, {A.CLASS: ObjectClass.SECRET_KEY,
                                                     A.KEY_TYPE: KeyType.AES, **READABLE},
                               handle=handles(), session=1)
        val, vlen = await c.get_attributes(lid, u, [A.VALUE, A.VALUE_LEN])
        assert (val.value, vlen.value) == (other, 32)
        # A private key round-trips as PKCS#8.
        priv = ec.generate_private_key(ec.SECP256R1())
        der = priv.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption())
        iv = os.urandom(12)
        u = await c.unwrap_key(lid, w, spec, iv + AESGCM(kek).encrypt(iv, der, b"wrap aad"),
                               {A.CLASS: ObjectClass.PRIVATE_KEY, A.KEY_TYPE: KeyType.EC,
                                A.SIGN: True, A.EXTRACTABLE: True, A.TOKEN: False},
                               handle=handles(), session=1)
        again = await c.wrap_key(lid, w, spec, u)
        plain = AESGCM(kek).decrypt(again[:12], again[12:], b"wrap aad")
        assert load_der_private_key(plain, None).private_numbers() == priv.private_numbers()  # type: ignore[union-attr]
        # Wrong AAD, tampering and truncation: CKR_WRAPPED_KEY_INVALID / _LEN_RANGE, no object.
        t = {A.CLASS: ObjectClass.SECRET_KEY, A.KEY_TYPE: KeyType.AES, A.TOKEN: False}
        with pytest.raises(error_class(RV.WRAPPED_KEY_INVALID)):
            await c.unwrap_key(lid, w, Spec(mech, GcmParams(b"", b"other")), pblob, t,
                               handle=handles(), session=1)
        with pytest.raises(error_class(RV.WRAPPED_KEY_INVALID)):
            await c.unwrap_key(lid, w, spec, pblob[:-1] + bytes([pblob[-1] ^ 1]), t,
                               handle=handles(), session=1)
        with pytest.raises(error_class(RV.WRAPPED_KEY_LEN_RANGE)):
            await c.unwrap_key(lid, w, spec, pblob[:8], t, handle=handles(), session=1)
        with pytest.raises(error_class(RV.MECHANISM_PARAM_INVALID)):
            await c.wrap_key(lid, w, Spec(mech), k)
        await c.close()
    run(body)
