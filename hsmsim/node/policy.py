"""Attribute rules of the node: defaults per object class (CloudHSM's tables), which
attributes are read-only, modifiable, sensitive or material-derived, which templates a key
generation needs, and which SoftHSM2 attributes the node sets on the backing object.

Pure functions over templates; no I/O."""

from __future__ import annotations

import hashlib

from hsmsim.pkcs11.attributes import UNSUPPORTED, AttrValue, Template
from hsmsim.pkcs11.constants import RV, Attribute as A, KeyType, Mechanism as M, ObjectClass
from hsmsim.pkcs11.errors import Pkcs11Error

KEY_CLASSES = (ObjectClass.SECRET_KEY, ObjectClass.PUBLIC_KEY, ObjectClass.PRIVATE_KEY)
ASYMMETRIC_CLASSES = (ObjectClass.PUBLIC_KEY, ObjectClass.PRIVATE_KEY)
SUPPORTED_CLASSES = (ObjectClass.DATA, ObjectClass.CERTIFICATE, *KEY_CLASSES)
SUPPORTED_KEY_TYPES = {
    ObjectClass.SECRET_KEY: (KeyType.AES, KeyType.GENERIC_SECRET, KeyType.DES3),
    ObjectClass.PUBLIC_KEY: (KeyType.RSA, KeyType.EC),
    ObjectClass.PRIVATE_KEY: (KeyType.RSA, KeyType.EC),
}
USAGE = (A.ENCRYPT, A.DECRYPT, A.SIGN, A.VERIFY, A.WRAP, A.UNWRAP, A.DERIVE)

# Attributes the node sets and users may not give (PKCS#11 "read-only"/computed).
# CKA_CHECK_VALUE (read-only in CloudHSM's tables, reference §1.6) is computed too, but a template
# may carry it as SoftHSM2 and PKCS#11 allow: see check_value_given.
READ_ONLY = frozenset({A.LOCAL, A.ALWAYS_SENSITIVE, A.NEVER_EXTRACTABLE, A.KEY_GEN_MECHANISM})
# Attributes CloudHSM accepts only at their default value (UG:pkcs11-attributes-interpreting,
# footnote 1: "partially supported by the firmware and must be explicitly set only to the default
# value"): CKA_PRIVATE is true on every key class, public keys included (the SDK 5 tables mark
# it for EC/RSA public keys too; pkcs11-tool's CKA_PRIVATE=false public template fails on
# CloudHSM, OpenSC#2747), and false on certificates (UG:pkcs11-certificate-storage-attributes).
# Another value gives CKR_ATTRIBUTE_VALUE_INVALID, as CloudHSM answers such templates
# (py-hsm#7, vaultplugin-hsmpki#25). FIDELITY: the code is community-observed, not documented.
FIXED_VALUES: dict[int, dict[int, AttrValue]] = {
    ObjectClass.SECRET_KEY: {A.PRIVATE: True},
    ObjectClass.PUBLIC_KEY: {A.PRIVATE: True},
    ObjectClass.PRIVATE_KEY: {A.PRIVATE: True},
    ObjectClass.CERTIFICATE: {A.PRIVATE: False},
}
# FIDELITY: CloudHSM's modifiable list (UG:modify-attr); CKA_TOKEN may change only false->true,
# CKA_SENSITIVE only false->true, CKA_EXTRACTABLE only true->false, CKA_WRAP_WITH_TRUSTED only
# false->true (PKCS#11 one-way rules). CKA_ID is also accepted (PKCS#11 allows it; tools set it).
MODIFIABLE = frozenset({A.LABEL, A.ID, A.TOKEN, A.ENCRYPT, A.DECRYPT, A.SIGN, A.VERIFY, A.WRAP,
                        A.UNWRAP, A.DERIVE, A.SENSITIVE, A.EXTRACTABLE, A.TRUSTED,
                        A.WRAP_WITH_TRUSTED, A.START_DATE, A.END_DATE, A.SUBJECT,
                        A.APPLICATION, A.MODIFIABLE, A.DESTROYABLE})

