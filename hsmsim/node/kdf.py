"""Key derivation functions the node computes itself: ANSI X9.63 (RFC 8418 §2.1) for
CKM_ECDH1_DERIVE, and CloudHSM's NIST SP 800-108 counter-mode KDF (CKM_SP800_108_COUNTER_KDF,
HMAC-SHA* or AES-CMAC PRF) with the decoding of its vendor parameter list.

Pure functions over bytes; no I/O. Callers zeroise nothing they did not allocate: the key
material passed in stays the caller's."""

from __future__ import annotations

import hashlib
import hmac
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.cmac import CMAC

from hsmsim.pkcs11.constants import RV, Mechanism as M
from hsmsim.pkcs11.errors import Pkcs11Error
from hsmsim.pkcs11.mechanisms import HASH_OF_HMAC

MAX_OUTPUT = 800  # the largest secret key the node creates (generic secret)


def _param_error(msg: str) -> Pkcs11Error:
    return Pkcs11Error(RV.MECHANISM_PARAM_INVALID, msg)


def ecdh_shared(private_der: bytes, public_data: bytes) -> bytes:
    """ECDH shared secret Z (the x coordinate) of a PKCS#8 EC private key and a peer point,
    given raw (X9.62) or DER-wrapped in an OCTET STRING, as PKCS#11 allows both."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_der_private_key
    key = load_der_private_key(private_der, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise Pkcs11Error(RV.KEY_TYPE_INCONSISTENT, "ECDH needs an EC private key")
    size = (key.curve.key_size + 7) // 8
    point = public_data
    if len(point) not in (size + 1, 2 * size + 1) and len(point) > 2 and point[0] == 0x04:
        # DER OCTET STRING: 04 len point, or 04 81 len point.
        hdr = 3 if point[1] == 0x81 else 2
        if len(point) >= hdr and (point[hdr - 1] == len(point) - hdr):
            point = point[hdr:]
    try:
        peer = ec.EllipticCurvePublicKey.from_encoded_point(key.curve, point)
        return key.exchange(ec.ECDH(), peer)
    except ValueError:
        raise Pkcs11Error(RV.MECHANISM_PARAM_INVALID, "ECDH public data is not a point on "
                          "the key's curve") from None


def x963(hash_name: str, z: bytes, shared_info: bytes, length: int) -> bytes:
    """ANSI X9.63 KDF: Hash(Z || Counter32(i) || SharedInfo) for i = 1, 2, ..., truncated."""
    out = bytearray()
    i = 1
    while len(out) < length:
        out += hashlib.new(hash_name, z + struct.pack(">I", i) + shared_info).digest()
        i += 1
    return bytes(out[:length])


# CK_PRF_DATA_PARAM types of CloudHSM's vendor header (aws-cloudhsm-pkcs11-examples,
# include/pkcs11/v2.40/cloudhsm_pkcs11_vendor_defs.h and src/derivation/aes_cmac_kdf.c).
ITERATION_VARIABLE, DKM_LENGTH, BYTE_ARRAY = 1, 2, 3
# The 2017 (Cavium) header's types: a fixed layout Counter || Label || 0x00 || Context || L.
LEGACY_COUNTER_FORMAT, LEGACY_LABEL, LEGACY_CONTEXT, LEGACY_DKM_FORMAT, LEGACY_BYTE_ARRAY = (
    4, 5, 6, 7, 8)
DKM_SUM_OF_KEYS, DKM_SUM_OF_SEGMENTS = 1, 2
COUNTER_WIDTHS = (16, 32)  # "Only supported counter widths are 16 and 32" (CloudHSM samples)
DKM_WIDTHS = (8, 16, 32, 64)  # "Only supported DKM widths are 8, 16, 32 and 64"

PRFS = frozenset({*HASH_OF_HMAC, M.AES_CMAC})  # HMAC-SHA* (hashes: the mechanism table) or AES-CMAC


@dataclass(frozen=True)
class Segment:
    """One part of the PRF input: fixed bytes, the counter, or the output length L."""

    kind: str  # "bytes", "counter" or "dkm"
    data: bytes = b""
    width_bits: int = 0


@dataclass(frozen=True)
class CounterKdf:
    """A decoded CK_SP800_108_KDF_PARAMS."""

    prf: int
    segments: tuple[Segment, ...]


def _ulongs(value: bytes, count: int) -> tuple[int, ...]:
    """CK_ULONG fields of a C struct, as the module copies it byte for byte (host order; the
    module runs on the daemon's host). 8-byte CK_ULONGs, or 4-byte ones (32-bit hosts)."""
    for size in (8, 4):
        if len(value) == size * count:
            return struct.unpack(("<" if sys.byteorder == "little" else ">")
                                 + ("Q" if size == 8 else "I") * count, value)
    raise _param_error("SP 800-108 format parameter has the wrong size")


def _counter(value: bytes) -> Segment:
    (width,) = _ulongs(value, 1)
    if width not in COUNTER_WIDTHS:
        raise _param_error("SP 800-108 counter width must be 16 or 32 bits")
    return Segment("counter", width_bits=width)


def _dkm(value: bytes) -> Segment:
    method, width = _ulongs(value, 2)
    if method not in (DKM_SUM_OF_KEYS, DKM_SUM_OF_SEGMENTS) or width not in DKM_WIDTHS:
        raise _param_error("SP 800-108 DKM length format is invalid")
    return Segment("dkm", width_bits=width)


def parse_counter_kdf(raw: bytes) -> CounterKdf:
    """The gateway's flat form (docs/gateway-protocol.md): u64 prf, u32 n, n x (u64 type,
    u32 length, value), little-endian."""
    try:
        prf, n = struct.unpack_from("<QI", raw, 0)
        off = 12
        params: list[tuple[int, bytes]] = []
        for _ in range(n):
            t, ln = struct.unpack_from("<QI", raw, off)
            off += 12
            if off + ln > len(raw):
                raise _param_error("truncated SP 800-108 parameter")
            params.append((t, raw[off:off + ln]))
            off += ln
    except struct.error:
        raise _param_error("truncated SP 800-108 parameter") from None
    if off != len(raw):
        raise _param_error("trailing bytes in SP 800-108 parameter")
    if prf not in PRFS:
        raise _param_error(f"unsupported SP 800-108 PRF 0x{prf:x}")
    types = {t for t, _ in params}
    if types & {LEGACY_COUNTER_FORMAT, LEGACY_LABEL, LEGACY_CONTEXT, LEGACY_DKM_FORMAT}:
        segments = _legacy(params)
    else:
        segments = []
        for t, v in params:
            if t == ITERATION_VARIABLE:
                segments.append(_counter(v))
            elif t == DKM_LENGTH:
                segments.append(_dkm(v))
            elif t in (BYTE_ARRAY, LEGACY_BYTE_ARRAY):
                segments.append(Segment("bytes", v))
            else:
                raise _param_error(f"unknown SP 800-108 data parameter type {t}")
    if sum(s.kind == "counter" for s in segments) != 1 or \
            sum(s.kind == "dkm" for s in segments) > 1:
        raise _param_error("SP 800-108 needs exactly one counter and at most one DKM length")
    return CounterKdf(int(prf), tuple(segments))


def _legacy(params: list[tuple[int, bytes]]) -> list[Segment]:
    got: dict[int, bytes] = {}
    for t, v in params:
        if t not in (LEGACY_COUNTER_FORMAT, LEGACY_LABEL, LEGACY_CONTEXT, LEGACY_DKM_FORMAT) \
                or t in got:
            raise _param_error(f"bad SP 800-108 data parameter type {t} in the counter layout")
        got[t] = v
    if LEGACY_COUNTER_FORMAT not in got or LEGACY_DKM_FORMAT not in got:
        raise _param_error("SP 800-108 needs a counter format and a DKM format")
    return [_counter(got[LEGACY_COUNTER_FORMAT]),
            Segment("bytes", got.get(LEGACY_LABEL, b"") + b"\0" + got.get(LEGACY_CONTEXT, b"")),
            _dkm(got[LEGACY_DKM_FORMAT])]


def _prf(prf: int, key: bytes) -> tuple[Callable[[bytes], bytes], int]:
    name = HASH_OF_HMAC.get(prf)
    if name is not None:
        return (lambda data: hmac.new(key, data, name).digest()), hashlib.new(name).digest_size
    if len(key) not in (16, 24, 32):
        raise Pkcs11Error(RV.KEY_TYPE_INCONSISTENT, "AES-CMAC PRF needs an AES key")

    def mac(data: bytes) -> bytes:
        c = CMAC(algorithms.AES(key))
        c.update(data)
        return c.finalize()
    return mac, 16


def counter_kdf(params: CounterKdf, key: bytes, length: int) -> bytes:
    """NIST SP 800-108 §5.1 (counter mode): K(i) = PRF(key, segments with [i] and [L])."""
    if not 1 <= length <= MAX_OUTPUT:
        raise Pkcs11Error(RV.KEY_SIZE_RANGE, "derived key length out of range")
    prf, h = _prf(params.prf, key)
    blocks = -(-length // h)
    out = bytearray()
    for i in range(1, blocks + 1):
        parts = []
        for s in params.segments:
            if s.kind == "bytes":
                parts.append(s.data)
            elif s.kind == "counter":
                if i >= 1 << s.width_bits:
                    raise Pkcs11Error(RV.KEY_SIZE_RANGE, "derived key too long for the counter")
                parts.append(i.to_bytes(s.width_bits // 8, "big"))
            else:
                bits = length * 8
                if bits >= 1 << s.width_bits:
                    raise Pkcs11Error(RV.KEY_SIZE_RANGE, "derived key too long for the DKM width")
                parts.append(bits.to_bytes(s.width_bits // 8, "big"))
        out += prf(b"".join(parts))
    return bytes(out[:length])
