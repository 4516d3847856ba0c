"""The node protocol's codec for PKCS#11 values: templates, mechanism specs and attribute
results <-> msgpack-friendly structures, checking every type on the way in.

A template travels as a map {attribute int: value} with bool/int/bytes/str/list[int] values
typed by hsmsim.pkcs11.attributes.KINDS. A mechanism travels as [mechanism int, param] with
param nil or a map whose "t" names the parameter kind."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

from hsmsim.pkcs11.attributes import KINDS, AttrValue, Kind, Template
from hsmsim.pkcs11.constants import RV
from hsmsim.pkcs11.errors import Pkcs11Error
from hsmsim.pkcs11.values import AttributeResult
from hsmsim.pkcs11.params import (CtrParams, Ecdh1Params, GcmParams, MechanismSpec, OaepParams,
                                  Param, PssParams, RawParams, RsaAesKeyWrapParams)

MAX_ULONG = (1 << 64) - 1


def _bad(msg: str) -> Pkcs11Error:
    return Pkcs11Error(RV.ARGUMENTS_BAD, msg)


# -- templates ---------------------------------------------------------------------------------

def template_to_wire(template: Mapping[int, AttrValue]) -> dict[int, Any]:
    return {int(k): (list(v) if isinstance(v, list) else v) for k, v in template.items()}


def attr_value_from_wire(attr: int, value: Any) -> AttrValue:
    """One typed attribute value; CKR_ATTRIBUTE_TYPE_INVALID for an unknown attribute,
    CKR_ATTRIBUTE_VALUE_INVALID for a value of the wrong type."""
    kind = KINDS.get(attr)
    if kind is None:
        raise Pkcs11Error(RV.ATTRIBUTE_TYPE_INVALID, f"attribute 0x{attr:x} is not supported")
    ok: bool
    if kind is Kind.BOOL:
        ok = isinstance(value, bool)
    elif kind is Kind.ULONG:
        ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_ULONG
    elif kind is Kind.STRING:
        ok = isinstance(value, str)
    elif kind is Kind.MECHANISMS:
        ok = isinstance(value, list) and all(
            isinstance(m, int) and not isinstance(m, bool) and 0 <= m <= MAX_ULONG for m in value)
    else:  # BYTES, DATE
        ok = isinstance(value, bytes)
    if not ok:
        raise Pkcs11Error(RV.ATTRIBUTE_VALUE_INVALID,
                          f"attribute 0x{attr:x} must be a {kind.value}")
    return value  # type: ignore[no-any-return]


def template_from_wire(raw: Any) -> Template:
    if not isinstance(raw, dict):
        raise _bad("template must be a map")
    out: Template = {}
    for k, v in raw.items():
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_ULONG:
            raise _bad("template keys must be attribute numbers")
        out[k] = attr_value_from_wire(k, v)
    return out


def attrs_from_wire(raw: Any) -> list[int]:
    if not isinstance(raw, list) or not all(
            isinstance(a, int) and not isinstance(a, bool) and 0 <= a <= MAX_ULONG for a in raw):
        raise _bad("attrs must be a list of attribute numbers")
    return list(raw)


def results_to_wire(results: Sequence[AttributeResult]) -> list[list[Any]]:
    return [[r.attr, r.value, r.rv] for r in results]


def results_from_wire(raw: Any) -> list[AttributeResult]:
    if not isinstance(raw, list):
        raise _bad("attribute results must be a list")
    out = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 3):
            raise _bad("attribute result must be [attr, value, rv]")
        attr, value, rv = item
        out.append(AttributeResult(int(attr), value, int(rv)))
    return out


# -- mechanisms --------------------------------------------------------------------------------

def _param_to_wire(param: Param) -> dict[str, Any] | None:
    if param is None:
        return None
    if isinstance(param, GcmParams):
        gcm: dict[str, Any] = {"t": "gcm", "iv": param.iv, "aad": param.aad, "tag_bits": param.tag_bits}
        if param.iv_chosen:
            gcm["iv_chosen"] = True  # the daemon's IV for this encryption (GcmParams)
        return gcm
    if isinstance(param, OaepParams):
        return {"t": "oaep", "hash": param.hash_alg, "mgf": param.mgf, "label": param.label}
    if isinstance(param, RsaAesKeyWrapParams):
        o = param.oaep
        return {"t": "rsa_aes", "aes_key_bits": param.aes_key_bits, "hash": o.hash_alg,
                "mgf": o.mgf, "label": o.label}
    if isinstance(param, PssParams):
        return {"t": "pss", "hash": param.hash_alg, "mgf": param.mgf, "salt_len": param.salt_len}
    if isinstance(param, CtrParams):
        return {"t": "ctr", "counter_bits": param.counter_bits, "cb": param.cb}
    if isinstance(param, Ecdh1Params):
        return {"t": "ecdh1", "kdf": param.kdf, "public_data": param.public_data,
                "shared_data": param.shared_data}
    if isinstance(param, RawParams):
        return {"t": "raw", "data": param.data}
    raise TypeError(f"unknown mechanism parameter {type(param).__name__}")


def mech_to_wire(spec: MechanismSpec) -> list[Any]:
    return [int(spec.mechanism), _param_to_wire(spec.param)]


def _field(raw: Mapping[str, Any], name: str, typ: type, default: Any = None) -> Any:
    value = raw.get(name, default)
    if value is None and default is None:
        raise Pkcs11Error(RV.MECHANISM_PARAM_INVALID, f"mechanism parameter needs {name!r}")
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise Pkcs11Error(RV.MECHANISM_PARAM_INVALID,
                          f"mechanism parameter {name!r} must be {typ.__name__}")
    if isinstance(value, int) and not 0 <= value <= MAX_ULONG:
        raise Pkcs11Error(RV.MECHANISM_PARAM_INVALID, f"mechanism parameter {name!r} out of range")
    return value


def _param_from_wire(raw: Any) -> Param:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise Pkcs11Error(RV.MECHANISM_PARAM_INVALID, "mechanism parameter must be a map or nil")
    kind = raw.get("t")
    if kind == "gcm":
        return GcmParams(_field(raw, "iv", bytes, b""), _field(raw, "aad", bytes, b""),
                         _field(raw, "tag_bits", int, 128), _field(raw, "iv_chosen", bool, False))
    if kind == "oaep":
        return OaepParams(_field(raw, "hash", int), _field(raw, "mgf", int),
                          _field(raw, "label", bytes, b""))
    if kind == "rsa_aes":
        return RsaAesKeyWrapParams(_field(raw, "aes_key_bits", int),
                                   OaepParams(_field(raw, "hash", int), _field(raw, "mgf", int),
                                              _field(raw, "label", bytes, b"")))
    if kind == "pss":
        return PssParams(_field(raw, "hash", int), _field(raw, "mgf", int),
                         _field(raw, "salt_len", int))
    if kind == "ctr":
        return CtrParams(_field(raw, "counter_bits", int), _field(raw, "cb", bytes))
    if kind == "ecdh1":
        return Ecdh1Params(_field(raw, "kdf", int), _field(raw, "public_data", bytes),
                           _field(raw, "shared_data", bytes, b""))
    if kind == "raw":
        return RawParams(_field(raw, "data", bytes))
    raise Pkcs11Error(RV.MECHANISM_PARAM_INVALID, f"unknown mechanism parameter kind {kind!r}")


def mech_from_wire(raw: Any) -> MechanismSpec:
    if not (isinstance(raw, list) and len(raw) == 2 and isinstance(raw[0], int)
            and not isinstance(raw[0], bool) and 0 <= raw[0] <= MAX_ULONG):
        raise _bad("mechanism must be [mechanism, param]")
    return MechanismSpec(raw[0], _param_from_wire(raw[1]))


# -- request fields ----------------------------------------------------------------------------

# Builtin names as aliases: Fields' methods are named int/bool/str/bytes.
_int: TypeAlias = int
_bool: TypeAlias = bool
_str: TypeAlias = str
_bytes: TypeAlias = bytes


class Fields:
    """Typed access to a request's fields; a missing or ill-typed field is CKR_ARGUMENTS_BAD
    naming the field."""

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self._raw = raw

    def _get(self, name: _str, optional: _bool) -> Any:
        if name not in self._raw or self._raw[name] is None:
            if optional:
                return None
            raise _bad(f"field {name!r} is required")
        return self._raw[name]

    def int(self, name: _str, default: _int | None = None, *, lo: _int = 0,
            hi: _int = MAX_ULONG) -> _int:
        v = self._get(name, default is not None)
        if v is None:
            return default  # type: ignore[return-value]
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise _bad(f"field {name!r} must be an integer in {lo}..{hi}")
        return v

    def opt_int(self, name: _str) -> _int | None:
        v = self._get(name, True)
        if v is None:
            return None
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_ULONG:
            raise _bad(f"field {name!r} must be a non-negative integer")
        return v

    def handle(self, name: _str = "handle") -> _int:
        return self.int(name, lo=1, hi=(1 << 63) - 1)

    def num(self, name: _str) -> float | None:
        v = self._get(name, True)
        if v is None:
            return None
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 or v != v:
            raise _bad(f"field {name!r} must be a non-negative number")
        return float(v)

    def bool(self, name: _str, default: _bool | None = None) -> _bool:
        v = self._get(name, default is not None)
        if v is None:
            return bool(default)
        if not isinstance(v, bool):
            raise _bad(f"field {name!r} must be a boolean")
        return v

    def opt_bool(self, name: _str) -> _bool | None:
        v = self._get(name, True)
        if v is not None and not isinstance(v, bool):
            raise _bad(f"field {name!r} must be a boolean")
        return v

    def bytes(self, name: _str) -> _bytes:
        v = self._get(name, False)
        if not isinstance(v, bytes):
            raise _bad(f"field {name!r} must be binary")
        return v

    def opt_str(self, name: _str) -> _str | None:
        v = self._get(name, True)
        if v is not None and not isinstance(v, str):
            raise _bad(f"field {name!r} must be a string")
        return v

    def str(self, name: _str) -> _str:
        v = self._get(name, False)
        if not isinstance(v, str):
            raise _bad(f"field {name!r} must be a string")
        return v

    def template(self, name: _str = "template") -> Template:
        return template_from_wire(self._get(name, False))

    def mech(self, name: _str = "mech") -> MechanismSpec:
        return mech_from_wire(self._get(name, False))

    def attrs(self, name: _str = "attrs") -> list[_int]:
        return attrs_from_wire(self._get(name, False))

    def raw(self, name: _str) -> Any:
        return self._raw.get(name)
