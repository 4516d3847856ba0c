"""CKM_RSA_PKCS and CKM_RSA_AES_KEY_WRAP wrap/unwrap through libhsmsim-pkcs11 against a real
cluster (issue 11, defect 3), cross-checked with pyca/cryptography both ways: what hsmsim wraps
cryptography unwraps, and what cryptography wraps hsmsim unwraps. CKM_RSA_AES_KEY_WRAP is how key
material is imported into CloudHSM: RSA-OAEP(ephemeral AES key) || RFC 5649 KWP(target key)."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from ctypes import POINTER, Structure, byref, c_ulong, c_void_p, cast, create_string_buffer, pointer

import pkcs11
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding, aes_key_wrap_with_padding
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from hsmsim.pkcs11.constants import RV, Attribute as A, Mechanism as M
from p11helpers import REF_PIN, ClusterGateway, crypto_public, require_module, use_gateway
from p11raw import CK_MECHANISM, Raw, open_session, template

U = c_ulong
KEY = bytes(range(32))
CKZ_DATA_SPECIFIED = 1
HASH = {"sha1": (M.SHA_1, 1, hashes.SHA1), "sha224": (M.SHA224, 5, hashes.SHA224),
        "sha256": (M.SHA256, 2, hashes.SHA256), "sha384": (M.SHA384, 3, hashes.SHA384),
        "sha512": (M.SHA512, 4, hashes.SHA512)}


class CK_RSA_PKCS_OAEP_PARAMS(Structure):
    _fields_ = [("hashAlg", c_ulong), ("mgf", c_ulong), ("source", c_ulong),
                ("pSourceData", c_void_p), ("ulSourceDataLen", c_ulong)]


class CK_RSA_AES_KEY_WRAP_PARAMS(Structure):
    _fields_ = [("ulAESKeyBits", c_ulong), ("pOAEPParams", POINTER(CK_RSA_PKCS_OAEP_PARAMS))]


def rsa_aes(bits: int = 256, name: str = "sha256", label: bytes = b"", mgf: int | None = None,
            oaep: bool = True) -> tuple[CK_MECHANISM, list[object]]:
    """A CK_MECHANISM for CKM_RSA_AES_KEY_WRAP (python-pkcs11 0.10 cannot encode its parameter)."""
    h, m, _ = HASH[name]
    o = CK_RSA_PKCS_OAEP_PARAMS(h, m if mgf is None else mgf, CKZ_DATA_SPECIFIED if label else 0, None, 0)
    keep: list[object] = [o]
    if label:
        buf = create_string_buffer(label, len(label))
        keep.append(buf)
        o.pSourceData, o.ulSourceDataLen = cast(buf, c_void_p), len(label)
    p = CK_RSA_AES_KEY_WRAP_PARAMS(bits, pointer(o) if oaep else None)
    keep.append(p)
    return CK_MECHANISM(M.RSA_AES_KEY_WRAP, cast(byref(p), c_void_p), ctypes.sizeof(p)), keep


def rsa_pkcs() -> tuple[CK_MECHANISM, list[object]]:
    return CK_MECHANISM(M.RSA_PKCS, None, 0), []


def oaep_padding(name: str, label: bytes = b"") -> padding.OAEP:
    h = HASH[name][2]
    return padding.OAEP(padding.MGF1(h()), h(), label or None)


def crypto_wrap(public: rsa.RSAPublicKey, material: bytes, bits: int = 256, name: str = "sha256",
                label: bytes = b"") -> bytes:
    """CKM_RSA_AES_KEY_WRAP done by pyca/cryptography (what AWS's import instructions do with
    OpenSSL)."""
    eph = os.urandom(bits // 8)
    return public.encrypt(eph, oaep_padding(name, label)) + aes_key_wrap_with_padding(eph, material)


def crypto_unwrap(private: rsa.RSAPrivateKey, blob: bytes, bits: int = 256, name: str = "sha256",
                  label: bytes = b"") -> bytes:
    k = private.key_size // 8
    eph = private.decrypt(blob[:k], oaep_padding(name, label))
    assert len(eph) == bits // 8
    return aes_key_unwrap_with_padding(eph, blob[k:])


class Calls:
    """C_WrapKey / C_UnwrapKey / C_GetAttributeValue through ctypes on the module python-pkcs11
    has loaded and initialised (same library, same application, same login)."""

    def __init__(self, session: pkcs11.Session) -> None:
        self.dll = ctypes.CDLL(str(require_module()))
        self.dll.C_WrapKey.restype = c_ulong
        self.dll.C_UnwrapKey.restype = c_ulong
        self.h = U(session.handle)

    def wrap(self, mech: tuple[CK_MECHANISM, list[object]], wrapping: int, key: int) -> tuple[int, bytes]:
        m = mech[0]
        n = U(0)
        rv = self.dll.C_WrapKey(self.h, byref(m), U(wrapping), U(key), None, byref(n))
        if rv != RV.OK:
            return int(rv), b""
        out = create_string_buffer(n.value)
        rv = self.dll.C_WrapKey(self.h, byref(m), U(wrapping), U(key), out, byref(n))
        return int(rv), out.raw[:n.value]

    def unwrap(self, mech: tuple[CK_MECHANISM, list[object]], unwrapping: int, blob: bytes,
               *attrs: tuple[int, object]) -> tuple[int, int]:
        t, _keep = template(*attrs)
        h = U()
        rv = self.dll.C_UnwrapKey(self.h, byref(mech[0]), U(unwrapping), blob, U(len(blob)), t,
                                  U(len(attrs)), byref(h))
        return int(rv), h.value

    def value(self, handle: int, attr: int = A.VALUE) -> bytes:
        t, _keep = template((attr, bytes(4096)))
        assert self.dll.C_GetAttributeValue(self.h, U(handle), t, U(1)) == RV.OK
        return ctypes.string_at(t[0].pValue, t[0].ulValueLen)


SECRET = ((A.CLASS, 4), (A.KEY_TYPE, 0x1F), (A.TOKEN, False), (A.ENCRYPT, True), (A.EXTRACTABLE, True),
          (A.SENSITIVE, False))


@pytest.fixture(scope="module")
def session(hsmsim_session_cluster) -> Iterator[pkcs11.Session]:  # type: ignore[no-untyped-def]
    lib = use_gateway(hsmsim_session_cluster.socket_path)
    s = lib.get_token(token_label="hsm1").open(rw=True, user_pin=hsmsim_session_cluster.pin)
    yield s
    s.close()


@pytest.fixture(scope="module")
def calls(session: pkcs11.Session) -> Calls:
    return Calls(session)


@pytest.fixture(scope="module")
def outside() -> rsa.RSAPrivateKey:
    """An RSA key pair that lives in pyca/cryptography; its public half is imported into hsmsim."""
    return rsa.generate_private_key(65537, 2048)


@pytest.fixture(scope="module")
def outside_pub(session: pkcs11.Session, outside: rsa.RSAPrivateKey) -> pkcs11.PublicKey:
    n = outside.public_key().public_numbers()
    return session.create_object({Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.KEY_TYPE: KeyType.RSA,
                                  Attribute.MODULUS: n.n.to_bytes(256, "big"),
                                  Attribute.PUBLIC_EXPONENT: n.e.to_bytes(3, "big"),
                                  Attribute.WRAP: True, Attribute.ENCRYPT: True, Attribute.TOKEN: False})


@pytest.fixture(scope="module")
def inside(session: pkcs11.Session):  # type: ignore[no-untyped-def]
    """An RSA key pair generated in hsmsim (CKA_WRAP on the public, CKA_UNWRAP on the private key)."""
    return session.generate_keypair(KeyType.RSA, 2048, store=False)


@pytest.fixture(scope="module")
def secret(session: pkcs11.Session) -> pkcs11.SecretKey:
    return session.create_object({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
                                  Attribute.VALUE: KEY, Attribute.EXTRACTABLE: True, Attribute.ENCRYPT: True,
                                  Attribute.WRAP: True, Attribute.UNWRAP: True, Attribute.TOKEN: False})


def ecb(key: bytes, data: bytes) -> bytes:
    return Cipher(algorithms.AES(key), modes.ECB()).encryptor().update(data)


# --- CKM_RSA_PKCS -------------------------------------------------------------------------------
def test_rsa_pkcs_wrap_is_unwrapped_by_cryptography(session: pkcs11.Session, outside, outside_pub,  # type: ignore[no-untyped-def]
                                                   secret: pkcs11.SecretKey) -> None:
    wrapped = outside_pub.wrap_key(secret, mechanism=Mechanism.RSA_PKCS)
    assert len(wrapped) == 256
    assert outside.decrypt(wrapped, padding.PKCS1v15()) == KEY


def test_rsa_pkcs_unwrap_of_a_cryptography_wrap(session: pkcs11.Session, inside, calls: Calls) -> None:  # type: ignore[no-untyped-def]
    pub, priv = inside
    value = os.urandom(16)
    wrapped = crypto_public(pub).encrypt(value, padding.PKCS1v15())
    clone = priv.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, wrapped, mechanism=Mechanism.RSA_PKCS,
                            template={Attribute.ENCRYPT: True, Attribute.TOKEN: False,
                                      Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True})
    assert clone[Attribute.VALUE_LEN] == 16
    assert calls.value(clone.handle) == value
    data = os.urandom(32)
    assert clone.encrypt(data, mechanism=Mechanism.AES_ECB) == ecb(value, data)


def test_rsa_pkcs_round_trip_in_hsmsim(session: pkcs11.Session, inside, secret: pkcs11.SecretKey) -> None:  # type: ignore[no-untyped-def]
    pub, priv = inside
    wrapped = pub.wrap_key(secret, mechanism=Mechanism.RSA_PKCS)
    clone = priv.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, wrapped, mechanism=Mechanism.RSA_PKCS,
                            template={Attribute.ENCRYPT: True, Attribute.TOKEN: False})
    data = os.urandom(16)
    assert clone.encrypt(data, mechanism=Mechanism.AES_ECB) == ecb(KEY, data)


def test_rsa_pkcs_errors(session: pkcs11.Session, inside, calls: Calls, secret: pkcs11.SecretKey) -> None:  # type: ignore[no-untyped-def]
    pub, priv = inside
    # CKM_RSA_PKCS wraps secret keys only (PKCS#11 2.40 §2.1.6)
    other_pub, other_priv = session.generate_keypair(KeyType.RSA, 2048, store=False,
                                                     private_template={Attribute.EXTRACTABLE: True})
    assert calls.wrap(rsa_pkcs(), pub.handle, other_priv.handle)[0] == RV.KEY_NOT_WRAPPABLE
    # the wrapping key must be an RSA public key, the unwrapping key an RSA private key
    assert calls.wrap(rsa_pkcs(), secret.handle, secret.handle)[0] == RV.WRAPPING_KEY_TYPE_INCONSISTENT
    good = pub.wrap_key(secret, mechanism=Mechanism.RSA_PKCS)
    assert calls.unwrap(rsa_pkcs(), secret.handle, good, *SECRET)[0] == RV.UNWRAPPING_KEY_TYPE_INCONSISTENT
    # garbage, and a blob of the wrong length
    assert calls.unwrap(rsa_pkcs(), priv.handle, os.urandom(256), *SECRET)[0] == RV.WRAPPED_KEY_INVALID
    assert calls.unwrap(rsa_pkcs(), priv.handle, good[:-1], *SECRET)[0] == RV.WRAPPED_KEY_LEN_RANGE
    # a parameter where none belongs
    m = CK_MECHANISM(M.RSA_PKCS, cast(create_string_buffer(8), c_void_p), 8)
    assert calls.wrap((m, []), pub.handle, secret.handle)[0] == RV.MECHANISM_PARAM_INVALID
    del other_pub


# --- CKM_RSA_AES_KEY_WRAP ------------------------------------------------------------------------
@pytest.mark.parametrize("bits,name,label", [(128, "sha1", b""), (192, "sha256", b""),
                                             (256, "sha256", b"import label"), (256, "sha384", b""),
                                             (256, "sha512", b"")])
def test_rsa_aes_wrap_is_unwrapped_by_cryptography(calls: Calls, outside, outside_pub,  # type: ignore[no-untyped-def]
                                                   secret: pkcs11.SecretKey, bits: int, name: str,
                                                   label: bytes) -> None:
    rv, blob = calls.wrap(rsa_aes(bits, name, label), outside_pub.handle, secret.handle)
    assert rv == RV.OK
    assert len(blob) == 256 + 40  # RSA-2048 block || KWP of 32 bytes (32 + 8)
    assert crypto_unwrap(outside, blob, bits, name, label) == KEY


@pytest.mark.parametrize("bits,name", [(128, "sha256"), (256, "sha1"), (256, "sha512")])
def test_rsa_aes_unwrap_of_a_cryptography_wrap(calls: Calls, inside, bits: int, name: str) -> None:  # type: ignore[no-untyped-def]
    pub, priv = inside
    for value, kt in ((os.urandom(16), 0x1F), (os.urandom(24), 0x1F), (os.urandom(45), 0x10)):
        blob = crypto_wrap(crypto_public(pub), value, bits, name)
        attrs = ((A.CLASS, 4), (A.KEY_TYPE, kt), (A.TOKEN, False), (A.EXTRACTABLE, True), (A.SENSITIVE, False))
        rv, h = calls.unwrap(rsa_aes(bits, name), priv.handle, blob, *attrs)
        assert rv == RV.OK
        assert calls.value(h) == value
        assert int.from_bytes(calls.value(h, A.VALUE_LEN), "little") == len(value)


def test_rsa_aes_unwrapped_key_encrypts_like_cryptography(session: pkcs11.Session, calls: Calls, inside) -> None:  # type: ignore[no-untyped-def]
    """The imported key is a working, non-extractable key (no CKA_VALUE read needed)."""
    pub, priv = inside
    value = os.urandom(32)
    blob = crypto_wrap(crypto_public(pub), value)
    rv, h = calls.unwrap(rsa_aes(), priv.handle, blob, (A.CLASS, 4), (A.KEY_TYPE, 0x1F), (A.TOKEN, False),
                         (A.ENCRYPT, True), (A.LABEL, "rsa-aes-imported"), (A.EXTRACTABLE, False))
    assert rv == RV.OK
    key = session.get_key(label="rsa-aes-imported")
    assert key.handle == h and key[Attribute.LOCAL] is False and key[Attribute.EXTRACTABLE] is False
    data = os.urandom(48)
    assert key.encrypt(data, mechanism=Mechanism.AES_ECB) == ecb(value, data)


def test_rsa_aes_wraps_private_keys_as_pkcs8(session: pkcs11.Session, calls: Calls, outside, outside_pub) -> None:  # type: ignore[no-untyped-def]
    from pkcs11.util.ec import encode_named_curve_parameters
    rpub, rpriv = session.generate_keypair(KeyType.RSA, 2048, store=False,
                                           private_template={Attribute.EXTRACTABLE: True})
    rv, blob = calls.wrap(rsa_aes(), outside_pub.handle, rpriv.handle)
    assert rv == RV.OK
    der = crypto_unwrap(outside, blob)
    key = serialization.load_der_private_key(der, None)
    assert isinstance(key, rsa.RSAPrivateKey)
    assert key.public_key().public_numbers() == crypto_public(rpub).public_numbers()
    params = session.create_domain_parameters(
        KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True)
    epub, epriv = params.generate_keypair(store=False, private_template={Attribute.EXTRACTABLE: True})
    rv, blob = calls.wrap(rsa_aes(192, "sha384"), outside_pub.handle, epriv.handle)
    assert rv == RV.OK
    key = serialization.load_der_private_key(crypto_unwrap(outside, blob, 192, "sha384"), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key().public_numbers() == crypto_public(epub).public_numbers()


def test_rsa_aes_unwraps_private_keys_from_cryptography(session: pkcs11.Session, calls: Calls, inside) -> None:  # type: ignore[no-untyped-def]
    """The import path AWS documents: a PKCS#8 private key wrapped with RSA-AES, unwrapped into
    the HSM, then used; checked by verifying its signatures with the original public key."""
    pub, priv = inside
    for kt, made in ((0x0, rsa.generate_private_key(65537, 2048)), (0x3, ec.generate_private_key(ec.SECP384R1()))):
        der = made.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
        blob = crypto_wrap(crypto_public(pub), der)
        label = f"rsa-aes-imported-{kt}"
        rv, _h = calls.unwrap(rsa_aes(), priv.handle, blob, (A.CLASS, 3), (A.KEY_TYPE, kt), (A.TOKEN, False),
                              (A.SIGN, True), (A.LABEL, label))
        assert rv == RV.OK
        key = session.get_key(label=label, object_class=ObjectClass.PRIVATE_KEY)
        if kt == 0x0:
            sig = key.sign(b"imported", mechanism=Mechanism.SHA256_RSA_PKCS)
            made.public_key().verify(sig, b"imported", padding.PKCS1v15(), hashes.SHA256())  # type: ignore[call-arg, arg-type]
        else:
            from cryptography.hazmat.primitives.asymmetric import utils
            sig = key.sign(b"imported", mechanism=Mechanism.ECDSA_SHA256)
            half = len(sig) // 2
            der_sig = utils.encode_dss_signature(int.from_bytes(sig[:half], "big"), int.from_bytes(sig[half:], "big"))
            made.public_key().verify(der_sig, b"imported", ec.ECDSA(hashes.SHA256()))  # type: ignore[call-arg]
        # the template must match what is inside
        rv, _h = calls.unwrap(rsa_aes(), priv.handle, blob, (A.CLASS, 3), (A.KEY_TYPE, 0x3 - kt),
                              (A.TOKEN, False), (A.SIGN, True))
        assert rv == RV.TEMPLATE_INCONSISTENT


def test_rsa_aes_round_trip_in_hsmsim(calls: Calls, inside, secret: pkcs11.SecretKey) -> None:  # type: ignore[no-untyped-def]
    pub, priv = inside
    rv, blob = calls.wrap(rsa_aes(128, "sha224"), pub.handle, secret.handle)
    assert rv == RV.OK
    rv2, blob2 = calls.wrap(rsa_aes(128, "sha224"), pub.handle, secret.handle)
    assert rv2 == RV.OK and blob2 != blob  # a fresh ephemeral key and OAEP seed each time
    rv, h = calls.unwrap(rsa_aes(128, "sha224"), priv.handle, blob, *SECRET)
    assert rv == RV.OK and calls.value(h) == KEY


@pytest.mark.parametrize("bits", [0, 64, 127, 512])
def test_rsa_aes_bad_key_bits(calls: Calls, inside, secret: pkcs11.SecretKey, bits: int) -> None:  # type: ignore[no-untyped-def]
    pub, priv = inside
    assert calls.wrap(rsa_aes(bits), pub.handle, secret.handle)[0] == RV.MECHANISM_PARAM_INVALID
    blob = crypto_wrap(crypto_public(pub), KEY)
    assert calls.unwrap(rsa_aes(bits), priv.handle, blob, *SECRET)[0] == RV.MECHANISM_PARAM_INVALID


def test_rsa_aes_bad_parameters(calls: Calls, inside, secret: pkcs11.SecretKey) -> None:  # type: ignore[no-untyped-def]
    pub, priv = inside
    bad = RV.MECHANISM_PARAM_INVALID
    # NULL pOAEPParams
    assert calls.wrap(rsa_aes(oaep=False), pub.handle, secret.handle)[0] == bad
    blob = crypto_wrap(crypto_public(pub), KEY)
    assert calls.unwrap(rsa_aes(oaep=False), priv.handle, blob, *SECRET)[0] == bad
    # OAEP hash and MGF1 differ (UG:pkcs11-mechanisms footnote 4)
    assert calls.wrap(rsa_aes(mgf=1), pub.handle, secret.handle)[0] == bad
    # no parameter, or one of the wrong size
    assert calls.wrap((CK_MECHANISM(M.RSA_AES_KEY_WRAP, None, 0), []), pub.handle, secret.handle)[0] == bad
    m, keep = rsa_aes()
    m.ulParameterLen -= 1
    assert calls.wrap((m, keep), pub.handle, secret.handle)[0] == bad


def test_rsa_aes_wrong_keys(session: pkcs11.Session, calls: Calls, inside, secret: pkcs11.SecretKey) -> None:  # type: ignore[no-untyped-def]
    pub, priv = inside
    # an AES key (with CKA_WRAP/CKA_UNWRAP) is not an RSA wrapping key
    assert calls.wrap(rsa_aes(), secret.handle, secret.handle)[0] == RV.WRAPPING_KEY_TYPE_INCONSISTENT
    blob = crypto_wrap(crypto_public(pub), KEY)
    assert calls.unwrap(rsa_aes(), secret.handle, blob, *SECRET)[0] == RV.UNWRAPPING_KEY_TYPE_INCONSISTENT
    # a wrapping key without CKA_WRAP, an unwrapping key without CKA_UNWRAP
    nowrap_pub, nowrap_priv = session.generate_keypair(
        KeyType.RSA, 2048, store=False, public_template={Attribute.WRAP: False},
        private_template={Attribute.UNWRAP: False})
    assert calls.wrap(rsa_aes(), nowrap_pub.handle, secret.handle)[0] == RV.KEY_FUNCTION_NOT_PERMITTED
    blob2 = crypto_wrap(crypto_public(nowrap_pub), KEY)
    assert calls.unwrap(rsa_aes(), nowrap_priv.handle, blob2, *SECRET)[0] == RV.KEY_FUNCTION_NOT_PERMITTED
    # a key that is not extractable
    fixed = session.generate_key(KeyType.AES, 128, store=False, template={Attribute.EXTRACTABLE: False})
    assert calls.wrap(rsa_aes(), pub.handle, fixed.handle)[0] == RV.KEY_UNEXTRACTABLE


def test_rsa_aes_unwrap_of_garbage(calls: Calls, inside) -> None:  # type: ignore[no-untyped-def]
    pub, priv = inside
    good = crypto_wrap(crypto_public(pub), KEY)
    # random bytes, a damaged RSA block, a damaged key wrap, and blobs too short to hold both parts
    assert calls.unwrap(rsa_aes(), priv.handle, os.urandom(296), *SECRET)[0] == RV.WRAPPED_KEY_INVALID
    assert calls.unwrap(rsa_aes(), priv.handle, bytes([good[0] ^ 1]) + good[1:], *SECRET)[0] == RV.WRAPPED_KEY_INVALID
    assert calls.unwrap(rsa_aes(), priv.handle, good[:-1] + bytes([good[-1] ^ 1]), *SECRET)[0] == RV.WRAPPED_KEY_INVALID
    assert calls.unwrap(rsa_aes(), priv.handle, good[:256], *SECRET)[0] == RV.WRAPPED_KEY_LEN_RANGE
    assert calls.unwrap(rsa_aes(), priv.handle, good[:100], *SECRET)[0] == RV.WRAPPED_KEY_LEN_RANGE
    # the ephemeral key was wrapped with another OAEP hash
    assert calls.unwrap(rsa_aes(name="sha1"), priv.handle, good, *SECRET)[0] == RV.WRAPPED_KEY_INVALID


# --- a FIPS-mode cluster ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fips_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterGateway]:
    require_module()
    gw = ClusterGateway(tmp_path_factory.mktemp("fipsgw") / "gateway.sock", {"fips_mode": "true"})
    yield gw
    gw.stop()


def test_fips_mode_refuses_rsa_pkcs_wrapping_but_not_rsa_aes(tmp_path, fips_gateway: ClusterGateway,  # type: ignore[no-untyped-def]
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """UG:pkcs11-mechanisms footnote 5: CKM_RSA_PKCS wrapping is disallowed for FIPS-mode
    clusters after 2023 (CKR_MECHANISM_INVALID here, both directions); RSA-AES (OAEP) is not."""
    from p11helpers import copy_module
    monkeypatch.setenv("HSMSIM_SOCKET", str(fips_gateway.sock))
    raw = Raw(copy_module(tmp_path))
    assert raw.C_Initialize(None) == RV.OK
    try:
        h = open_session(raw, REF_PIN)
        pub, priv = U(), U()
        gen = CK_MECHANISM(M.RSA_PKCS_KEY_PAIR_GEN, None, 0)
        pt, _k1 = template((A.MODULUS_BITS, 2048), (A.PUBLIC_EXPONENT, b"\x01\x00\x01"), (A.WRAP, True),
                           (A.TOKEN, False))
        vt, _k2 = template((A.UNWRAP, True), (A.TOKEN, False))
        assert raw.C_GenerateKeyPair(U(h), byref(gen), pt, U(4), vt, U(2), byref(pub), byref(priv)) == RV.OK
        key = U()
        st, _k3 = template((A.CLASS, 4), (A.KEY_TYPE, 0x1F), (A.VALUE, KEY), (A.EXTRACTABLE, True), (A.TOKEN, False))
        assert raw.C_CreateObject(U(h), st, U(5), byref(key)) == RV.OK
        n = U(0)
        m, _keep = rsa_pkcs()
        assert raw.C_WrapKey(U(h), byref(m), pub, key, None, byref(n)) == RV.MECHANISM_INVALID
        n_bytes = bytearray(256)
        mt, _k4 = template((A.MODULUS, bytes(n_bytes)))
        assert raw.C_GetAttributeValue(U(h), pub, mt, U(1)) == RV.OK
        modulus = int.from_bytes(ctypes.string_at(mt[0].pValue, mt[0].ulValueLen), "big")
        public = rsa.RSAPublicNumbers(65537, modulus).public_key()
        blob = public.encrypt(KEY, padding.PKCS1v15())
        t, _k5 = template(*SECRET)
        out = U()
        assert raw.C_UnwrapKey(U(h), byref(m), priv, blob, U(len(blob)), t, U(len(SECRET)), byref(out)) \
            == RV.MECHANISM_INVALID
        # RSA-AES (OAEP) is a FIPS-approved way to import keys
        ma, _keep2 = rsa_aes()
        assert raw.C_WrapKey(U(h), byref(ma), pub, key, None, byref(n)) == RV.OK and n.value == 296
        blob = crypto_wrap(public, KEY)
        assert raw.C_UnwrapKey(U(h), byref(ma), priv, blob, U(len(blob)), t, U(len(SECRET)), byref(out)) == RV.OK
    finally:
        raw.C_Finalize(None)