# Secret material, per class: never returned unless the key is non-sensitive and extractable.
SECRET_ATTRS = {
    ObjectClass.SECRET_KEY: frozenset({A.VALUE}),
    ObjectClass.PRIVATE_KEY: frozenset({A.VALUE, A.PRIVATE_EXPONENT, A.PRIME_1, A.PRIME_2,
                                        A.EXPONENT_1, A.EXPONENT_2, A.COEFFICIENT}),
}
# Material given in a create template that goes to SoftHSM2 and never into the index.
MATERIAL_ATTRS = frozenset({A.VALUE, A.PRIVATE_EXPONENT, A.PRIME_1, A.PRIME_2, A.EXPONENT_1,
                            A.EXPONENT_2, A.COEFFICIENT})
# Public material kept in the index (copied from SoftHSM2 after creation).
PUBLIC_MATERIAL = {
    (ObjectClass.PUBLIC_KEY, KeyType.RSA): (A.MODULUS, A.PUBLIC_EXPONENT),
    (ObjectClass.PRIVATE_KEY, KeyType.RSA): (A.MODULUS, A.PUBLIC_EXPONENT),
    (ObjectClass.PUBLIC_KEY, KeyType.EC): (A.EC_PARAMS, A.EC_POINT),
    (ObjectClass.PRIVATE_KEY, KeyType.EC): (A.EC_PARAMS,),
}
# CKA_VALUE_LEN is never read back from SoftHSM2: 2.6.1 leaves it 0 on unwrapped keys. The
# node sets it from the material length it knows at every creation path.
ULONG_MATERIAL: frozenset[int] = frozenset()

AES_SIZES = (16, 24, 32)
DES3_SIZE = 24  # three-key 3DES only (CloudHSM: "3DES keys are 192 bits")
GENERIC_SECRET_RANGE = (1, 800)
RSA_BITS = tuple(range(2048, 4096 + 1, 256))

# DER OIDs of the supported curves (CKA_EC_PARAMS as namedCurve).
CURVES: dict[bytes, str] = {
    bytes.fromhex("06052b81040021"): "secp224r1",
    bytes.fromhex("06082a8648ce3d030107"): "secp256r1",
    bytes.fromhex("06052b81040022"): "secp384r1",
    bytes.fromhex("06052b81040023"): "secp521r1",
    bytes.fromhex("06052b8104000a"): "secp256k1",
}


