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
        # PKCS#11 2.40 defines no CKA_VALUE_LEN for DES3 keys (SoftHSM2 neither).
        assert (kt.value, vlen.rv, mech.value) == (KeyType.DES3, RV.ATTRIBUTE_TYPE_INVALID,
                                                   M.DES3_KEY_GEN)
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


# ---- KDF known answers (pure functions of hsmsim.node.kdf) ----

from vectorfiles import read_vector_file  # noqa: E402

from hsmsim.node import kdf  # noqa: E402
from hsmsim.pkcs11.constants import KDF  # noqa: E402


def _records(rel: str, first: str) -> list[dict[str, str]]:
    """Records of a CAVS KDF file: section headers ([K = V] or [K=V]) carried into each."""
    out: list[dict[str, str]] = []
    ctx: dict[str, str] = {}
    cur: dict[str, str] | None = None
    for line in read_vector_file(rel).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            cur = None if not line else cur
            continue
        if line.startswith("["):
            k, _, v = line.strip("[]").partition("=")
            ctx[k.strip()] = v.strip()
            if not v:
                ctx["section"] = k.strip()
            continue
        k, _, v = line.partition("=")
        k, v = k.strip(), v.strip()
        if k == first:
            cur = dict(ctx)
            out.append(cur)
        if cur is not None:
            cur[k] = v
    return out


def test_x963_known_answers() -> None:
    names = {"SHA-1": "sha1", "SHA-224": "sha224", "SHA-256": "sha256", "SHA-384": "sha384",
             "SHA-512": "sha512"}
    recs = _records("KDF/ansx963_2001.txt", "COUNT")
    seen = set()
    for r in recs:
        name = names[r["section"]]
        want = bytes.fromhex(r["key_data"])
        got = kdf.x963(name, bytes.fromhex(r["Z"]), bytes.fromhex(r["SharedInfo"]), len(want))
        assert got == want, r
        seen.add(name)
    assert seen == set(names.values()) and len(recs) >= 50
    # Vendor and standard KDF values map to the same hashes.
    from hsmsim.pkcs11.mechanisms import HASH_OF_KDF
    assert HASH_OF_KDF[KDF.CLOUDHSM_X963_SHA256_KDF] == HASH_OF_KDF[KDF.SHA256_KDF] == "sha256"


def _ulong(*vals: int) -> bytes:
    import struct
    import sys
    return struct.pack(("<" if sys.byteorder == "little" else ">") + "Q" * len(vals), *vals)


def _flat(prf: int, params: list[tuple[int, bytes]]) -> bytes:
    import struct
    out = struct.pack("<QI", prf, len(params))
    for t, v in params:
        out += struct.pack("<QI", t, len(v)) + v
    return out


def test_sp800_108_counter_known_answers() -> None:
    prfs = {"HMAC_SHA1": M.SHA_1_HMAC, "HMAC_SHA224": M.SHA224_HMAC,
            "HMAC_SHA256": M.SHA256_HMAC, "HMAC_SHA384": M.SHA384_HMAC,
            "HMAC_SHA512": M.SHA512_HMAC, "CMAC_AES128": M.AES_CMAC, "CMAC_AES192": M.AES_CMAC,
            "CMAC_AES256": M.AES_CMAC}
    n = 0
    for r in _records("KDF/nist-800-108-KBKDF-CTR.txt", "COUNT"):
        prf = prfs.get(r["PRF"])
        width = int(r["RLEN"].split("_")[0])
        if prf is None or width not in kdf.COUNTER_WIDTHS:
            continue  # TDES CMAC and 8/24-bit counters: not CloudHSM's
        ctr = (kdf.ITERATION_VARIABLE, _ulong(width))
        loc = r["CTRLOCATION"]
        if loc == "MIDDLE_FIXED":
            params = [(kdf.BYTE_ARRAY, bytes.fromhex(r["DataBeforeCtrData"])), ctr,
                      (kdf.BYTE_ARRAY, bytes.fromhex(r["DataAfterCtrData"]))]
        else:
            fixed = (kdf.BYTE_ARRAY, bytes.fromhex(r["FixedInputData"]))
            params = [ctr, fixed] if loc == "BEFORE_FIXED" else [fixed, ctr]
        want = bytes.fromhex(r["KO"])
        assert int(r["L"]) == 8 * len(want)
        got = kdf.counter_kdf(kdf.parse_counter_kdf(_flat(prf, params)), bytes.fromhex(r["KI"]),
                              len(want))
        assert got == want, r
        n += 1
    assert n >= 150


