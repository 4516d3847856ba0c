"""The one table of PKCS#11 attribute value types, and the codec between a module's raw
attribute bytes (LP64 little-endian CK_ULONG, CK_BBOOL) and typed Python values.

Typed values: bool for CK_BBOOL, int for CK_ULONG, bytes for byte arrays, str for UTF-8
labels, and a list of ints for CKA_ALLOWED_MECHANISMS."""

from __future__ import annotations

import struct
from enum import Enum
from typing import Union

from hsmsim.pkcs11.constants import RV, Attribute
from hsmsim.pkcs11.errors import Pkcs11Error

AttrValue = Union[bool, int, bytes, str, list[int]]
Template = dict[int, AttrValue]


class Kind(Enum):
    BOOL = "bool"
    ULONG = "ulong"
    BYTES = "bytes"
    STRING = "string"
    DATE = "date"
    MECHANISMS = "mechanisms"


A = Attribute
KINDS: dict[int, Kind] = {
    **{a: Kind.BOOL for a in (
        A.TOKEN, A.PRIVATE, A.TRUSTED, A.SENSITIVE, A.ENCRYPT, A.DECRYPT, A.WRAP, A.UNWRAP,
        A.SIGN, A.SIGN_RECOVER, A.VERIFY, A.VERIFY_RECOVER, A.DERIVE, A.EXTRACTABLE, A.LOCAL,
        A.NEVER_EXTRACTABLE, A.ALWAYS_SENSITIVE, A.MODIFIABLE, A.COPYABLE, A.DESTROYABLE,
        A.ALWAYS_AUTHENTICATE, A.WRAP_WITH_TRUSTED)},
    **{a: Kind.ULONG for a in (
        A.CLASS, A.CERTIFICATE_TYPE, A.CERTIFICATE_CATEGORY, A.KEY_TYPE, A.MODULUS_BITS,
        A.VALUE_BITS, A.VALUE_LEN, A.KEY_GEN_MECHANISM)},
    **{a: Kind.BYTES for a in (
        A.APPLICATION, A.VALUE, A.OBJECT_ID, A.ISSUER, A.SERIAL_NUMBER, A.CHECK_VALUE, A.SUBJECT,
        A.ID, A.MODULUS, A.PUBLIC_EXPONENT, A.PRIVATE_EXPONENT, A.PRIME_1, A.PRIME_2,
        A.EXPONENT_1, A.EXPONENT_2, A.COEFFICIENT, A.PUBLIC_KEY_INFO, A.EC_PARAMS, A.EC_POINT)},
    A.LABEL: Kind.STRING,
    A.START_DATE: Kind.DATE,
    A.END_DATE: Kind.DATE,
    A.ALLOWED_MECHANISMS: Kind.MECHANISMS,
}

# Attribute types CloudHSM does not support: absent from every table of UG:pkcs11-attributes-
# interpreting, so a template that carries one is refused with CKR_ATTRIBUTE_TYPE_INVALID (the
# PKCS#11 2.40 code for an attribute the token does not know), whatever its value. KINDS keeps
# their value types so stored objects and node messages still decode.
# FIDELITY: CloudHSM's own code for CKA_ALWAYS_AUTHENTICATE is not documented; with the
# attribute refused, no key demands C_Login(CKU_CONTEXT_SPECIFIC), which hsmsim refuses too.
UNSUPPORTED: frozenset[int] = frozenset({A.ALWAYS_AUTHENTICATE})

ULONG = struct.Struct("<Q")


def decode(attr: int, raw: bytes) -> AttrValue:
    """Raw attribute bytes from a module -> typed value; CKR_ATTRIBUTE_VALUE_INVALID if malformed,
    CKR_ATTRIBUTE_TYPE_INVALID if the attribute is unknown or UNSUPPORTED."""
    kind = KINDS.get(attr)
    if kind is None or attr in UNSUPPORTED:
        raise Pkcs11Error(RV.ATTRIBUTE_TYPE_INVALID, f"attribute 0x{attr:x} is not supported")
    if kind is Kind.BOOL:
        if len(raw) != 1:
            raise Pkcs11Error(RV.ATTRIBUTE_VALUE_INVALID, f"attribute 0x{attr:x} must be a CK_BBOOL")
        return raw != b"\x00"
    if kind is Kind.ULONG:
        if len(raw) != ULONG.size:
            raise Pkcs11Error(RV.ATTRIBUTE_VALUE_INVALID, f"attribute 0x{attr:x} must be a CK_ULONG")
        return int(ULONG.unpack(raw)[0])
    if kind is Kind.STRING:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Pkcs11Error(RV.ATTRIBUTE_VALUE_INVALID, "CKA_LABEL must be UTF-8") from None
    if kind is Kind.DATE:
        if len(raw) not in (0, 8) or not raw.isdigit() and raw:
            raise Pkcs11Error(RV.ATTRIBUTE_VALUE_INVALID, f"attribute 0x{attr:x} must be a CK_DATE")
        return bytes(raw)
    if kind is Kind.MECHANISMS:
        if len(raw) % ULONG.size:
            raise Pkcs11Error(RV.ATTRIBUTE_VALUE_INVALID, "CKA_ALLOWED_MECHANISMS must be CK_ULONGs")
        return [int(v[0]) for v in ULONG.iter_unpack(raw)]
    return bytes(raw)


def encode(attr: int, value: AttrValue) -> bytes:
    """Typed value -> the raw bytes a module writes into the caller's template."""
    kind = KINDS.get(attr, Kind.BYTES)
    if kind is Kind.BOOL:
        return b"\x01" if value else b"\x00"
    if kind is Kind.ULONG:
        assert isinstance(value, int)
        return ULONG.pack(value)
    if kind is Kind.STRING:
        return value.encode("utf-8") if isinstance(value, str) else bytes(value)
    if kind is Kind.MECHANISMS:
        assert isinstance(value, list)
        return b"".join(ULONG.pack(m) for m in value)
    assert isinstance(value, (bytes, bytearray))
    return bytes(value)