def private_key_material(der: bytes) -> tuple[int, Template]:
    """Key type and SoftHSM2 material attributes of a PKCS#8 (or PKCS#1) private key."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_der_private_key

    def b(i: int, size: int = 0) -> bytes:
        return i.to_bytes(max(size, (i.bit_length() + 7) // 8, 1), "big")
    try:
        key = load_der_private_key(der, password=None)
    except (ValueError, TypeError):
        raise Pkcs11Error(RV.WRAPPED_KEY_INVALID, "unwrapped data is not a private key") from None
    if isinstance(key, rsa.RSAPrivateKey):
        n = key.private_numbers()
        return KeyType.RSA, {A.MODULUS: b(n.public_numbers.n), A.PUBLIC_EXPONENT: b(n.public_numbers.e),
                             A.PRIVATE_EXPONENT: b(n.d), A.PRIME_1: b(n.p), A.PRIME_2: b(n.q),
                             A.EXPONENT_1: b(n.dmp1), A.EXPONENT_2: b(n.dmq1),
                             A.COEFFICIENT: b(n.iqmp)}
    if isinstance(key, ec.EllipticCurvePrivateKey):
        oid = {name: o for o, name in CURVES.items()}.get(key.curve.name)
        if oid is None:
            raise Pkcs11Error(RV.CURVE_NOT_SUPPORTED, "unsupported curve in the wrapped key")
        size = (key.curve.key_size + 7) // 8
        return KeyType.EC, {A.EC_PARAMS: oid, A.VALUE: b(key.private_numbers().private_value, size)}
    raise Pkcs11Error(RV.WRAPPED_KEY_INVALID, "unwrapped key type is not supported")


def _bool(t: Template, a: int, default: bool) -> bool:
    v = t.get(a, default)
    if not isinstance(v, bool):
        raise Pkcs11Error(RV.ATTRIBUTE_VALUE_INVALID, f"attribute 0x{a:x} must be a CK_BBOOL")
    return v


def common_defaults(cls: int, token: bool) -> Template:
    """CloudHSM defaults (UG:pkcs11-attributes): token false, private true (on public keys too;
    false on certificates), modifiable true, destroyable true, copyable true, label/id empty.
    CKA_ALWAYS_AUTHENTICATE is UNSUPPORTED, so private keys do not have it."""
    d: Template = {A.CLASS: cls, A.TOKEN: token, A.PRIVATE: cls != ObjectClass.CERTIFICATE,
                   A.MODIFIABLE: True, A.DESTROYABLE: True, A.COPYABLE: True, A.LABEL: "", }
    if cls in KEY_CLASSES:
        d.update({A.ID: b"", A.DERIVE: False, A.LOCAL: False, A.START_DATE: b"",
                  A.END_DATE: b"", A.KEY_GEN_MECHANISM: (1 << 64) - 1})
    if cls == ObjectClass.SECRET_KEY:
        d.update({A.SENSITIVE: True, A.EXTRACTABLE: True, A.ENCRYPT: False, A.DECRYPT: False,
                  A.SIGN: False, A.VERIFY: False, A.WRAP: False, A.UNWRAP: False,
                  A.TRUSTED: False, A.WRAP_WITH_TRUSTED: False})
    elif cls == ObjectClass.PRIVATE_KEY:
        d.update({A.SENSITIVE: True, A.EXTRACTABLE: True, A.DECRYPT: False, A.SIGN: False,
                  A.UNWRAP: False, A.SUBJECT: b"", A.WRAP_WITH_TRUSTED: False})
    elif cls == ObjectClass.PUBLIC_KEY:
        d.update({A.ENCRYPT: False, A.VERIFY: False, A.WRAP: False, A.TRUSTED: False,
                  A.SUBJECT: b""})
    elif cls == ObjectClass.CERTIFICATE:
        # UG:pkcs11-certificate-storage-attributes lists these (ISSUER, SERIAL_NUMBER, the dates
        # and PUBLIC_KEY_INFO empty by default); CKA_CHECK_VALUE is derived (certificate_check_value).
        d.update({A.CERTIFICATE_TYPE: 0, A.TRUSTED: False, A.SUBJECT: b"", A.ID: b"",
                  A.ISSUER: b"", A.SERIAL_NUMBER: b"", A.CERTIFICATE_CATEGORY: 0,
                  A.START_DATE: b"", A.END_DATE: b"", A.PUBLIC_KEY_INFO: b""})
    elif cls == ObjectClass.DATA:
        d.update({A.APPLICATION: b"", A.OBJECT_ID: b""})
    return d


def check_user_template(t: Template, *, creating: bool) -> None:
    """Reject attributes a user may never give: types CloudHSM does not support
    (CKR_ATTRIBUTE_TYPE_INVALID) and read-only ones (CKR_ATTRIBUTE_READ_ONLY)."""
    for a in t:
        if a in UNSUPPORTED:
            raise Pkcs11Error(RV.ATTRIBUTE_TYPE_INVALID, f"attribute 0x{a:x} is not supported")
        if a in READ_ONLY:
            raise Pkcs11Error(RV.ATTRIBUTE_READ_ONLY, f"attribute 0x{a:x} is read-only")


def check_fixed_values(cls: int, t: Template) -> None:
    """Reject a template that sets an attribute of FIXED_VALUES to anything but its default."""
    for a, want in FIXED_VALUES.get(cls, {}).items():
        if a in t and t[a] != want:
            raise Pkcs11Error(RV.ATTRIBUTE_VALUE_INVALID,
                              f"attribute 0x{a:x} may only be {want!r} on this object class")


def build_attrs(cls: int, key_type: int | None, template: Template, *, local: bool,
                gen_mech: int | None) -> Template:
    """The full user-visible attribute set of a new object: defaults, then the template
    (material removed), then the computed attributes. Every creating call (generate, create,
    unwrap, derive) comes through here, so FIXED_VALUES are checked here."""
    check_fixed_values(cls, template)
    check_value_given(cls, template, generated=local)
    token = _bool(template, A.TOKEN, False)
    attrs = common_defaults(cls, token)
    for a, v in template.items():
        if a not in MATERIAL_ATTRS:
            attrs[a] = v
    attrs[A.CLASS] = cls
    if key_type is not None:
        attrs[A.KEY_TYPE] = key_type
    if cls == ObjectClass.SECRET_KEY and key_type == KeyType.DES3:
        attrs.pop(A.VALUE_LEN, None)  # see value_len_attr
    if cls in KEY_CLASSES:
        attrs[A.LOCAL] = local
        if gen_mech is not None:
            attrs[A.KEY_GEN_MECHANISM] = gen_mech
    if cls in (ObjectClass.SECRET_KEY, ObjectClass.PRIVATE_KEY):
        sensitive = _bool(attrs, A.SENSITIVE, True)
        extractable = _bool(attrs, A.EXTRACTABLE, True)
        attrs[A.ALWAYS_SENSITIVE] = sensitive if local else False
        attrs[A.NEVER_EXTRACTABLE] = (not extractable) if local else False
    for a in USAGE + (A.TOKEN, A.PRIVATE, A.MODIFIABLE, A.DESTROYABLE, A.COPYABLE):
        if a in attrs:
            _bool(attrs, a, False)
    return attrs


def check_value_given(cls: int, template: Template, *, generated: bool) -> None:
    """CKA_CHECK_VALUE in a creating template. The node computes it for every secret key
    (SoftHSM2 does, from the key, on the node that holds it: keystore reads it into the index).
    As SoftHSM2 2.6 and PKCS#11 2.40: a generated key's template may carry it only empty (no
    check value; any other value is CKR_ATTRIBUTE_VALUE_INVALID); a created, unwrapped or derived
    key's must be empty or equal the key's (checked after SoftHSM2 computed it, in keystore).
    Other classes: read-only (certificates: CloudHSM derives it; keys: PKCS#11 defines none).
    FIDELITY: CloudHSM only marks it read-only (reference §1.6); its codes for a template that
    carries it are not documented, so SoftHSM2's are used."""
    if A.CHECK_VALUE not in template:
        return
    if cls != ObjectClass.SECRET_KEY:
        raise Pkcs11Error(RV.ATTRIBUTE_READ_ONLY, "CKA_CHECK_VALUE is read-only")
    v = template[A.CHECK_VALUE]
    if not isinstance(v, bytes) or (generated and v):
        raise Pkcs11Error(RV.ATTRIBUTE_VALUE_INVALID, "CKA_CHECK_VALUE of a generated key may "
                          "only be empty" if generated else "CKA_CHECK_VALUE must be bytes")


def certificate_check_value(value: bytes) -> bytes:
    """A certificate's CKA_CHECK_VALUE: CloudHSM sets it from CKA_VALUE (UG:pkcs11-certificate-
    storage-attributes); PKCS#11 2.40 §4.6.3: the first 3 bytes of the SHA-1 of CKA_VALUE."""
    return hashlib.sha1(value).digest()[:3]


def value_len_attr(kt: int, length: int) -> Template:
    """The CKA_VALUE_LEN a secret key answers: none on a DES3 key, whose length its type fixes
    (PKCS#11 2.40 defines no CKA_VALUE_LEN for DES3 keys: CKR_ATTRIBUTE_TYPE_INVALID on read,
    as SoftHSM2)."""
    return {} if kt == KeyType.DES3 else {A.VALUE_LEN: length}


def is_sensitive_value(attrs: Template) -> bool:
    """True when the key's secret material may not be read out."""
    return bool(attrs.get(A.SENSITIVE, True)) or not bool(attrs.get(A.EXTRACTABLE, True))


def softhsm_template(cls: int, key_type: int | None, handle: int, token: bool,
                     extra: Template | None = None) -> Template:
    """Attributes of the backing SoftHSM2 object: the node's tag as CKA_ID and CKA_LABEL,
    every usage the key type allows (the node enforces the user's flags), always sensitive
    and extractable (so the node can mask it), private."""
    tag = f"hsmsim:{handle}"
    if cls not in KEY_CLASSES:
        # Certificates and data objects are backed by a private CKO_DATA object holding
        # CKA_VALUE; every other attribute lives in the index.
        return {A.CLASS: ObjectClass.DATA, A.TOKEN: token, A.PRIVATE: True, A.LABEL: tag,
                **(extra or {})}
    t: Template = {A.CLASS: cls, A.TOKEN: token, A.PRIVATE: True, A.LABEL: tag}
    if key_type is not None:
        t[A.KEY_TYPE] = key_type
    if cls == ObjectClass.SECRET_KEY:
        t.update({A.SENSITIVE: True, A.EXTRACTABLE: True, A.SIGN: True, A.VERIFY: True,
                  A.DERIVE: True})
        if key_type in (KeyType.AES, KeyType.DES3):
            t.update({A.ENCRYPT: True, A.DECRYPT: True, A.WRAP: True, A.UNWRAP: True})
    elif cls == ObjectClass.PRIVATE_KEY:
        t.update({A.SENSITIVE: True, A.EXTRACTABLE: True, A.SIGN: True})
        if key_type == KeyType.RSA:
            t.update({A.DECRYPT: True, A.UNWRAP: True})
        else:
            t[A.DERIVE] = True
    elif cls == ObjectClass.PUBLIC_KEY:
        t[A.VERIFY] = True
        if key_type == KeyType.RSA:
            t.update({A.ENCRYPT: True, A.WRAP: True})
    if extra:
        t.update(extra)
    if key_type == KeyType.DES3:
        t.pop(A.VALUE_LEN, None)  # SoftHSM2's DES3 objects have no CKA_VALUE_LEN
    return t


def gen_key_type(mech: int, template: Template) -> tuple[int, int]:
    """Key type and length in bytes of a C_GenerateKey template."""
    if mech == M.AES_KEY_GEN:
        kt = KeyType.AES
    elif mech == M.GENERIC_SECRET_KEY_GEN:
        kt = KeyType.GENERIC_SECRET
    elif mech == M.DES3_KEY_GEN:
        kt = KeyType.DES3
    else:
        raise Pkcs11Error(RV.MECHANISM_INVALID, f"mechanism 0x{mech:x} does not generate keys")
    given = template.get(A.KEY_TYPE, kt)
    if given != kt:
        raise Pkcs11Error(RV.TEMPLATE_INCONSISTENT, "CKA_KEY_TYPE does not match the mechanism")
    if template.get(A.CLASS, ObjectClass.SECRET_KEY) != ObjectClass.SECRET_KEY:
        raise Pkcs11Error(RV.TEMPLATE_INCONSISTENT, "CKA_CLASS must be CKO_SECRET_KEY")
    # A DES3 key's length is fixed by its type (PKCS#11 gives it no CKA_VALUE_LEN to set).
    length = template.get(A.VALUE_LEN, DES3_SIZE if kt == KeyType.DES3 else None)
    if not isinstance(length, int) or isinstance(length, bool):
        raise Pkcs11Error(RV.TEMPLATE_INCOMPLETE, "CKA_VALUE_LEN is required")
    check_generated_len(kt, length)
    return kt, length


def check_generated_len(kt: int, length: int) -> None:
    """C_GenerateKey's size check: an AES length PKCS#11 does not define (not 16, 24 or 32) is
    a bad CKA_VALUE_LEN, CKR_ATTRIBUTE_VALUE_INVALID (as SoftHSM2, and as CloudHSM answers
    key-generation templates it refuses, reference §1.6); CloudHSM's own limits (generic
    secret 1..800 bytes, DES3 three-key only) stay CKR_KEY_SIZE_RANGE."""
    if kt == KeyType.AES and length not in AES_SIZES:
        raise Pkcs11Error(RV.ATTRIBUTE_VALUE_INVALID, "AES keys are 16, 24 or 32 bytes")
    check_secret_len(kt, length)


def check_secret_len(kt: int, length: int) -> None:
    if kt == KeyType.AES and length not in AES_SIZES:
        raise Pkcs11Error(RV.KEY_SIZE_RANGE, "AES keys are 16, 24 or 32 bytes")
    if kt == KeyType.DES3 and length != DES3_SIZE:
        raise Pkcs11Error(RV.KEY_SIZE_RANGE, "DES3 keys are 24 bytes (three-key 3DES)")
    if kt == KeyType.GENERIC_SECRET and not (
            GENERIC_SECRET_RANGE[0] <= length <= GENERIC_SECRET_RANGE[1]):
        raise Pkcs11Error(RV.KEY_SIZE_RANGE, "generic secret keys are 1 to 800 bytes")


def merge(base: Template, extra: Template) -> Template:
    out = dict(base)
    out.update(extra)
    return out


def value(attrs: Template, a: int, default: AttrValue) -> AttrValue:
    return attrs.get(a, default)
