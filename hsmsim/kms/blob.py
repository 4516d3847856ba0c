"""The symmetric ciphertext blob and the encryption-context encoding.

Blob layout (version 1), all of it before the IV is the header, bound as AES-GCM AAD:

    0   2   magic  b"\\x48\\x4b" ("HK")
    2   1   version (1)
    3   1   engine: 1 = KMS fleet (daemon C core), 2 = custom key store (cluster HSM)
    4   1   n = length of the key id (36: a UUID or mrk-<32 hex>)
    5   n   key id (ASCII)
    5+n 32  backing material id (its 64-char KeyMaterialId, as bytes)
    ..  12  IV
    ..  *   ciphertext || 16-byte tag

AAD = header || encode_context(encryption context). Overhead is 37 + n + 12 + 16 = 101 bytes
for a 36-char key id, so a 4,096-byte plaintext stays far below the 6,144-byte limit.

FIDELITY: the layout is our own (AWS's is undocumented); clients treat blobs as opaque."""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

MAGIC = b"HK"
VERSION = 1
ENGINE_FLEET = 1
ENGINE_CLUSTER = 2
IV_LEN = 12
TAG_LEN = 16
MATERIAL_LEN = 32


@dataclass(frozen=True)
class Blob:
    engine: int
    key_id: str
    material: bytes  # 32 bytes
    iv: bytes
    body: bytes  # ciphertext || tag

    @property
    def material_id(self) -> str:
        return self.material.hex()


def header(engine: int, key_id: str, material: bytes) -> bytes:
    kid = key_id.encode("ascii")
    if len(material) != MATERIAL_LEN or not 0 < len(kid) < 256:
        raise ValueError("bad blob header fields")
    return MAGIC + bytes((VERSION, engine, len(kid))) + kid + material


def pack(hdr: bytes, iv: bytes, body: bytes) -> bytes:
    return hdr + iv + body


def unpack(data: bytes) -> tuple[Blob, bytes]:
    """(Blob, header bytes); ValueError when `data` is not a version-1 blob."""
    if len(data) < 5 or data[:2] != MAGIC or data[2] != VERSION or data[3] not in (ENGINE_FLEET, ENGINE_CLUSTER):
        raise ValueError("not a ciphertext blob")
    n = data[4]
    end = 5 + n + MATERIAL_LEN
    if len(data) < end + IV_LEN + TAG_LEN:
        raise ValueError("truncated ciphertext blob")
    try:
        key_id = data[5:5 + n].decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("bad key id") from None
    return (Blob(data[3], key_id, data[5 + n:end], data[end:end + IV_LEN], data[end + IV_LEN:]),
            data[:end])


def encode_context(context: Mapping[str, str] | None) -> bytes:
    """The canonical, injective encoding of an encryption context: the pair count, then each
    pair sorted by the UTF-8 bytes of its key, as 4-byte big-endian length-prefixed UTF-8 key
    and value. {"a": "bc"} and {"ab": "c"} encode differently; pair order does not matter."""
    if not context:
        return b"\x00\x00\x00\x00"
    items = sorted((k.encode("utf-8"), v.encode("utf-8")) for k, v in context.items())
    out = [struct.pack(">I", len(items))]
    for k, v in items:
        out += [struct.pack(">I", len(k)), k, struct.pack(">I", len(v)), v]
    return b"".join(out)
