"""The reply side of a request: the caller's output buffer as the module describes it (absent, a
capacity, or a speculative length query) and the PKCS#11 output-length convention (PKCS#11 2.40
§5.2: a length query or CKR_BUFFER_TOO_SMALL answers the size and keeps the operation)."""

from __future__ import annotations

from hsmsim.gateway.protocol import Reader, Writer
from hsmsim.pkcs11.constants import RV
from hsmsim.pkcs11.errors import Pkcs11Error

Reply = tuple[int, bytes]
OK = int(RV.OK)


def err(rv: RV, msg: str) -> Pkcs11Error:
    return Pkcs11Error(rv, msg)


class OutSpec:
    """The caller's output buffer: absent (a length query), its capacity, or (protocol 1.1,
    value 2) a length query whose result the module keeps to answer the follow-up call."""

    __slots__ = ("present", "capacity", "speculative")

    def __init__(self, r: Reader, allow_speculative: bool = False) -> None:
        kind = r.u8()
        self.present = kind == 1
        self.speculative = kind == 2 and allow_speculative
        self.capacity = r.u64()

    def reply(self, data: bytes, extra: bytes | None = None) -> tuple[Reply, bool]:
        """(reply, delivered): the PKCS#11 output-length convention."""
        w = Writer().u64(len(data))
        if self.speculative:
            rv = OK
            w.u8(1).bytes(data)
        elif not self.present:
            rv = OK
            w.u8(0).bytes(b"")
        elif self.capacity < len(data):
            rv = int(RV.BUFFER_TOO_SMALL)
            w.u8(0).bytes(b"")
        else:
            rv = OK
            w.u8(1).bytes(data)
        if extra is not None:
            w.bytes(extra)
        delivered = self.present and rv == OK
        return (rv, w.done()), delivered


def sized(out: OutSpec, n: int, iv: bool) -> Reply | None:
    """The reply to a length query or a too-small buffer for `n` output bytes (`iv`: with
    EncryptFinal's empty IV), else None (the caller computes the output). Neither consumes
    input nor ends the operation."""
    if out.present and out.capacity >= n:
        return None
    rv = OK if not out.present else int(RV.BUFFER_TOO_SMALL)
    w = Writer().u64(n).u8(0).bytes(b"")
    if iv:
        w.bytes(b"")  # no HSM-generated IV
    return rv, w.done()
