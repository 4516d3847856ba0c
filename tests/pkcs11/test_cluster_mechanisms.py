"""python-pkcs11 through libhsmsim-pkcs11 against a real 3-HSM hsmsim cluster: keys of every type,
every CloudHSM mechanism with its result checked against pyca/cryptography, wrap/unwrap, find and
attributes."""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterator

import pkcs11
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.cmac import CMAC
from cryptography.hazmat.primitives import padding as sympad
from pkcs11 import MGF, Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.mechanisms import GCMParams
from pkcs11.util.ec import encode_named_curve_parameters

from p11helpers import crypto_public, use_gateway

KEY = bytes(range(32))
HASHES = {"sha1": (Mechanism.SHA_1, MGF.SHA1, hashes.SHA1), "sha224": (Mechanism.SHA224, MGF.SHA224, hashes.SHA224),
          "sha256": (Mechanism.SHA256, MGF.SHA256, hashes.SHA256), "sha384": (Mechanism.SHA384, MGF.SHA384, hashes.SHA384),
          "sha512": (Mechanism.SHA512, MGF.SHA512, hashes.SHA512)}


@pytest.fixture(scope="module")
def cluster(hsmsim_session_cluster):  # type: ignore[no-untyped-def]
    return hsmsim_session_cluster


@pytest.fixture(scope="module")
def session(cluster) -> Iterator[pkcs11.Session]:  # type: ignore[no-untyped-def]
    lib = use_gateway(cluster.socket_path)
    s = lib.get_token(token_label="hsm1").open(rw=True, user_pin=cluster.pin)
    yield s
    s.close()


@pytest.fixture(scope="module")
def aes(session: pkcs11.Session) -> pkcs11.SecretKey:
    return session.create_object({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
                                  Attribute.VALUE: KEY, Attribute.ENCRYPT: True, Attribute.DECRYPT: True,
                                  Attribute.SIGN: True, Attribute.VERIFY: True, Attribute.TOKEN: False})


@pytest.fixture(scope="module")
def rsa_pair(session: pkcs11.Session):  # type: ignore[no-untyped-def]
    return session.generate_keypair(KeyType.RSA, 2048, store=True, label="p11-rsa")


@pytest.fixture(scope="module")
def ec_pairs(session: pkcs11.Session):  # type: ignore[no-untyped-def]
    out = {}
    for curve in ("secp256r1", "secp384r1", "secp521r1", "secp224r1", "secp256k1"):
        params = session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(curve)}, local=True)
        out[curve] = params.generate_keypair(store=False)
    return out


@pytest.mark.parametrize("mech", ["ECB", "CBC", "CBC_PAD", "CTR"])
def test_aes_modes(aes: pkcs11.SecretKey, mech: str) -> None:
    data = os.urandom(64)
    iv = os.urandom(16)
    if mech == "ECB":
        ct = aes.encrypt(data, mechanism=Mechanism.AES_ECB)
        ref = Cipher(algorithms.AES(KEY), modes.ECB()).encryptor().update(data)
    elif mech == "CBC":
        ct = aes.encrypt(data, mechanism=Mechanism.AES_CBC, mechanism_param=iv)
        ref = Cipher(algorithms.AES(KEY), modes.CBC(iv)).encryptor().update(data)
    elif mech == "CBC_PAD":
        data = data[:50]
        ct = aes.encrypt(data, mechanism=Mechanism.AES_CBC_PAD, mechanism_param=iv)
        p = sympad.PKCS7(128).padder()
        ref = Cipher(algorithms.AES(KEY), modes.CBC(iv)).encryptor().update(p.update(data) + p.finalize())
    else:
        param = pkcs11.mechanisms.CTRParams(iv[:8])
        ct = aes.encrypt(data, mechanism=Mechanism.AES_CTR, mechanism_param=param)
        ref = Cipher(algorithms.AES(KEY), modes.CTR(iv[:8] + bytes(7) + b"\x01")).encryptor().update(data)
        assert aes.decrypt(ct, mechanism=Mechanism.AES_CTR, mechanism_param=param) == data
        assert ct == ref
        return
    assert ct == ref
    param = iv if mech != "ECB" else None
    assert aes.decrypt(ct, mechanism=getattr(Mechanism, "AES_" + mech), mechanism_param=param) == data


