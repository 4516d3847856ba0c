"""Attribute templates as CloudHSM treats them (reference §1.6): decoding from the wire, the
defaults it assigns, read-only attributes, mandatory ones, and the RSA private-template quirk."""

from __future__ import annotations

from hsmsim.gateway.config import GatewayConfig
from hsmsim.gateway.protocol import Reader
from hsmsim.pkcs11 import attributes
from hsmsim.pkcs11.attributes import Template
from hsmsim.pkcs11.constants import RV, Attribute as A, KeyType, ObjectClass
from hsmsim.pkcs11.errors import Pkcs11Error

# Set only by the HSM (UG:pkcs11-v3-attributes-interpreting, "R").
READ_ONLY = frozenset({A.LOCAL, A.ALWAYS_SENSITIVE, A.NEVER_EXTRACTABLE, A.KEY_GEN_MECHANISM})

_USAGE_BY_CLASS: dict[int, tuple[int, ...]] = {
    ObjectClass.PUBLIC_KEY: (A.ENCRYPT, A.VERIFY, A.WRAP, A.DERIVE),
    ObjectClass.PRIVATE_KEY: (A.DECRYPT, A.SIGN, A.UNWRAP, A.DERIVE),
    ObjectClass.SECRET_KEY: (A.ENCRYPT, A.DECRYPT, A.WRAP, A.UNWRAP, A.DERIVE),
}
PRIVATE_USAGE = (A.DECRYPT, A.SIGN, A.UNWRAP, A.DERIVE)


def _read_template(r: Reader, skip_unknown: bool) -> tuple[Template, bool]:
    """The one template decoder: (template, whether an attribute type unknown to hsmsim was
    skipped). Unknown types are skipped only when `skip_unknown`; otherwise, as every other bad
    attribute, `attributes.decode` refuses them."""
    out: Template = {}
    unknown = False
    for _ in range(r.count()):
        attr = r.u64()
        raw = r.bytes()
        if skip_unknown and attr not in attributes.KINDS:
            unknown = True
            continue
        out[attr] = attributes.decode(attr, raw)
    return out, unknown


def decode_template(r: Reader) -> Template:
    """FIDELITY: attributes whose values are attribute arrays (CKA_WRAP_TEMPLATE,
    CKA_UNWRAP_TEMPLATE, CKA_DERIVE_TEMPLATE) are not carried: CKR_ATTRIBUTE_TYPE_INVALID."""
    return _read_template(r, skip_unknown=False)[0]


def decode_find_template(r: Reader) -> Template | None:
    """A C_FindObjectsInit template; None when it names an attribute type hsmsim does not know
    (not in PKCS#11 2.40 as CloudHSM uses it): no object has that attribute, so the search finds
    nothing and C_FindObjectsInit succeeds, as SoftHSM2 answers (PKCS#11 2.40 allows this or
    CKR_ATTRIBUTE_TYPE_INVALID; CloudHSM documents neither). Types CloudHSM does not support
    (attributes.UNSUPPORTED) are still refused, as in every template."""
    out, unknown = _read_template(r, skip_unknown=True)
    return None if unknown else out


def _check_read_only(t: Template) -> None:
    for attr in t:
        if attr in READ_ONLY:
            raise Pkcs11Error(RV.ATTRIBUTE_READ_ONLY, f"attribute 0x{attr:x} is read-only")


def with_defaults(t: Template, obj_class: int) -> Template:
    """CloudHSM's defaults made explicit (so every node applies the same): TOKEN false,
    SENSITIVE and EXTRACTABLE true for private/secret keys, usage flags false except SIGN/VERIFY
    true for secret keys (the SDK 3 GenerateKey table)."""
    _check_read_only(t)
    out = dict(t)
    out.setdefault(A.TOKEN, False)
    if obj_class in (ObjectClass.PRIVATE_KEY, ObjectClass.SECRET_KEY):
        out.setdefault(A.SENSITIVE, True)
        out.setdefault(A.EXTRACTABLE, True)
    for attr in _USAGE_BY_CLASS.get(obj_class, ()):
        out.setdefault(attr, False)
    if obj_class == ObjectClass.SECRET_KEY:
        out.setdefault(A.SIGN, True)
        out.setdefault(A.VERIFY, True)
    return out


def _ulong(t: Template, attr: int) -> int | None:
    v = t.get(attr)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def check_secret_template(t: Template, key_type: int) -> None:
    """Mandatory CKA_VALUE_LEN and CloudHSM key sizes (§1.5) for C_GenerateKey."""
    length = _ulong(t, A.VALUE_LEN)
    if key_type == KeyType.DES3:
        if length not in (None, 24):
            raise Pkcs11Error(RV.KEY_SIZE_RANGE, "3DES keys are 24 bytes")
        return
    if length is None:
        raise Pkcs11Error(RV.TEMPLATE_INCOMPLETE, "CKA_VALUE_LEN is required")
    if key_type == KeyType.AES and length not in (16, 24, 32):
        # A length PKCS#11 does not define for AES: a bad CKA_VALUE_LEN (as SoftHSM2, and as
        # CloudHSM answers key-generation templates it refuses, §1.6); node policy agrees.
        raise Pkcs11Error(RV.ATTRIBUTE_VALUE_INVALID, "AES keys are 16, 24 or 32 bytes")
    if key_type == KeyType.GENERIC_SECRET and not 1 <= length <= 800:
        raise Pkcs11Error(RV.KEY_SIZE_RANGE, "generic secret keys are 1 to 800 bytes")


def key_pair_templates(config: GatewayConfig, key_type: int, public: Template,
                       private: Template) -> tuple[Template, Template]:
    """Validates and completes C_GenerateKeyPair templates."""
    private = dict(private)
    if key_type == KeyType.RSA:
        bits = _ulong(public, A.MODULUS_BITS)
        if bits is None or A.PUBLIC_EXPONENT not in public:
            raise Pkcs11Error(RV.TEMPLATE_INCOMPLETE,
                              "CKA_MODULUS_BITS and CKA_PUBLIC_EXPONENT are required in the public template")
        if not (2048 <= bits <= 4096 and bits % 256 == 0):
            raise Pkcs11Error(RV.KEY_SIZE_RANGE, "RSA keys are 2048 to 4096 bits in steps of 256")
        misplaced = [a for a in (A.MODULUS_BITS, A.PUBLIC_EXPONENT) if a in private]
        if misplaced:
            if not config.quirk_private_template_usage_false:
                raise Pkcs11Error(RV.TEMPLATE_INCONSISTENT,
                                  "CKA_MODULUS_BITS/CKA_PUBLIC_EXPONENT belong in the public template")
            # Reproduced CloudHSM quirk (UG:ki-pkcs11-sdk item 6): instead of
            # CKR_TEMPLATE_INCONSISTENT CloudHSM makes a private key with every usage flag false.
            for a in misplaced:
                del private[a]
            for a in PRIVATE_USAGE:
                private[a] = False
    elif key_type == KeyType.EC:
        if A.EC_PARAMS not in public:
            raise Pkcs11Error(RV.TEMPLATE_INCOMPLETE, "CKA_EC_PARAMS is required in the public template")
    return (with_defaults(public, ObjectClass.PUBLIC_KEY), with_defaults(private, ObjectClass.PRIVATE_KEY))
