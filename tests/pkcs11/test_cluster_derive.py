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