def test_aes_gcm(aes: pkcs11.SecretKey) -> None:
    nonce = bytes(bytearray(12))
    ct = aes.encrypt(b"gcm data", mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce, b"aad", 128))
    assert nonce != bytes(12)  # the HSM's IV, written back
    assert AESGCM(KEY).decrypt(nonce, ct, b"aad") == b"gcm data"
    iv = os.urandom(12)
    ct2 = AESGCM(KEY).encrypt(iv, b"from pyca", None)
    assert aes.decrypt(ct2, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(iv, None, 128)) == b"from pyca"
    with pytest.raises(pkcs11.exceptions.PKCS11Error):
        aes.decrypt(ct2[:-1] + bytes([ct2[-1] ^ 1]), mechanism=Mechanism.AES_GCM,
                    mechanism_param=GCMParams(iv, None, 128))


def test_aes_cmac(aes: pkcs11.SecretKey) -> None:
    mac = aes.sign(b"cmac me", mechanism=Mechanism.AES_CMAC)
    c = CMAC(algorithms.AES(KEY))
    c.update(b"cmac me")
    assert mac == c.finalize()


@pytest.mark.parametrize("name", sorted(HASHES))
def test_hmac(session: pkcs11.Session, name: str) -> None:
    secret = KEY * 2  # SoftHSM2 wants HMAC keys at least as long as the hash output
    key = session.create_object({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
                                 Attribute.VALUE: secret, Attribute.SIGN: True, Attribute.VERIFY: True,
                                 Attribute.TOKEN: False})
    mech = {"sha1": Mechanism.SHA_1_HMAC, "sha224": Mechanism.SHA224_HMAC, "sha256": Mechanism.SHA256_HMAC,
            "sha384": Mechanism.SHA384_HMAC, "sha512": Mechanism.SHA512_HMAC}[name]
    mac = key.sign(b"message", mechanism=mech)
    assert mac == hmac.new(secret, b"message", name).digest()
    assert key.verify(b"message", mac, mechanism=mech)


@pytest.mark.parametrize("name", sorted(HASHES))
def test_digests(session: pkcs11.Session, name: str) -> None:
    data = os.urandom(100_000)
    assert session.digest(data, mechanism=HASHES[name][0]) == hashlib.new(name, data).digest()


@pytest.mark.parametrize("name", sorted(HASHES))
def test_rsa_pkcs1_and_pss(rsa_pair, name: str) -> None:  # type: ignore[no-untyped-def]
    pub, priv = rsa_pair
    ref = crypto_public(pub)
    h = HASHES[name][2]()
    mech = getattr(Mechanism, f"{name.upper().replace('SHA1', 'SHA1')}_RSA_PKCS")
    sig = priv.sign(b"to sign", mechanism=mech)
    ref.verify(sig, b"to sign", padding.PKCS1v15(), h)
    assert pub.verify(b"to sign", sig, mechanism=mech)
    pss = getattr(Mechanism, f"{name.upper()}_RSA_PKCS_PSS")
    param = (HASHES[name][0], HASHES[name][1], h.digest_size)
    sig = priv.sign(b"to sign", mechanism=pss, mechanism_param=param)
    ref.verify(sig, b"to sign", padding.PSS(padding.MGF1(h), h.digest_size), h)
    assert pub.verify(b"to sign", sig, mechanism=pss, mechanism_param=param)


def test_rsa_raw_mechanisms(rsa_pair) -> None:  # type: ignore[no-untyped-def]
    pub, priv = rsa_pair
    ref = crypto_public(pub)
    digest = hashlib.sha256(b"raw").digest()
    info = bytes.fromhex("3031300d060960864801650304020105000420") + digest
    sig = priv.sign(info, mechanism=Mechanism.RSA_PKCS)
    ref.verify(sig, b"raw", padding.PKCS1v15(), hashes.SHA256())
    sig = priv.sign(digest, mechanism=Mechanism.RSA_PKCS_PSS,
                    mechanism_param=(Mechanism.SHA256, MGF.SHA256, 32))
    ref.verify(sig, digest, padding.PSS(padding.MGF1(hashes.SHA256()), 32), utils.Prehashed(hashes.SHA256()))
    ct = ref.encrypt(b"pkcs1 secret", padding.PKCS1v15())
    assert priv.decrypt(ct, mechanism=Mechanism.RSA_PKCS) == b"pkcs1 secret"
    block = b"\x00" + os.urandom(255)
    ct = pub.encrypt(block, mechanism=Mechanism.RSA_X_509)
    n, e = ref.public_numbers().n, ref.public_numbers().e
    assert int.from_bytes(ct, "big") == pow(int.from_bytes(block, "big"), e, n)


