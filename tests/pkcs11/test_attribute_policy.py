"""CloudHSM's attribute rules through the module (reference cloudhsm.md §1.6): CKA_PRIVATE may only
be its default (true on every key, false on certificates), and CKA_ALWAYS_AUTHENTICATE, absent
from CloudHSM's attribute tables, is an unsupported attribute type everywhere. Every creating
call is checked, and a refused call leaves no object behind."""

from __future__ import annotations

import ctypes
from ctypes import POINTER, Structure, byref, c_ulong, c_void_p, create_string_buffer

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.keywrap import aes_key_wrap

from hsmsim.pkcs11.constants import RV, Attribute as A, KeyType, Mechanism as M, ObjectClass, UserType
from p11helpers import REF_PIN
from p11raw import CK_ATTRIBUTE, CK_MECHANISM, Raw, mechanism, open_session, template

U = c_ulong
UNAVAILABLE = (1 << 64) - 1
KEK = bytes(range(16))
P256 = bytes.fromhex("06082a8648ce3d030107")


def _b(i: int) -> bytes:
    return i.to_bytes((i.bit_length() + 7) // 8, "big")


def _count(raw: Raw, h: int, label: str) -> int:
    """How many objects carry `label` (a refused call must leave none)."""
    t, _keep = template((A.LABEL, label))
    assert raw.C_FindObjectsInit(U(h), t, U(1)) == RV.OK
    out, n = (U * 16)(), U()
    assert raw.C_FindObjects(U(h), out, U(16), byref(n)) == RV.OK
    assert raw.C_FindObjectsFinal(U(h)) == RV.OK
    return n.value


def _bool_attr(raw: Raw, h: int, obj: int, attr: int) -> tuple[int, int, int]:
    """(rv, ulValueLen, value byte) of one CK_BBOOL attribute."""
    buf = create_string_buffer(1)
    a = CK_ATTRIBUTE(attr, ctypes.cast(buf, c_void_p), 1)
    rv = raw.C_GetAttributeValue(U(h), U(obj), byref(a), U(1))
    return int(rv), int(a.ulValueLen), buf.raw[0]


def _rsa_private_items() -> list[tuple[int, object]]:
    n = rsa.generate_private_key(65537, 2048).private_numbers()
    return [(A.CLASS, ObjectClass.PRIVATE_KEY), (A.KEY_TYPE, KeyType.RSA), (A.SIGN, True),
            (A.MODULUS, _b(n.public_numbers.n)), (A.PUBLIC_EXPONENT, _b(n.public_numbers.e)),
            (A.PRIVATE_EXPONENT, _b(n.d)), (A.PRIME_1, _b(n.p)), (A.PRIME_2, _b(n.q)),
            (A.EXPONENT_1, _b(n.dmp1)), (A.EXPONENT_2, _b(n.dmq1)), (A.COEFFICIENT, _b(n.iqmp))]


def _create_items(kind: str) -> list[tuple[int, object]]:
    if kind == "aes":
        return [(A.CLASS, ObjectClass.SECRET_KEY), (A.KEY_TYPE, KeyType.AES), (A.VALUE, bytes(16)),
                (A.ENCRYPT, True)]
    if kind == "rsa-public":
        n = rsa.generate_private_key(65537, 2048).public_key().public_numbers()
        return [(A.CLASS, ObjectClass.PUBLIC_KEY), (A.KEY_TYPE, KeyType.RSA), (A.VERIFY, True),
                (A.MODULUS, _b(n.n)), (A.PUBLIC_EXPONENT, _b(n.e))]
    if kind == "ec-public":
        point = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()
        raw_point = b"\x04" + point.x.to_bytes(32, "big") + point.y.to_bytes(32, "big")
        return [(A.CLASS, ObjectClass.PUBLIC_KEY), (A.KEY_TYPE, KeyType.EC), (A.VERIFY, True),
                (A.EC_PARAMS, P256), (A.EC_POINT, b"\x04\x41" + raw_point)]
    assert kind == "rsa-private"
    return _rsa_private_items()


def _create(raw: Raw, h: int, items: list[tuple[int, object]]) -> tuple[int, int]:
    t, _keep = template(*items)
    out = U()
    rv = raw.C_CreateObject(U(h), t, U(len(items)), byref(out))
    return int(rv), out.value


def _keypair(raw: Raw, h: int, pub: list[tuple[int, object]],
             priv: list[tuple[int, object]]) -> tuple[int, int, int]:
    mech, _m = mechanism(M.EC_KEY_PAIR_GEN)
    pt, _kp = template((A.EC_PARAMS, P256), (A.VERIFY, True), *pub)
    st, _ks = template((A.SIGN, True), *priv)
    hp, hs = U(), U()
    rv = raw.C_GenerateKeyPair(U(h), byref(mech), pt, U(2 + len(pub)), st, U(1 + len(priv)),
                               byref(hp), byref(hs))
    return int(rv), hp.value, hs.value


# -- CKA_PRIVATE ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["aes", "rsa-public", "ec-public", "rsa-private"])
def test_create_object_refuses_private_false(live: Raw, kind: str) -> None:
    """UG:pkcs11-attributes-interpreting footnote 1: CKA_PRIVATE "must be explicitly set only to
    the default value", true, for every key class (public keys included: OpenSC#2747)."""
    h = open_session(live, REF_PIN)
    label = f"private-false-{kind}"
    rv, _ = _create(live, h, _create_items(kind) + [(A.PRIVATE, False), (A.LABEL, label)])
    assert rv == RV.ATTRIBUTE_VALUE_INVALID
    assert _count(live, h, label) == 0
    rv, obj = _create(live, h, _create_items(kind) + [(A.PRIVATE, True), (A.LABEL, label)])
    assert rv == RV.OK
    assert _bool_attr(live, h, obj, A.PRIVATE) == (RV.OK, 1, 1)


def test_generate_key_refuses_private_false(live: Raw) -> None:
    h = open_session(live, REF_PIN)
    mech, _m = mechanism(M.AES_KEY_GEN)
    for private, want in ((False, RV.ATTRIBUTE_VALUE_INVALID), (True, RV.OK), (None, RV.OK)):
        items: list[tuple[int, object]] = [(A.VALUE_LEN, 16), (A.LABEL, f"gen-private-{private}")]
        if private is not None:
            items.append((A.PRIVATE, private))
        t, _keep = template(*items)
        out = U()
        assert live.C_GenerateKey(U(h), byref(mech), t, U(len(items)), byref(out)) == want
        if want == RV.OK:
            assert _bool_attr(live, h, out.value, A.PRIVATE) == (RV.OK, 1, 1)
        else:
            assert _count(live, h, f"gen-private-{private}") == 0


@pytest.mark.parametrize("side", ["public", "private"])
def test_generate_key_pair_refuses_private_false_in_either_template(live: Raw, side: str) -> None:
    h = open_session(live, REF_PIN)
    label = f"pair-private-false-{side}"
    bad: list[tuple[int, object]] = [(A.PRIVATE, False)]
    lab: list[tuple[int, object]] = [(A.LABEL, label)]
    rv, _, _ = _keypair(live, h, (bad if side == "public" else []) + lab,
                        (bad if side == "private" else []) + lab)
    assert rv == RV.ATTRIBUTE_VALUE_INVALID
    assert _count(live, h, label) == 0


def test_key_pair_defaults_to_private_true_on_both_keys(live: Raw) -> None:
    """CloudHSM's default for CKA_PRIVATE is true on public keys too (SDK 5 GenerateKeyPair table)."""
    h = open_session(live, REF_PIN)
    rv, pub, priv = _keypair(live, h, [], [])
    assert rv == RV.OK
    assert _bool_attr(live, h, pub, A.PRIVATE) == (RV.OK, 1, 1)
    assert _bool_attr(live, h, priv, A.PRIVATE) == (RV.OK, 1, 1)


def _aes_kek(raw: Raw, h: int) -> int:
    rv, kek = _create(raw, h, [(A.CLASS, ObjectClass.SECRET_KEY), (A.KEY_TYPE, KeyType.AES),
                               (A.VALUE, KEK), (A.UNWRAP, True), (A.WRAP, True)])
    assert rv == RV.OK
    return kek


def test_unwrap_key_refuses_private_false(live: Raw) -> None:
    h = open_session(live, REF_PIN)
    kek = _aes_kek(live, h)
    wrapped = aes_key_wrap(KEK, bytes(range(100, 116)))
    mech, _m = mechanism(M.CLOUDHSM_AES_KEY_WRAP_NO_PAD)
    for private, want in ((False, RV.ATTRIBUTE_VALUE_INVALID), (True, RV.OK)):
        items = [(A.CLASS, ObjectClass.SECRET_KEY), (A.KEY_TYPE, KeyType.AES), (A.ENCRYPT, True),
                 (A.PRIVATE, private), (A.LABEL, f"unwrapped-{private}")]
        t, _keep = template(*items)
        out = U()
        assert live.C_UnwrapKey(U(h), byref(mech), U(kek), wrapped, U(len(wrapped)), t, U(len(items)),
                                byref(out)) == want
        assert _count(live, h, f"unwrapped-{private}") == (1 if want == RV.OK else 0)


class CK_PRF_DATA_PARAM(Structure):
    _fields_ = [("type", c_ulong), ("pValue", c_void_p), ("ulValueLen", c_ulong)]


class CK_SP800_108_KDF_PARAMS(Structure):
    _fields_ = [("prftype", c_ulong), ("ulNumberOfDataParams", c_ulong),
                ("pDataParams", POINTER(CK_PRF_DATA_PARAM))]


def test_derive_key_refuses_private_false(live: Raw) -> None:
    """CKM_SP800_108_COUNTER_KDF (CloudHSM vendor mechanism) with the AWS sample's CMAC layout."""
    h = open_session(live, REF_PIN)
    rv, base = _create(live, h, [(A.CLASS, ObjectClass.SECRET_KEY), (A.KEY_TYPE, KeyType.AES),
                                 (A.VALUE, KEK), (A.DERIVE, True)])
    assert rv == RV.OK
    counter, dkm = (c_ulong * 1)(32), (c_ulong * 2)(1, 16)
    lb, cb = create_string_buffer(b"label", 5), create_string_buffer(b"context", 7)
    layout = [(3, lb, 5), (1, counter, ctypes.sizeof(counter)), (3, cb, 7), (2, dkm, ctypes.sizeof(dkm))]
    arr = (CK_PRF_DATA_PARAM * 4)(*[CK_PRF_DATA_PARAM(t, ctypes.cast(v, c_void_p), n) for t, v, n in layout])
    p = CK_SP800_108_KDF_PARAMS(int(M.AES_CMAC), 4, arr)
    mech = CK_MECHANISM(0x80000001, ctypes.cast(byref(p), c_void_p), ctypes.sizeof(p))
    for private, want in ((False, RV.ATTRIBUTE_VALUE_INVALID), (True, RV.OK)):
        items = [(A.CLASS, ObjectClass.SECRET_KEY), (A.KEY_TYPE, KeyType.AES), (A.VALUE_LEN, 16),
                 (A.PRIVATE, private), (A.LABEL, f"derived-{private}")]
        t, _keep = template(*items)
        out = U()
        assert live.C_DeriveKey(U(h), byref(mech), U(base), t, U(len(items)), byref(out)) == want
        assert _count(live, h, f"derived-{private}") == (1 if want == RV.OK else 0)


def test_certificates_are_never_private(live: Raw) -> None:
    """UG:pkcs11-certificate-storage-attributes: a certificate's CKA_PRIVATE must be false."""
    h = open_session(live, REF_PIN)
    base = [(A.CLASS, ObjectClass.CERTIFICATE), (A.CERTIFICATE_TYPE, 0), (A.TOKEN, True),
            (A.SUBJECT, b"\x30\x00"), (A.VALUE, b"\x30\x03\x02\x01\x01"), (A.LABEL, "private-cert")]
    rv, _ = _create(live, h, base + [(A.PRIVATE, True)])
    assert rv == RV.ATTRIBUTE_VALUE_INVALID
    assert _count(live, h, "private-cert") == 0
    rv, cert = _create(live, h, base)
    assert rv == RV.OK
    assert _bool_attr(live, h, cert, A.PRIVATE) == (RV.OK, 1, 0)
    # C_SetAttributeValue works on certificates, but CKA_PRIVATE is not among the modifiable ones.
    t, _keep = template((A.PRIVATE, True))
    assert live.C_SetAttributeValue(U(h), U(cert), t, U(1)) == RV.ATTRIBUTE_READ_ONLY
    assert _bool_attr(live, h, cert, A.PRIVATE) == (RV.OK, 1, 0)
    assert live.C_DestroyObject(U(h), U(cert)) == RV.OK


# -- CKA_ALWAYS_AUTHENTICATE ------------------------------------------------------------------------

@pytest.mark.parametrize("value", [True, False])
def test_always_authenticate_is_an_unsupported_attribute_at_creation(live: Raw, value: bool) -> None:
    """Not in CloudHSM's attribute tables, so refused as an unsupported type (PKCS#11 2.40 §5.7:
    CKR_ATTRIBUTE_TYPE_INVALID), with either value: no key can demand a context-specific login."""
    h = open_session(live, REF_PIN)
    label = f"always-auth-{value}"
    rv, _, _ = _keypair(live, h, [(A.LABEL, label)], [(A.ALWAYS_AUTHENTICATE, value), (A.LABEL, label)])
    assert rv == RV.ATTRIBUTE_TYPE_INVALID
    rv, _ = _create(live, h, _rsa_private_items() + [(A.ALWAYS_AUTHENTICATE, value), (A.LABEL, label)])
    assert rv == RV.ATTRIBUTE_TYPE_INVALID
    assert _count(live, h, label) == 0


def test_always_authenticate_is_unavailable_on_keys_and_context_login_refused(live: Raw) -> None:
    """The consistent whole: the attribute reads as unsupported (so clients such as libp11 and
    python-pkcs11 treat keys as not needing re-authentication), searching by it is refused like
    any unsupported type, and C_Login(CKU_CONTEXT_SPECIFIC) is refused."""
    h = open_session(live, REF_PIN)
    rv, pub, priv = _keypair(live, h, [], [])
    assert rv == RV.OK
    for key in (pub, priv):
        assert _bool_attr(live, h, key, A.ALWAYS_AUTHENTICATE)[:2] == (RV.ATTRIBUTE_TYPE_INVALID,
                                                                          UNAVAILABLE)
    t, _keep = template((A.ALWAYS_AUTHENTICATE, False))
    assert live.C_FindObjectsInit(U(h), t, U(1)) == RV.ATTRIBUTE_TYPE_INVALID
    pin = REF_PIN.encode()
    assert live.C_Login(U(h), U(int(UserType.CONTEXT_SPECIFIC)), pin, U(len(pin))) == RV.USER_TYPE_INVALID