def test_sp800_108_params_rejected() -> None:
    ctr = (kdf.ITERATION_VARIABLE, _ulong(32))
    dkm = (kdf.DKM_LENGTH, _ulong(kdf.DKM_SUM_OF_KEYS, 32))
    bad = [_flat(M.SHA256_HMAC, [dkm]),                                  # no counter
           _flat(M.SHA256_HMAC, [ctr, ctr]),                             # two counters
           _flat(M.SHA256_HMAC, [(kdf.ITERATION_VARIABLE, _ulong(24))]),  # width
           _flat(M.SHA256_HMAC, [ctr, (kdf.DKM_LENGTH, _ulong(3, 32))]),  # DKM method
           _flat(M.SHA256_HMAC, [ctr, (kdf.DKM_LENGTH, b"\0" * 3)]),      # struct size
           _flat(M.SHA256_HMAC, [ctr, (99, b"x")]),                      # type
           _flat(M.SHA256, [ctr]),                                       # PRF
           _flat(M.SHA256_HMAC, [ctr])[:-3],                             # truncated
           _flat(M.SHA256_HMAC, [ctr]) + b"x"]                           # trailing
    for raw in bad:
        with pytest.raises(error_class(RV.MECHANISM_PARAM_INVALID)):
            kdf.parse_counter_kdf(raw)
    p = kdf.parse_counter_kdf(_flat(M.SHA256_HMAC, [ctr, (kdf.DKM_LENGTH, _ulong(1, 8))]))
    with pytest.raises(error_class(RV.KEY_SIZE_RANGE)):
        kdf.counter_kdf(p, b"k" * 32, 32)  # 256 bits do not fit an 8-bit L


# ---- Derivation in a node process ----

from hsmsim.pkcs11.params import Ecdh1Params  # noqa: E402

X963 = {KDF.CLOUDHSM_X963_SHA1_KDF: "SHA1", KDF.CLOUDHSM_X963_SHA224_KDF: "SHA224",
        KDF.CLOUDHSM_X963_SHA256_KDF: "SHA256", KDF.CLOUDHSM_X963_SHA384_KDF: "SHA384",
        KDF.CLOUDHSM_X963_SHA512_KDF: "SHA512", KDF.SHA1_KDF: "SHA1", KDF.SHA256_KDF: "SHA256",
        KDF.SHA512_KDF: "SHA512"}