@pytest.mark.parametrize("name", sorted(HASHES))
def test_rsa_oaep(rsa_pair, name: str) -> None:  # type: ignore[no-untyped-def]
    pub, priv = rsa_pair
    h = HASHES[name][2]()
    ct = crypto_public(pub).encrypt(b"oaep secret", padding.OAEP(padding.MGF1(h), h, None))
    param = (HASHES[name][0], HASHES[name][1], None)
    assert priv.decrypt(ct, mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=param) == b"oaep secret"


@pytest.mark.parametrize("curve", ["secp256r1", "secp384r1", "secp521r1", "secp224r1", "secp256k1"])
def test_ecdsa(ec_pairs, curve: str) -> None:  # type: ignore[no-untyped-def]
    pub, priv = ec_pairs[curve]
    ref = crypto_public(pub)
    for mech, h in ((Mechanism.ECDSA_SHA256, hashes.SHA256()), (Mechanism.ECDSA_SHA384, hashes.SHA384()),
                    (Mechanism.ECDSA_SHA1, hashes.SHA1()), (Mechanism.ECDSA_SHA512, hashes.SHA512()),
                    (Mechanism.ECDSA_SHA224, hashes.SHA224())):
        sig = priv.sign(b"ec data", mechanism=mech)
        half = len(sig) // 2
        der = utils.encode_dss_signature(int.from_bytes(sig[:half], "big"), int.from_bytes(sig[half:], "big"))
        ref.verify(der, b"ec data", ec.ECDSA(h))
        assert pub.verify(b"ec data", sig, mechanism=mech)
    digest = hashlib.sha256(b"raw ecdsa").digest()
    sig = priv.sign(digest, mechanism=Mechanism.ECDSA)
    half = len(sig) // 2
    der = utils.encode_dss_signature(int.from_bytes(sig[:half], "big"), int.from_bytes(sig[half:], "big"))
    ref.verify(der, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))


def test_wrap_unwrap(session: pkcs11.Session, rsa_pair) -> None:  # type: ignore[no-untyped-def]
    pub, priv = rsa_pair
    secret = session.create_object({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
                                    Attribute.VALUE: KEY, Attribute.EXTRACTABLE: True, Attribute.SENSITIVE: False,
                                    Attribute.ENCRYPT: True, Attribute.TOKEN: False})
    oaep = (Mechanism.SHA256, MGF.SHA256, None)
    wrapped = pub.wrap_key(secret, mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=oaep)
    h = hashes.SHA256()
    assert crypto_public(pub) is not None and len(wrapped) == 256
    clone = priv.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, wrapped, mechanism=Mechanism.RSA_PKCS_OAEP,
                            mechanism_param=oaep, template={Attribute.ENCRYPT: True, Attribute.TOKEN: False})
    data = os.urandom(32)
    assert clone.encrypt(data, mechanism=Mechanism.AES_ECB) == secret.encrypt(data, mechanism=Mechanism.AES_ECB)
    del h


def test_find_and_attributes(cluster, session: pkcs11.Session, rsa_pair, ec_pairs) -> None:  # type: ignore[no-untyped-def]
    pub, priv = rsa_pair
    cluster.wait_converged(30)  # a search may go to an HSM the key has not reached yet
    found = list(session.get_objects({Attribute.LABEL: "p11-rsa"}))
    assert {o.object_class for o in found} == {ObjectClass.PUBLIC_KEY, ObjectClass.PRIVATE_KEY}
    assert len(pub[Attribute.MODULUS]) == 256
    assert pub[Attribute.PUBLIC_EXPONENT] == b"\x01\x00\x01"
    with pytest.raises(pkcs11.exceptions.AttributeSensitive):
        priv[Attribute.PRIVATE_EXPONENT]
    assert priv[Attribute.SENSITIVE] is True
    ecpub, _ = ec_pairs["secp256r1"]
    assert len(ecpub[Attribute.EC_POINT]) in (65, 67)
    assert list(session.get_objects({Attribute.LABEL: "no-such-label-xyz"})) == []


