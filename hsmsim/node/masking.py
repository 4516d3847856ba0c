"""The cluster's masking key inside one node: sealing and opening masked blobs (objects and
user records) and unwrapping key material that SoftHSM2 wrapped under it.

Blob = msgpack ["<kind>-v1", nonce(12), AES-256-GCM(HKDF(masking key, info), nonce,
msgpack(record), aad=kind)]. The key bytes live only here, in a bytearray zeroised on close;
they are never logged, sent or written outside the token."""

from __future__ import annotations

import os
from typing import Any

import msgpack
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.keywrap import (InvalidUnwrap, aes_key_unwrap_with_padding,
                                                    aes_key_wrap_with_padding)
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import load_der_public_key

from hsmsim.core import AesGcmKey, InvalidTag
from hsmsim.pkcs11.constants import RV
from hsmsim.pkcs11.errors import Pkcs11Error

OBJECT_KIND = "hsmsim-masked-v1"
USERS_KIND = "hsmsim-users-v1"
_INFO = {OBJECT_KIND: b"hsmsim masked object v1", USERS_KIND: b"hsmsim masked users v1"}
CLONE_LABEL = b"hsmsim-clone-v1"
KEY_LEN = 32


def _derive(key: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(key)


# FIDELITY: CloudHSM's masked-object format is proprietary; this one keeps its properties
# (wrapped under a cluster-wide key, authenticated, usable only inside the cluster's HSMs).
class MaskingKey:
    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_LEN:
            raise Pkcs11Error(RV.GENERAL_ERROR, "masking key must be 32 bytes")
        self._key = bytearray(key)
        self._aeads = {kind: AesGcmKey(_derive(key, info)) for kind, info in _INFO.items()}

    def seal(self, kind: str, record: dict[str, Any]) -> bytes:
        nonce = os.urandom(12)
        ct = self._aeads[kind].encrypt(nonce, msgpack.packb(record, use_bin_type=True),
                                       kind.encode())
        return bytes(msgpack.packb([kind, nonce, ct], use_bin_type=True))

    def open(self, kind: str, blob: object) -> dict[str, Any]:
        """The record of a blob; CKR_WRAPPED_KEY_INVALID if it is not an intact blob of this
        kind sealed under this cluster's masking key."""
        bad = Pkcs11Error(RV.WRAPPED_KEY_INVALID, "masked blob is invalid or was tampered with")
        if not isinstance(blob, bytes):
            raise bad
        try:
            outer = msgpack.unpackb(blob, raw=False, strict_map_key=False)
        except Exception:
            raise bad from None
        if not (isinstance(outer, list) and len(outer) == 3 and outer[0] == kind
                and isinstance(outer[1], bytes) and len(outer[1]) == 12
                and isinstance(outer[2], bytes) and len(outer[2]) >= 16):
            raise bad
        try:
            plain = self._aeads[kind].decrypt(outer[1], outer[2], kind.encode())
        except InvalidTag:
            raise bad from None
        record = msgpack.unpackb(plain, raw=False, strict_map_key=False)
        if not isinstance(record, dict):
            raise bad
        return record

    def unwrap(self, wrapped: bytes, length: int | None = None) -> bytes:
        """Key material that SoftHSM2 wrapped under the masking key (CKM_AES_KEY_WRAP_PAD).
        SoftHSM 2.6.1 zero-pads the key to a multiple of 8 before RFC 5649 wrapping, so the
        caller gives the true length (secret keys: CKA_VALUE_LEN); None means the material is
        one DER element (PKCS#8), whose own length is used."""
        try:
            plain = aes_key_unwrap_with_padding(bytes(self._key), wrapped)
        except (InvalidUnwrap, ValueError):
            raise Pkcs11Error(RV.WRAPPED_KEY_INVALID, "masked key material does not unwrap") from None
        size = der_length(plain) if length is None else length
        if size > len(plain):
            raise Pkcs11Error(RV.WRAPPED_KEY_INVALID, "masked key material is truncated")
        return plain[:size]

    def wrap(self, material: bytes) -> bytes:
        """RFC 5649 wrap under the masking key (what SoftHSM2's C_UnwrapKey expects)."""
        return aes_key_wrap_with_padding(bytes(self._key), material)

    def export_to(self, public_der: bytes) -> bytes:
        """The masking key encrypted to a cloning node's ephemeral RSA public key."""
        try:
            pub = load_der_public_key(public_der)
        except (ValueError, TypeError):
            raise Pkcs11Error(RV.PUBLIC_KEY_INVALID, "clone public key is not DER SPKI") from None
        if not isinstance(pub, rsa.RSAPublicKey) or pub.key_size < 3072:
            raise Pkcs11Error(RV.PUBLIC_KEY_INVALID, "clone public key must be RSA >= 3072 bits")
        return pub.encrypt(bytes(self._key), clone_padding())

    def raw(self) -> bytes:
        return bytes(self._key)

    def close(self) -> None:
        for i in range(len(self._key)):
            self._key[i] = 0
        for aead in self._aeads.values():
            aead.close()


def der_length(data: bytes) -> int:
    """Length of the DER element at the start of data (definite lengths only)."""
    if len(data) < 2:
        raise Pkcs11Error(RV.WRAPPED_KEY_INVALID, "masked key material is not DER")
    first = data[1]
    if first < 0x80:
        return 2 + first
    n = first & 0x7F
    if n == 0 or n > 4 or len(data) < 2 + n:
        raise Pkcs11Error(RV.WRAPPED_KEY_INVALID, "masked key material is not DER")
    return 2 + n + int.from_bytes(data[2:2 + n], "big")


def clone_padding() -> padding.OAEP:
    return padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(),
                        label=CLONE_LABEL)