def test_ecdh_with_x963_kdfs_cross_checked(node_a: NodeProc, handles) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.kdf.x963kdf import X963KDF
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    async def body() -> None:
        c, lid = await node_a.login("alice")
        h = handles(); handles()
        ph, sh = await c.generate_key_pair(
            lid, Spec(M.EC_KEY_PAIR_GEN), {A.EC_PARAMS: bytes.fromhex("06082a8648ce3d030107")},
            {A.DERIVE: True}, public_handle=h, private_handle=h + 1, session=1)
        (point,) = await c.get_attributes(lid, ph, [A.EC_POINT])
        assert isinstance(point.value, bytes)
        pk = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point.value[2:])
        peer = ec.generate_private_key(ec.SECP256R1())
        raw = peer.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        z = peer.exchange(ec.ECDH(), pk)
        for i, (kdf_type, hname) in enumerate(X963.items()):
            info = b"shared info" if i % 2 else b""
            length = (16, 32, 24, 32, 32, 16, 100, 48)[i]
            kt = KeyType.GENERIC_SECRET if length in (100, 48) else KeyType.AES
            # Every other call passes the point DER-wrapped (OCTET STRING), as PKCS#11 allows.
            pub = raw if i % 2 else bytes([4, len(raw)]) + raw
            d = await c.derive_key(lid, sh, Spec(M.ECDH1_DERIVE, Ecdh1Params(kdf_type, pub, info)),
                                   {A.CLASS: ObjectClass.SECRET_KEY, A.KEY_TYPE: kt,
                                    A.VALUE_LEN: length, **READABLE}, handle=handles(), session=1)
            val, vlen, local = await c.get_attributes(lid, d, [A.VALUE, A.VALUE_LEN, A.LOCAL])
            want = X963KDF(getattr(hashes, hname)(), length, info or None).derive(z)
            assert (val.value, vlen.value, local.value) == (want, length, False), hex(kdf_type)
        # A sensitive derived key stays sensitive; the AES one encrypts.
        d = await c.derive_key(lid, sh, Spec(M.ECDH1_DERIVE, Ecdh1Params(
            KDF.CLOUDHSM_X963_SHA256_KDF, raw)), {A.CLASS: ObjectClass.SECRET_KEY,
                                                 A.KEY_TYPE: KeyType.AES, A.VALUE_LEN: 32,
                                                 A.ENCRYPT: True, A.TOKEN: False},
            handle=handles(), session=1)
        (val,) = await c.get_attributes(lid, d, [A.VALUE])
        assert val.value is None and val.rv == RV.ATTRIBUTE_SENSITIVE
        enc = await c.encrypt(lid, d, Spec(M.AES_GCM, GcmParams(b"", b"")), b"derived")
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        key = X963KDF(hashes.SHA256(), 32, None).derive(z)
        assert AESGCM(key).decrypt(enc.iv, enc.data, b"") == b"derived"
        # Bad KDF, bad point, bad length: precise errors.
        t = {A.CLASS: ObjectClass.SECRET_KEY, A.KEY_TYPE: KeyType.AES, A.VALUE_LEN: 32,
             A.TOKEN: False}
        with pytest.raises(error_class(RV.MECHANISM_PARAM_INVALID)):
            await c.derive_key(lid, sh, Spec(M.ECDH1_DERIVE, Ecdh1Params(0x80000009, raw)), t,
                               handle=handles(), session=1)
        with pytest.raises(error_class(RV.MECHANISM_PARAM_INVALID)):
            await c.derive_key(lid, sh, Spec(M.ECDH1_DERIVE, Ecdh1Params(
                KDF.CLOUDHSM_X963_SHA256_KDF, raw[:-1] + bytes([raw[-1] ^ 1]))), t,
                handle=handles(), session=1)
        with pytest.raises(error_class(RV.KEY_SIZE_RANGE)):
            await c.derive_key(lid, sh, Spec(M.ECDH1_DERIVE, Ecdh1Params(
                KDF.CLOUDHSM_X963_SHA256_KDF, raw)), {**t, A.VALUE_LEN: 20},
                handle=handles(), session=1)
        await c.close()
    run(body)