def test_rsa_x9_31_key_pair_gen(session: pkcs11.Session) -> None:
    pub, priv = session.generate_keypair(KeyType.RSA, 2048, store=False, mechanism=Mechanism.RSA_X9_31_KEY_PAIR_GEN)
    sig = priv.sign(b"x9.31", mechanism=Mechanism.SHA256_RSA_PKCS)
    crypto_public(pub).verify(sig, b"x9.31", padding.PKCS1v15(), hashes.SHA256())


def test_generated_key_types(session: pkcs11.Session) -> None:
    for kt, bits in ((KeyType.AES, 128), (KeyType.AES, 192), (KeyType.AES, 256), (KeyType.GENERIC_SECRET, 512)):
        k = session.generate_key(kt, bits, store=False)
        assert k.key_type == kt and k[Attribute.LOCAL] is True


@pytest.mark.parametrize("mech", [0x80002109, 0x8000210A, 0x8000216F])  # CKM_CLOUDHSM_AES_KEY_WRAP_*
def test_vendor_aes_key_wraps(session: pkcs11.Session, mech: int) -> None:
    from cryptography.hazmat.primitives.keywrap import aes_key_unwrap, aes_key_unwrap_with_padding
    raw_mech = pkcs11.mechanisms.Mechanism  # python-pkcs11 has no names for vendor values
    del raw_mech
    wrapping = session.create_object({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
                                      Attribute.VALUE: KEY, Attribute.WRAP: True, Attribute.UNWRAP: True,
                                      Attribute.TOKEN: True, Attribute.LABEL: f"p11-wrapping-{mech:x}"})
    target = session.create_object({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
                                    Attribute.VALUE: bytes(16), Attribute.EXTRACTABLE: True,
                                    Attribute.ENCRYPT: True, Attribute.TOKEN: True})
    wrapped = _wrap(session, mech, wrapping, target)
    if mech == 0x8000210A:  # FIDELITY: RFC 5649 here (see the gateway)
        assert aes_key_unwrap_with_padding(KEY, wrapped) == bytes(16)
    else:
        assert aes_key_unwrap(KEY, wrapped) == bytes(16)


def _wrap(session: pkcs11.Session, mech: int, wrapping: pkcs11.SecretKey, target: pkcs11.SecretKey) -> bytes:
    """C_WrapKey with a vendor mechanism through ctypes on the same (initialised) module."""
    import ctypes
    from ctypes import byref, c_ulong, create_string_buffer
    from p11helpers import require_module
    from p11raw import CK_MECHANISM
    dll = ctypes.CDLL(str(require_module()))
    h = c_ulong()
    assert dll.C_OpenSession(c_ulong(1), c_ulong(6), None, None, byref(h)) == 0
    try:
        m = CK_MECHANISM(mech, None, 0)
        out, n = create_string_buffer(256), c_ulong(256)
        rv = dll.C_WrapKey(h, byref(m), c_ulong(wrapping.handle), c_ulong(target.handle), out, byref(n))
        assert rv == 0, hex(rv)
        return out.raw[:n.value]
    finally:
        dll.C_CloseSession(h)


def test_token_keys_work_on_every_hsm(cluster, session: pkcs11.Session) -> None:  # type: ignore[no-untyped-def]
    """A synced token key encrypts wherever the cluster routes the call (round-robin over the
    HSMs), and its attributes read the same."""
    key = session.generate_key(KeyType.AES, 256, store=True, label="p11-token-aes",
                               capabilities=pkcs11.MechanismFlag.ENCRYPT | pkcs11.MechanismFlag.DECRYPT)
    cluster.wait_converged(30)
    for _ in range(6):
        nonce = bytes(bytearray(12))
        ct = key.encrypt(b"everywhere", mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce, None, 128))
        assert key.decrypt(ct, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce, None, 128)) == b"everywhere"
        assert key[Attribute.VALUE_LEN] == 32
