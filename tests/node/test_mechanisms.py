"""Every node mechanism against a real node process, with known answers or cross-checked with
pyca/cryptography (keys imported with known material, or public parts read back)."""

from __future__ import annotations

import hashlib
import hmac as pyhmac
import os

import pytest
from cryptography.hazmat.primitives import cmac, hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import (aes_key_unwrap, aes_key_wrap,
                                                    aes_key_wrap_with_padding)

from hsmsim.node.client import NodeClient
from hsmsim.pkcs11.constants import KDF, MGF, RV, Attribute as A, KeyType, Mechanism as M, ObjectClass
from hsmsim.pkcs11.errors import error_class
from hsmsim.pkcs11.params import (CtrParams, Ecdh1Params, GcmParams, MechanismSpec as Spec,
                                  OaepParams, PssParams, RawParams)

from .nodeproc import NodeProc, run

HASHES = {"sha1": (M.SHA_1, MGF.MGF1_SHA1, hashes.SHA1()),
          "sha224": (M.SHA224, MGF.MGF1_SHA224, hashes.SHA224()),
          "sha256": (M.SHA256, MGF.MGF1_SHA256, hashes.SHA256()),
          "sha384": (M.SHA384, MGF.MGF1_SHA384, hashes.SHA384()),
          "sha512": (M.SHA512, MGF.MGF1_SHA512, hashes.SHA512())}
PKCS_MECH = {"sha1": M.SHA1_RSA_PKCS, "sha224": M.SHA224_RSA_PKCS, "sha256": M.SHA256_RSA_PKCS,
             "sha384": M.SHA384_RSA_PKCS, "sha512": M.SHA512_RSA_PKCS}
PSS_MECH = {"sha1": M.SHA1_RSA_PKCS_PSS, "sha224": M.SHA224_RSA_PKCS_PSS,
            "sha256": M.SHA256_RSA_PKCS_PSS, "sha384": M.SHA384_RSA_PKCS_PSS,
            "sha512": M.SHA512_RSA_PKCS_PSS}
ECDSA_MECH = {"sha1": M.ECDSA_SHA1, "sha224": M.ECDSA_SHA224, "sha256": M.ECDSA_SHA256,
              "sha384": M.ECDSA_SHA384, "sha512": M.ECDSA_SHA512}
HMAC_MECH = {"sha1": M.SHA_1_HMAC, "sha224": M.SHA224_HMAC, "sha256": M.SHA256_HMAC,
             "sha384": M.SHA384_HMAC, "sha512": M.SHA512_HMAC}
CURVES = {"P-224": (bytes.fromhex("06052b81040021"), ec.SECP224R1()),
          "P-256": (bytes.fromhex("06082a8648ce3d030107"), ec.SECP256R1()),
          "P-384": (bytes.fromhex("06052b81040022"), ec.SECP384R1()),
          "P-521": (bytes.fromhex("06052b81040023"), ec.SECP521R1()),
          "secp256k1": (bytes.fromhex("06052b8104000a"), ec.SECP256K1())}
USE = {A.ENCRYPT: True, A.DECRYPT: True, A.SIGN: True, A.VERIFY: True, A.WRAP: True,
       A.UNWRAP: True}


def _int(b: bytes) -> int:
    return int.from_bytes(b, "big")


