"""Results of PKCS#11 operations as frozen values, shared by every layer that returns them
(the node protocol, the cluster and the gateway)."""

from __future__ import annotations

from dataclasses import dataclass

from hsmsim.pkcs11.attributes import AttrValue


@dataclass(frozen=True)
class AttributeResult:
    """One C_GetAttributeValue slot: `value` is None with `rv` = CKR_ATTRIBUTE_SENSITIVE or
    CKR_ATTRIBUTE_TYPE_INVALID when it cannot be returned."""

    attr: int
    value: AttrValue | None
    rv: int = 0


@dataclass(frozen=True)
class EncryptResult:
    """Ciphertext (for AES-GCM: ciphertext || tag) and the IV the HSM generated, or None."""

    data: bytes
    iv: bytes | None = None
