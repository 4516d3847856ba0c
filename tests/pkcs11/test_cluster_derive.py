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