def _b(i: int) -> bytes:
    return i.to_bytes((i.bit_length() + 7) // 8, "big")


async def aes_key(c: NodeClient, lid: int, h: int, value: bytes,
                  extra: dict[int, object] | None = None) -> int:
    t = {A.CLASS: ObjectClass.SECRET_KEY, A.KEY_TYPE: KeyType.AES, A.VALUE: value,
         A.TOKEN: False, **USE, **(extra or {})}
    return await c.create_object(lid, t, handle=h, session=1)  # type: ignore[arg-type]


async def rsa_pair(c: NodeClient, lid: int, h: int, key: rsa.RSAPrivateKey) -> tuple[int, int]:
    n = key.private_numbers()
    pub = {A.CLASS: ObjectClass.PUBLIC_KEY, A.KEY_TYPE: KeyType.RSA, A.TOKEN: False,
           A.MODULUS: _b(n.public_numbers.n), A.PUBLIC_EXPONENT: _b(n.public_numbers.e),
           A.ENCRYPT: True, A.VERIFY: True, A.WRAP: True}
    priv = {A.CLASS: ObjectClass.PRIVATE_KEY, A.KEY_TYPE: KeyType.RSA, A.TOKEN: False,
            A.MODULUS: _b(n.public_numbers.n), A.PUBLIC_EXPONENT: _b(n.public_numbers.e),
            A.PRIVATE_EXPONENT: _b(n.d), A.PRIME_1: _b(n.p), A.PRIME_2: _b(n.q),
            A.EXPONENT_1: _b(n.dmp1), A.EXPONENT_2: _b(n.dmq1), A.COEFFICIENT: _b(n.iqmp),
            A.DECRYPT: True, A.SIGN: True, A.UNWRAP: True}
    ph = await c.create_object(lid, pub, handle=h, session=1)  # type: ignore[arg-type]
    sh = await c.create_object(lid, priv, handle=h + 1, session=1)  # type: ignore[arg-type]
    return ph, sh


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


def test_aes_gcm_cross_checked(node_a: NodeProc, handles) -> None:
    key = os.urandom(32)

    async def body() -> None:
        c, lid = await node_a.login("alice")
        h = await aes_key(c, lid, handles(), key)
        for size in (0, 1, 16, 1024, 70000):
            data = os.urandom(size)
            enc = await c.encrypt(lid, h, Spec(M.AES_GCM, GcmParams(b"\0" * 12, b"aad")), data)
            assert enc.iv is not None and len(enc.iv) == 12
            # The node's ciphertext||tag decrypts with pyca.
            assert AESGCM(key).decrypt(enc.iv, enc.data, b"aad") == data
            # pyca's ciphertext decrypts in the node.
            iv = os.urandom(12)
            ct = AESGCM(key).encrypt(iv, data, b"x")
            assert await c.decrypt(lid, h, Spec(M.AES_GCM, GcmParams(iv, b"x")), ct) == data
        # IVs differ on every encryption (HSM-generated).
        ivs = {(await c.encrypt(lid, h, Spec(M.AES_GCM, GcmParams(b"", b"")), b"a")).iv
               for _ in range(20)}
        assert len(ivs) == 20
        # A tampered tag fails with CKR_ENCRYPTED_DATA_INVALID.
        enc = await c.encrypt(lid, h, Spec(M.AES_GCM, GcmParams(b"", b"")), b"secret")
        bad = enc.data[:-1] + bytes([enc.data[-1] ^ 1])
        with pytest.raises(error_class(RV.ENCRYPTED_DATA_INVALID)):
            await c.decrypt(lid, h, Spec(M.AES_GCM, GcmParams(enc.iv or b"", b"")), bad)
        # 96-bit tags.
        enc = await c.encrypt(lid, h, Spec(M.AES_GCM, GcmParams(b"", b"", 96)), b"short tag")
        assert len(enc.data) == 9 + 12
        with pytest.raises(error_class(RV.MECHANISM_PARAM_INVALID)):
            await c.encrypt(lid, h, Spec(M.AES_GCM, GcmParams(b"", b"", 100)), b"x")
        with pytest.raises(error_class(RV.MECHANISM_PARAM_INVALID)):
            await c.encrypt(lid, h, Spec(M.AES_GCM, None), b"x")
        await c.close()
    run(body)


def test_aes_block_modes_known_answers(node_a: NodeProc, handles) -> None:
    # NIST SP 800-38A F.2.5 (CBC-AES256), F.1.5 (ECB-AES256), F.5.5 (CTR-AES256), first block.
    key = bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
    pt = bytes.fromhex("6bc1bee22e409f96e93d7e117393172a")
    iv = bytes.fromhex("000102030405060708090a0b0c0d0e0f")
    ctr = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")

    async def body() -> None:
        c, lid = await node_a.login("alice")
        h = await aes_key(c, lid, handles(), key)
        cbc = await c.encrypt(lid, h, Spec(M.AES_CBC, RawParams(iv)), pt)
        assert cbc.data == bytes.fromhex("f58c4c04d6e5f1ba779eabfb5f7bfbd6")
        ecb = await c.encrypt(lid, h, Spec(M.AES_ECB), pt)
        assert ecb.data == bytes.fromhex("f3eed1bdb5d2a03c064b5a7e3db181f8")
        ct = await c.encrypt(lid, h, Spec(M.AES_CTR, CtrParams(128, ctr)), pt)
        assert ct.data == bytes.fromhex("601ec313775789a5b7a7f504bbf3d228")
        assert await c.decrypt(lid, h, Spec(M.AES_CTR, CtrParams(128, ctr)), ct.data) == pt
        assert await c.decrypt(lid, h, Spec(M.AES_CBC, RawParams(iv)), cbc.data) == pt
        assert await c.decrypt(lid, h, Spec(M.AES_ECB), ecb.data) == pt
        # CBC-PAD against pyca.
        data = os.urandom(37)
        enc = await c.encrypt(lid, h, Spec(M.AES_CBC_PAD, RawParams(iv)), data)
        from cryptography.hazmat.primitives.padding import PKCS7
        d = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
        u = PKCS7(128).unpadder()
        assert u.update(d.update(enc.data) + d.finalize()) + u.finalize() == data
        assert await c.decrypt(lid, h, Spec(M.AES_CBC_PAD, RawParams(iv)), enc.data) == data
        with pytest.raises(error_class(RV.DATA_LEN_RANGE)):
            await c.encrypt(lid, h, Spec(M.AES_CBC, RawParams(iv)), b"not a block")
        await c.close()
    run(body)


def test_rsa_sign_verify_all_hashes(node_a: NodeProc, handles, rsa_key: rsa.RSAPrivateKey) -> None:
    pub = rsa_key.public_key()

    async def body() -> None:
        c, lid = await node_a.login("alice")
        h = handles(); handles()
        ph, sh = await rsa_pair(c, lid, h, rsa_key)
        msg = b"message to sign"
        for name, (dmech, mgf, halg) in HASHES.items():
            sig = await c.sign(lid, sh, Spec(PKCS_MECH[name]), msg)
            pub.verify(sig, msg, padding.PKCS1v15(), halg)  # deterministic: also a KAT
            assert sig == rsa_key.sign(msg, padding.PKCS1v15(), halg)
            await c.verify(lid, ph, Spec(PKCS_MECH[name]), msg, sig)
            pss = PssParams(dmech, mgf, halg.digest_size)
            sig = await c.sign(lid, sh, Spec(PSS_MECH[name], pss), msg)
            pub.verify(sig, msg, padding.PSS(padding.MGF1(halg), halg.digest_size), halg)
            await c.verify(lid, ph, Spec(PSS_MECH[name], pss), msg, sig)
            # Raw PSS over a digest.
            digest = hashlib.new(name, msg).digest()
            sig = await c.sign(lid, sh, Spec(M.RSA_PKCS_PSS, pss), digest)
            pub.verify(sig, msg, padding.PSS(padding.MGF1(halg), halg.digest_size), halg)
            with pytest.raises(error_class(RV.SIGNATURE_INVALID)):
                await c.verify(lid, ph, Spec(PSS_MECH[name], pss), msg + b"!", sig)
        # Raw PKCS#1 v1.5 (caller-built DigestInfo) and X.509 raw.
        sig = await c.sign(lid, sh, Spec(M.RSA_PKCS), b"raw data")
        await c.verify(lid, ph, Spec(M.RSA_PKCS), b"raw data", sig)
        n = rsa_key.private_numbers()
        raw = os.urandom(100)
        sig = await c.sign(lid, sh, Spec(M.RSA_X_509), raw)
        assert pow(_int(sig), n.public_numbers.e, n.public_numbers.n) == _int(raw)
        with pytest.raises(error_class(RV.SIGNATURE_INVALID)):
            await c.verify(lid, ph, Spec(M.SHA256_RSA_PKCS), msg, b"\0" * 256)
        with pytest.raises(error_class(RV.SIGNATURE_LEN_RANGE)):
            await c.verify(lid, ph, Spec(M.SHA256_RSA_PKCS), msg, b"\0" * 10)
        with pytest.raises(error_class(RV.KEY_FUNCTION_NOT_PERMITTED)):
            await c.sign(lid, ph, Spec(M.SHA256_RSA_PKCS), msg)
        await c.close()
    run(body)


def test_rsa_encrypt_decrypt(node_a: NodeProc, handles, rsa_key: rsa.RSAPrivateKey) -> None:
    pub = rsa_key.public_key()

    async def body() -> None:
        c, lid = await node_a.login("alice")
        h = handles(); handles()
        ph, sh = await rsa_pair(c, lid, h, rsa_key)
        for name, (dmech, mgf, halg) in HASHES.items():
            params = OaepParams(dmech, mgf, b"label")
            ct = pub.encrypt(b"oaep " + name.encode(),
                             padding.OAEP(padding.MGF1(halg), halg, b"label"))
            assert await c.decrypt(lid, sh, Spec(M.RSA_PKCS_OAEP, params), ct) == b"oaep " + name.encode()
            enc = await c.encrypt(lid, ph, Spec(M.RSA_PKCS_OAEP, params), b"to pyca")
            assert rsa_key.decrypt(enc.data, padding.OAEP(padding.MGF1(halg), halg, b"label")) == b"to pyca"
        ct = pub.encrypt(b"v15", padding.PKCS1v15())
        assert await c.decrypt(lid, sh, Spec(M.RSA_PKCS), ct) == b"v15"
        enc = await c.encrypt(lid, ph, Spec(M.RSA_PKCS), b"v15 back")
        assert rsa_key.decrypt(enc.data, padding.PKCS1v15()) == b"v15 back"
        enc = await c.encrypt(lid, ph, Spec(M.RSA_X_509), b"\x05" * 32)
        assert await c.decrypt(lid, sh, Spec(M.RSA_X_509), enc.data) == b"\0" * 224 + b"\x05" * 32
        with pytest.raises(error_class(RV.ENCRYPTED_DATA_INVALID)):
            await c.decrypt(lid, sh, Spec(M.RSA_PKCS_OAEP, OaepParams(M.SHA256, MGF.MGF1_SHA256)),
                            os.urandom(256))
        await c.close()
    run(body)


@pytest.mark.parametrize("curve", list(CURVES))
def test_ec_generate_and_ecdsa(node_a: NodeProc, handles, curve: str) -> None:
    params, pyca_curve = CURVES[curve]

    async def body() -> None:
        c, lid = await node_a.login("alice")
        h = handles(); handles()
        ph, sh = await c.generate_key_pair(
            lid, Spec(M.EC_KEY_PAIR_GEN), {A.EC_PARAMS: params, A.VERIFY: True},
            {A.SIGN: True, A.DERIVE: True}, public_handle=h, private_handle=h + 1, session=7)
        (point,) = await c.get_attributes(lid, ph, [A.EC_POINT])
        assert isinstance(point.value, bytes)
        raw_point = point.value[2:] if point.value[1] == len(point.value) - 2 else point.value[3:]
        pk = ec.EllipticCurvePublicKey.from_encoded_point(pyca_curve, raw_point)
        size = (pyca_curve.key_size + 7) // 8
        msg = b"ecdsa message"
        for name, mech in ECDSA_MECH.items():
            sig = await c.sign(lid, sh, Spec(mech), msg)
            assert len(sig) == 2 * size
            der = encode_dss_signature(_int(sig[:size]), _int(sig[size:]))
            pk.verify(der, msg, ec.ECDSA(HASHES[name][2]))
            await c.verify(lid, ph, Spec(mech), msg, sig)
        digest = hashlib.sha256(msg).digest()
        sig = await c.sign(lid, sh, Spec(M.ECDSA), digest)
        await c.verify(lid, ph, Spec(M.ECDSA), digest, sig)
        with pytest.raises(error_class(RV.SIGNATURE_INVALID)):
            await c.verify(lid, ph, Spec(M.ECDSA_SHA256), msg + b"x", sig)
        # ECDH: the node's derived key is the X9.63 KDF of pyca's shared secret; without a KDF
        # (CKD_NULL) CloudHSM refuses (reference §1.4 Derive).
        from cryptography.hazmat.primitives.kdf.x963kdf import X963KDF
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
        peer = ec.generate_private_key(pyca_curve)
        peer_point = peer.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        dh = handles()
        derived = {A.CLASS: ObjectClass.SECRET_KEY, A.KEY_TYPE: KeyType.GENERIC_SECRET,
                   A.VALUE_LEN: size, A.SENSITIVE: False, A.EXTRACTABLE: True, A.TOKEN: False}
        with pytest.raises(error_class(RV.MECHANISM_PARAM_INVALID)):
            await c.derive_key(lid, sh, Spec(M.ECDH1_DERIVE, Ecdh1Params(KDF.NULL, peer_point)),
                               derived, handle=handles(), session=7)
        await c.derive_key(lid, sh, Spec(M.ECDH1_DERIVE, Ecdh1Params(
            KDF.CLOUDHSM_X963_SHA256_KDF, peer_point)), derived, handle=dh, session=7)
        (value,) = await c.get_attributes(lid, dh, [A.VALUE])
        assert value.value == X963KDF(hashes.SHA256(), size, None).derive(
            peer.exchange(ec.ECDH(), pk))
        assert await c.close_session(7, lid) == 3
        await c.close()
    run(body)


def test_generate_sizes_and_ranges(node_a: NodeProc, handles) -> None:
    async def body() -> None:
        c, lid = await node_a.login("alice")
        for size in (16, 24, 32):
            h = await c.generate_key(lid, Spec(M.AES_KEY_GEN), {A.VALUE_LEN: size}, handle=handles(),
                                     session=3)
            (vl, cls, kt, local) = await c.get_attributes(lid, h, [A.VALUE_LEN, A.CLASS, A.KEY_TYPE,
                                                                 A.LOCAL])
            assert (vl.value, cls.value, kt.value, local.value) == (size, 4, KeyType.AES, True)
        for size in (1, 800):
            h = await c.generate_key(lid, Spec(M.GENERIC_SECRET_KEY_GEN), {A.VALUE_LEN: size},
                                     handle=handles(), session=3)
            assert (await c.get_attributes(lid, h, [A.VALUE_LEN]))[0].value == size
        # A length AES does not have is a bad CKA_VALUE_LEN (as SoftHSM2); CloudHSM's generic
        # secret limits are a size range.
        with pytest.raises(error_class(RV.ATTRIBUTE_VALUE_INVALID)):
            await c.generate_key(lid, Spec(M.AES_KEY_GEN), {A.VALUE_LEN: 20}, handle=handles(),
                                 session=3)
        for bad, mech in ((0, M.GENERIC_SECRET_KEY_GEN), (801, M.GENERIC_SECRET_KEY_GEN)):
            with pytest.raises(error_class(RV.KEY_SIZE_RANGE)):
                await c.generate_key(lid, Spec(mech), {A.VALUE_LEN: bad}, handle=handles(), session=3)
        with pytest.raises(error_class(RV.TEMPLATE_INCOMPLETE)):
            await c.generate_key(lid, Spec(M.AES_KEY_GEN), {}, handle=handles(), session=3)
        h = handles(); handles()
        ph, sh = await c.generate_key_pair(lid, Spec(M.RSA_PKCS_KEY_PAIR_GEN),
                                           {A.MODULUS_BITS: 2304, A.VERIFY: True},
                                           {A.SIGN: True}, public_handle=h, private_handle=h + 1,
                                           session=3)
        (mod, bits) = await c.get_attributes(lid, sh, [A.MODULUS, A.MODULUS_BITS])
        assert isinstance(mod.value, bytes) and len(mod.value) * 8 == 2304 and bits.value == 2304
        sig = await c.sign(lid, sh, Spec(M.SHA256_RSA_PKCS), b"x")
        pk = rsa.RSAPublicNumbers(65537, _int(mod.value)).public_key()
        pk.verify(sig, b"x", padding.PKCS1v15(), hashes.SHA256())
        for bad_bits in (1024, 2100, 4352):
            with pytest.raises(error_class(RV.KEY_SIZE_RANGE)):
                await c.generate_key_pair(lid, Spec(M.RSA_PKCS_KEY_PAIR_GEN),
                                          {A.MODULUS_BITS: bad_bits}, {}, public_handle=handles(),
                                          private_handle=handles(), session=3)
        with pytest.raises(error_class(RV.CURVE_NOT_SUPPORTED)):
            await c.generate_key_pair(lid, Spec(M.EC_KEY_PAIR_GEN),
                                      {A.EC_PARAMS: bytes.fromhex("06082a8648ce3d030101")}, {},
                                      public_handle=handles(), private_handle=handles(), session=3)
        await c.close_session(3, lid)
        await c.close()
    run(body)


def test_hmac_cmac_digest_random(node_a: NodeProc, handles) -> None:
    secret = os.urandom(64)
    aes = os.urandom(16)

    async def body() -> None:
        c, lid = await node_a.login("alice")
        hs = await c.create_object(lid, {A.CLASS: ObjectClass.SECRET_KEY,
                                         A.KEY_TYPE: KeyType.GENERIC_SECRET, A.VALUE: secret,
                                         A.SIGN: True, A.VERIFY: True}, handle=handles(), session=1)
        for name, mech in HMAC_MECH.items():
            mac = await c.sign(lid, hs, Spec(mech), b"hmac data")
            assert mac == pyhmac.new(secret, b"hmac data", name).digest()
            await c.verify(lid, hs, Spec(mech), b"hmac data", mac)
            with pytest.raises(error_class(RV.SIGNATURE_INVALID)):
                await c.verify(lid, hs, Spec(mech), b"hmac data!", mac)
        ha = await aes_key(c, lid, handles(), aes)
        mac = await c.sign(lid, ha, Spec(M.AES_CMAC), b"cmac data")
        ref = cmac.CMAC(algorithms.AES(aes))
        ref.update(b"cmac data")
        assert mac == ref.finalize()
        await c.verify(lid, ha, Spec(M.AES_CMAC), b"cmac data", mac)
        for name, (dmech, _, _) in HASHES.items():
            assert await c.digest(Spec(dmech), b"abc") == hashlib.new(name, b"abc").digest()
        with pytest.raises(error_class(RV.MECHANISM_INVALID)):
            await c.digest(Spec(M.AES_GCM), b"abc")
        r1, r2 = await c.generate_random(64), await c.generate_random(64)
        assert len(r1) == 64 and r1 != r2
        with pytest.raises(error_class(RV.ARGUMENTS_BAD)):
            await c.generate_random(0)
        await c.close()
    run(body)


def test_hmac_with_short_and_aes_keys(node_a: NodeProc, handles) -> None:
    """CloudHSM takes any secret key for HMAC; SoftHSM2 alone would refuse keys shorter than
    the digest and AES keys, so the node computes those itself on the unmasked key."""
    short, aes = os.urandom(20), os.urandom(16)

    async def body() -> None:
        c, lid = await node_a.login("alice")
        hs = await c.create_object(lid, {A.CLASS: ObjectClass.SECRET_KEY,
                                         A.KEY_TYPE: KeyType.GENERIC_SECRET, A.VALUE: short,
                                         A.SIGN: True, A.VERIFY: True}, handle=handles(), session=1)
        ha = await c.create_object(lid, {A.CLASS: ObjectClass.SECRET_KEY, A.KEY_TYPE: KeyType.AES,
                                         A.VALUE: aes, A.SIGN: True, A.VERIFY: True},
                                   handle=handles(), session=1)
        for key, h in ((short, hs), (aes, ha)):
            for name, mech in HMAC_MECH.items():
                mac = await c.sign(lid, h, Spec(mech), b"hmac data")
                assert mac == pyhmac.new(key, b"hmac data", name).digest()
                await c.verify(lid, h, Spec(mech), b"hmac data", mac)
                with pytest.raises(error_class(RV.SIGNATURE_INVALID)):
                    await c.verify(lid, h, Spec(mech), b"hmac data", bytes(len(mac)))
        await c.close()
    run(body)


def test_wrap_unwrap(node_a: NodeProc, handles, rsa_key: rsa.RSAPrivateKey) -> None:
    kek, inner = os.urandom(32), os.urandom(24)

    async def body() -> None:
        c, lid = await node_a.login("alice")
        hw = await aes_key(c, lid, handles(), kek)
        hk = await aes_key(c, lid, handles(), inner)
        wrapped = await c.wrap_key(lid, hw, Spec(M.AES_KEY_WRAP), hk)
        assert wrapped == aes_key_wrap(kek, inner)
        wrapped_pad = await c.wrap_key(lid, hw, Spec(M.AES_KEY_WRAP_PAD), hk)
        assert wrapped_pad == aes_key_wrap_with_padding(kek, inner)
        for mech, blob in ((M.AES_KEY_WRAP, wrapped), (M.AES_KEY_WRAP_PAD, wrapped_pad)):
            hu = await c.unwrap_key(lid, hw, Spec(mech), blob,
                                    {A.CLASS: ObjectClass.SECRET_KEY, A.KEY_TYPE: KeyType.AES,
                                     A.ENCRYPT: True, A.DECRYPT: True, A.TOKEN: False},
                                    handle=handles(), session=1)
            enc = await c.encrypt(lid, hu, Spec(M.AES_GCM, GcmParams(b"", b"")), b"same key")
            assert AESGCM(inner).decrypt(enc.iv, enc.data, b"") == b"same key"
            (local,) = await c.get_attributes(lid, hu, [A.LOCAL])
            assert local.value is False
        with pytest.raises(error_class(RV.WRAPPED_KEY_INVALID)):
            await c.unwrap_key(lid, hw, Spec(M.AES_KEY_WRAP), os.urandom(32),
                               {A.CLASS: ObjectClass.SECRET_KEY, A.KEY_TYPE: KeyType.AES},
                               handle=handles(), session=1)
        # RSA-OAEP wrap to an RSA public key; pyca unwraps.
        h = handles(); handles()
        ph, sh = await rsa_pair(c, lid, h, rsa_key)
        oaep = OaepParams(M.SHA256, MGF.MGF1_SHA256)
        blob = await c.wrap_key(lid, ph, Spec(M.RSA_PKCS_OAEP, oaep), hk)
        assert rsa_key.decrypt(blob, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(),
                                                  None)) == inner
        hu = await c.unwrap_key(lid, sh, Spec(M.RSA_PKCS_OAEP, oaep), blob,
                                {A.CLASS: ObjectClass.SECRET_KEY, A.KEY_TYPE: KeyType.AES,
                                 A.ENCRYPT: True}, handle=handles(), session=1)
        enc = await c.encrypt(lid, hu, Spec(M.AES_GCM, GcmParams(b"", b"")), b"oaep")
        assert AESGCM(inner).decrypt(enc.iv, enc.data, b"") == b"oaep"
        # A non-extractable key cannot be wrapped.
        hn = await aes_key(c, lid, handles(), os.urandom(16), {A.EXTRACTABLE: False})
        with pytest.raises(error_class(RV.KEY_UNEXTRACTABLE)):
            await c.wrap_key(lid, hw, Spec(M.AES_KEY_WRAP), hn)
        assert aes_key_unwrap(kek, wrapped) == inner
        await c.close()
    run(body)


