"""Through libhsmsim-pkcs11 against a real hsmsim cluster: DES3, AES-GCM key wrapping, ECDH1
with CloudHSM's X9.63 KDFs and the vendor SP 800-108 counter KDF, checked against
pyca/cryptography. Vendor mechanisms and parameters go through ctypes on the same module."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from ctypes import POINTER, Structure, byref, c_ulong, c_void_p, create_string_buffer

import pkcs11
import pytest
from cryptography.hazmat.primitives import padding as sympad
from cryptography.hazmat.primitives.ciphers import Cipher, modes
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from p11helpers import require_module, use_gateway
from p11raw import CK_ATTRIBUTE, CK_GCM_PARAMS, CK_MECHANISM


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
def dll(session: pkcs11.Session) -> ctypes.CDLL:
    return ctypes.CDLL(str(require_module()))


def _tdes(key: bytes):  # type: ignore[no-untyped-def]
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
    return TripleDES(key)


def test_des3_through_the_module(session: pkcs11.Session) -> None:
    gen = session.generate_key(KeyType.DES3, capabilities=pkcs11.MechanismFlag.ENCRYPT
                               | pkcs11.MechanismFlag.DECRYPT)
    assert gen[Attribute.KEY_TYPE] == KeyType.DES3
    iv = os.urandom(8)
    ct = gen.encrypt(b"generated key", mechanism=Mechanism.DES3_CBC_PAD, mechanism_param=iv)
    assert gen.decrypt(ct, mechanism=Mechanism.DES3_CBC_PAD, mechanism_param=iv) == b"generated key"
    key = os.urandom(24)
    imp = session.create_object({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.DES3,
                                 Attribute.VALUE: key, Attribute.ENCRYPT: True, Attribute.DECRYPT: True,
                                 Attribute.TOKEN: False})
    pt = os.urandom(24)
    e = Cipher(_tdes(key), modes.ECB()).encryptor()
    assert imp.encrypt(pt, mechanism=Mechanism.DES3_ECB) == e.update(pt) + e.finalize()
    e = Cipher(_tdes(key), modes.CBC(iv)).encryptor()
    assert imp.encrypt(pt, mechanism=Mechanism.DES3_CBC, mechanism_param=iv) == e.update(pt) + e.finalize()
    pd = sympad.PKCS7(64).padder()
    e = Cipher(_tdes(key), modes.CBC(iv)).encryptor()
    want = e.update(pd.update(pt[:5]) + pd.finalize()) + e.finalize()
    assert imp.encrypt(pt[:5], mechanism=Mechanism.DES3_CBC_PAD, mechanism_param=iv) == want
    assert imp.decrypt(want, mechanism=Mechanism.DES3_CBC_PAD, mechanism_param=iv) == pt[:5]


class _Raw:
    """One ctypes session on the module python-pkcs11 already initialised and logged in."""

    def __init__(self, dll: ctypes.CDLL) -> None:
        self.dll, self.h = dll, c_ulong()
        assert dll.C_OpenSession(c_ulong(1), c_ulong(6), None, None, byref(self.h)) == 0

    def close(self) -> None:
        self.dll.C_CloseSession(self.h)

    def wrap(self, mech: CK_MECHANISM, wrapping: int, key: int) -> tuple[int, bytes]:
        out, n = create_string_buffer(4096), c_ulong(4096)
        rv = self.dll.C_WrapKey(self.h, byref(mech), c_ulong(wrapping), c_ulong(key), out, byref(n))
        return rv, out.raw[:n.value]

    def unwrap(self, mech: CK_MECHANISM, unwrapping: int, blob: bytes,
               template: list[tuple[int, bytes]]) -> tuple[int, int]:
        attrs, keep = _template(template)
        h = c_ulong()
        rv = self.dll.C_UnwrapKey(self.h, byref(mech), c_ulong(unwrapping), blob, c_ulong(len(blob)),
                                  attrs, c_ulong(len(template)), byref(h))
        del keep
        return rv, h.value

    def derive(self, mech: CK_MECHANISM, base: int, template: list[tuple[int, bytes]]) -> tuple[int, int]:
        attrs, keep = _template(template)
        h = c_ulong()
        rv = self.dll.C_DeriveKey(self.h, byref(mech), c_ulong(base), attrs, c_ulong(len(template)), byref(h))
        del keep
        return rv, h.value

    def value(self, h: int) -> bytes:
        buf = create_string_buffer(1024)
        a = CK_ATTRIBUTE(Attribute.VALUE, ctypes.cast(buf, c_void_p), 1024)
        assert self.dll.C_GetAttributeValue(self.h, c_ulong(h), byref(a), c_ulong(1)) == 0
        return buf.raw[:a.ulValueLen]


def _ul(v: int) -> bytes:
    return bytes(c_ulong(v))


def _template(t: list[tuple[int, bytes]]):  # type: ignore[no-untyped-def]
    bufs = [create_string_buffer(v, len(v)) for _, v in t]
    arr = (CK_ATTRIBUTE * len(t))(*[CK_ATTRIBUTE(a, ctypes.cast(b, c_void_p), len(v))
                                    for (a, v), b in zip(t, bufs)])
    return arr, bufs


T, F = b"\x01", b"\x00"
READABLE_AES = [(Attribute.CLASS, _ul(ObjectClass.SECRET_KEY)), (Attribute.KEY_TYPE, _ul(KeyType.AES)),
                (Attribute.SENSITIVE, F), (Attribute.EXTRACTABLE, T), (Attribute.TOKEN, F)]


@pytest.fixture
def raw(dll: ctypes.CDLL) -> Iterator[_Raw]:
    r = _Raw(dll)
    yield r
    r.close()


@pytest.mark.parametrize("mech", [int(Mechanism.AES_GCM), 0x80001087])  # CKM_CLOUDHSM_AES_GCM
def test_aes_gcm_wrap_unwrap_through_the_module(session: pkcs11.Session, raw: _Raw, mech: int) -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    kek, secret = os.urandom(32), os.urandom(32)
    w = session.create_object({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
                               Attribute.VALUE: kek, Attribute.WRAP: True, Attribute.UNWRAP: True,
                               Attribute.TOKEN: False})
    k = session.create_object({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
                               Attribute.VALUE: secret, Attribute.EXTRACTABLE: True, Attribute.TOKEN: False})
    iv, aad = create_string_buffer(12), create_string_buffer(b"aad", 3)
    vendor = mech != Mechanism.AES_GCM  # CKM_CLOUDHSM_AES_GCM takes a NULL pIv (footnote 3)
    p = CK_GCM_PARAMS(None if vendor else ctypes.cast(iv, c_void_p), 0 if vendor else 12, 0,
                      ctypes.cast(aad, c_void_p), 3, 128)
    m = CK_MECHANISM(mech, ctypes.cast(byref(p), c_void_p), ctypes.sizeof(p))
    rv, blob = raw.wrap(m, w.handle, k.handle)
    assert rv == 0, hex(rv)
    if mech == Mechanism.AES_GCM:  # the HSM's IV comes back in CK_GCM_PARAMS
        assert len(blob) == 48 and iv.raw != bytes(12)
        full = iv.raw + blob
    else:  # CKM_CLOUDHSM_AES_GCM prepends it
        assert len(blob) == 60
        full = blob
    assert AESGCM(kek).decrypt(full[:12], full[12:], b"aad") == secret
    if mech == Mechanism.AES_GCM:
        ctypes.memmove(iv, full[:12], 12)
        wrapped = full[12:]
    else:
        wrapped = full
    rv, u = raw.unwrap(m, w.handle, wrapped, READABLE_AES)
    assert rv == 0, hex(rv)
    assert raw.value(u) == secret
    rv, _ = raw.unwrap(m, w.handle, wrapped[:-1] + bytes([wrapped[-1] ^ 1]), READABLE_AES)
    assert rv == 0x110  # CKR_WRAPPED_KEY_INVALID


class CK_ECDH1_DERIVE_PARAMS(Structure):
    _fields_ = [("kdf", c_ulong), ("ulSharedDataLen", c_ulong), ("pSharedData", c_void_p),
                ("ulPublicDataLen", c_ulong), ("pPublicData", c_void_p)]


class CK_PRF_DATA_PARAM(Structure):
    _fields_ = [("type", c_ulong), ("pValue", c_void_p), ("ulValueLen", c_ulong)]


class CK_SP800_108_KDF_PARAMS(Structure):
    _fields_ = [("prftype", c_ulong), ("ulNumberOfDataParams", c_ulong),
                ("pDataParams", POINTER(CK_PRF_DATA_PARAM))]


# FIDELITY: CKD_CLOUDHSM_X963_* values are hsmsim's (VENDOR_DEFINED | 1..5), not verified
# against CloudHSM's header (see hsmsim/pkcs11/constants.py).
X963_KDFS = {0x80000001: "SHA1", 0x80000002: "SHA224", 0x80000003: "SHA256", 0x80000004: "SHA384",
             0x80000005: "SHA512", 6: "SHA256"}  # 6 = standard CKD_SHA256_KDF


def test_ecdh_x963_kdfs_through_the_module(session: pkcs11.Session, raw: _Raw) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.kdf.x963kdf import X963KDF
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    from pkcs11.util.ec import encode_named_curve_parameters
    params = session.create_domain_parameters(
        KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True)
    pub, priv = params.generate_keypair(store=False, capabilities=pkcs11.MechanismFlag.DERIVE)
    point = pub[Attribute.EC_POINT]
    pk = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point[2:])
    peer = ec.generate_private_key(ec.SECP256R1())
    peer_point = peer.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    z = peer.exchange(ec.ECDH(), pk)
    pbuf, info = create_string_buffer(peer_point, len(peer_point)), create_string_buffer(b"info", 4)
    for kdf_type, hname in X963_KDFS.items():
        p = CK_ECDH1_DERIVE_PARAMS(kdf_type, 4, ctypes.cast(info, c_void_p), len(peer_point),
                                   ctypes.cast(pbuf, c_void_p))
        m = CK_MECHANISM(Mechanism.ECDH1_DERIVE, ctypes.cast(byref(p), c_void_p), ctypes.sizeof(p))
        rv, h = raw.derive(m, priv.handle, READABLE_AES + [(Attribute.VALUE_LEN, _ul(32))])
        assert rv == 0, (hex(kdf_type), hex(rv))
        assert raw.value(h) == X963KDF(getattr(hashes, hname)(), 32, b"info").derive(z)
    p = CK_ECDH1_DERIVE_PARAMS(0x80000077, 0, None, len(peer_point), ctypes.cast(pbuf, c_void_p))
    m = CK_MECHANISM(Mechanism.ECDH1_DERIVE, ctypes.cast(byref(p), c_void_p), ctypes.sizeof(p))
    rv, _ = raw.derive(m, priv.handle, READABLE_AES + [(Attribute.VALUE_LEN, _ul(32))])
    assert rv == 0x71  # CKR_MECHANISM_PARAM_INVALID


def test_sp800_108_counter_kdf_through_the_module(session: pkcs11.Session, raw: _Raw) -> None:
    """The AWS samples' hmac_kdf.c / aes_cmac_kdf.c parameter layouts, against pyca."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers import algorithms
    from cryptography.hazmat.primitives.kdf.kbkdf import CounterLocation, KBKDFCMAC, KBKDFHMAC, Mode
    key = os.urandom(32)
    base = session.create_object({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
                                  Attribute.VALUE: key, Attribute.DERIVE: True, Attribute.TOKEN: False})
    label, context = b"\x01\xab\xe1", b"\x0c\x09\x7e\x07"
    counter, dkm = (c_ulong * 1)(32), (c_ulong * 2)(1, 32)  # CK_SP800_108_COUNTER_FORMAT / DKM_LENGTH_FORMAT
    lb, cb = create_string_buffer(label, 3), create_string_buffer(context, 4)

    def run(prf: int, layout: list[tuple[int, object, int]]) -> bytes:
        arr = (CK_PRF_DATA_PARAM * len(layout))(*[CK_PRF_DATA_PARAM(t, ctypes.cast(v, c_void_p), n)
                                                  for t, v, n in layout])
        p = CK_SP800_108_KDF_PARAMS(prf, len(layout), arr)
        m = CK_MECHANISM(0x80000001, ctypes.cast(byref(p), c_void_p), ctypes.sizeof(p))
        rv, h = raw.derive(m, base.handle, READABLE_AES + [(Attribute.VALUE_LEN, _ul(32))])
        assert rv == 0, hex(rv)
        return raw.value(h)

    # aes_cmac_kdf.c: BYTE_ARRAY(label), ITERATION_VARIABLE, BYTE_ARRAY(context), DKM_LENGTH.
    cmac_layout = [(3, lb, 3), (1, counter, ctypes.sizeof(counter)), (3, cb, 4), (2, dkm, ctypes.sizeof(dkm))]
    fixed = label + context + (256).to_bytes(4, "big")
    assert run(int(Mechanism.AES_CMAC), cmac_layout) == KBKDFCMAC(
        algorithms.AES, Mode.CounterMode, 32, 4, None, CounterLocation.MiddleFixed, None, None, fixed,
        break_location=3).derive(key)
    # hmac_kdf.c (2017 header): COUNTER_FORMAT, DKM_FORMAT, PRF_LABEL, PRF_CONTEXT.
    hmac_layout = [(4, counter, ctypes.sizeof(counter)), (7, dkm, ctypes.sizeof(dkm)), (5, lb, 3), (6, cb, 4)]
    assert run(int(Mechanism.SHA512_HMAC), hmac_layout) == KBKDFHMAC(
        hashes.SHA512(), Mode.CounterMode, 32, 4, 4, CounterLocation.BeforeFixed, label, context,
        None).derive(key)