def test_sp800_108_counter_kdf_cross_checked(node_a: NodeProc, handles) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.kbkdf import (CounterLocation, KBKDFCMAC, KBKDFHMAC,
                                                          Mode)
    base_key = os.urandom(32)
    label, context = b"\x01\xab\xe1", b"\x0c\x09\x7e\x07"
    ctr32 = (kdf.ITERATION_VARIABLE, _ulong(32))
    dkm32 = (kdf.DKM_LENGTH, _ulong(kdf.DKM_SUM_OF_KEYS, 32))

    async def body() -> None:
        c, lid = await node_a.login("alice")
        aes = await c.create_object(lid, {A.CLASS: ObjectClass.SECRET_KEY,  # type: ignore[arg-type]
                                          A.KEY_TYPE: KeyType.AES, A.VALUE: base_key,
                                          A.DERIVE: True, A.TOKEN: False},
                                    handle=handles(), session=1)
        gen = await c.create_object(lid, {A.CLASS: ObjectClass.SECRET_KEY,  # type: ignore[arg-type]
                                          A.KEY_TYPE: KeyType.GENERIC_SECRET, A.VALUE: base_key,
                                          A.DERIVE: True, A.TOKEN: False},
                                    handle=handles(), session=1)

        async def derive(base: int, prf: int, params: list[tuple[int, bytes]], length: int,
                         kt: int = KeyType.GENERIC_SECRET) -> bytes:
            d = await c.derive_key(lid, base, Spec(M.SP800_108_COUNTER_KDF,
                                                   RawParams(_flat(prf, params))),
                                   {A.CLASS: ObjectClass.SECRET_KEY, A.KEY_TYPE: kt,
                                    A.VALUE_LEN: length, **READABLE}, handle=handles(), session=1)
            (v,) = await c.get_attributes(lid, d, [A.VALUE])
            assert isinstance(v.value, bytes)
            return v.value

        # HMAC PRFs, the AWS sample's layout: prefix || counter || suffix || L (middle counter).
        layout = [(kdf.BYTE_ARRAY, label), ctr32, (kdf.BYTE_ARRAY, context), dkm32]
        for prf, h in ((M.SHA_1_HMAC, hashes.SHA1()), (M.SHA256_HMAC, hashes.SHA256()),
                       (M.SHA512_HMAC, hashes.SHA512())):
            for base in (aes, gen):
                want = KBKDFHMAC(h, Mode.CounterMode, 80, 4, None, CounterLocation.MiddleFixed,
                                 None, None, label + context + (640).to_bytes(4, "big"),
                                 break_location=len(label)).derive(base_key)
                assert await derive(base, prf, layout, 80) == want
        # AES-CMAC PRF (the AWS aes_cmac_kdf.c sample), an AES key out.
        want = KBKDFCMAC(algorithms_aes(), Mode.CounterMode, 32, 4, None,
                         CounterLocation.MiddleFixed, None, None,
                         label + context + (256).to_bytes(4, "big"),
                         break_location=len(label)).derive(base_key)
        assert await derive(aes, M.AES_CMAC, layout, 32, KeyType.AES) == want
        # The legacy (2017 header) layout: Counter || Label || 0x00 || Context || L, 16-bit counter.
        legacy = [(kdf.LEGACY_COUNTER_FORMAT, _ulong(16)), (kdf.LEGACY_LABEL, label),
                  (kdf.LEGACY_CONTEXT, context), (kdf.LEGACY_DKM_FORMAT, _ulong(1, 16))]
        want = KBKDFHMAC(hashes.SHA512(), Mode.CounterMode, 24, 2, 2, CounterLocation.BeforeFixed,
                         label, context, None).derive(base_key)
        assert await derive(aes, M.SHA512_HMAC, legacy, 24, KeyType.DES3) == want
        # Errors: CMAC on a generic secret, a missing parameter, a bad one.
        t = {A.CLASS: ObjectClass.SECRET_KEY, A.KEY_TYPE: KeyType.AES, A.VALUE_LEN: 32,
             A.TOKEN: False}
        with pytest.raises(error_class(RV.KEY_TYPE_INCONSISTENT)):
            await c.derive_key(lid, gen, Spec(M.SP800_108_COUNTER_KDF, RawParams(
                _flat(M.AES_CMAC, layout))), t, handle=handles(), session=1)
        with pytest.raises(error_class(RV.MECHANISM_PARAM_INVALID)):
            await c.derive_key(lid, aes, Spec(M.SP800_108_COUNTER_KDF), t, handle=handles(),
                               session=1)
        with pytest.raises(error_class(RV.MECHANISM_PARAM_INVALID)):
            await c.derive_key(lid, aes, Spec(M.SP800_108_COUNTER_KDF, RawParams(
                _flat(M.SHA256_HMAC, [dkm32]))), t, handle=handles(), session=1)
        await c.close()
    run(body)


def algorithms_aes():  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives.ciphers import algorithms
    return algorithms.AES