def test_attributes_sensitive_and_readable(node_a: NodeProc, handles) -> None:
    value = os.urandom(32)

    async def body() -> None:
        c, lid = await node_a.login("alice")
        h = await aes_key(c, lid, handles(), value, {A.LABEL: "visible", A.ID: b"\x01\x02"})
        res = await c.get_attributes(lid, h, [A.LABEL, A.ID, A.VALUE, A.SENSITIVE, 0x9999,
                                              A.ALWAYS_SENSITIVE, A.LOCAL, A.MODULUS])
        assert [(r.value, r.rv) for r in res] == [
            ("visible", 0), (b"\x01\x02", 0), (None, RV.ATTRIBUTE_SENSITIVE), (True, 0),
            (None, RV.ATTRIBUTE_TYPE_INVALID), (False, 0), (False, 0),
            (None, RV.ATTRIBUTE_TYPE_INVALID)]
        # A non-sensitive, extractable key's value is readable (by unmasking in the node).
        h2 = await aes_key(c, lid, handles(), value, {A.SENSITIVE: False})
        assert (await c.get_attributes(lid, h2, [A.VALUE]))[0].value == value
        # set_attributes: label changes, read-only refused, one-way rules.
        await c.set_attributes(lid, h, {A.LABEL: "renamed"})
        assert await c.find_objects(lid, {A.LABEL: "renamed"}) == [h]
        assert await c.find_objects(lid, {A.LABEL: "visible"}) == []
        with pytest.raises(error_class(RV.ATTRIBUTE_READ_ONLY)):
            await c.set_attributes(lid, h, {A.KEY_TYPE: KeyType.GENERIC_SECRET})
        with pytest.raises(error_class(RV.ATTRIBUTE_READ_ONLY)):
            await c.set_attributes(lid, h, {A.SENSITIVE: False})
        with pytest.raises(error_class(RV.ATTRIBUTE_VALUE_INVALID)):
            await c.set_attributes(lid, h, {A.LABEL: 5})  # type: ignore[dict-item]
        await c.set_attributes(lid, h, {A.ENCRYPT: False})
        with pytest.raises(error_class(RV.KEY_FUNCTION_NOT_PERMITTED)):
            await c.encrypt(lid, h, Spec(M.AES_GCM, GcmParams(b"", b"")), b"x")
        await c.close()
    run(body)
