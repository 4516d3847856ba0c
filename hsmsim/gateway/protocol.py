"""The gateway wire protocol (docs/gateway-protocol.md): frame layout, opcodes, the handshake, and
the little-endian reader/writer for frame bodies. No PKCS#11 semantics."""

from __future__ import annotations

import builtins
import struct
from dataclasses import dataclass
from enum import IntEnum

from hsmsim.pkcs11.constants import RV
from hsmsim.pkcs11.errors import Pkcs11Error

MAGIC = 0x4D495348  # b"HSIM" read as a little-endian u32
MAJOR = 1
# 1.1: outspec 2 (a length query that also returns the result); 1.2: EncryptInit returns the GCM IV;
# 1.3: Sign/Verify/Encrypt/DecryptInit return the HSMs for the direct data path, and request flag
# DIRECT_DONE (docs/direct-protocol.md)
MINOR = 4
DIRECT_MINOR = 3
# 1.4: an application connected over TLS is offered the HSMs' TCP+TLS direct listeners
# (tls:NAME@HOST:PORT in the direct section); before 1.4 it is offered none
TLS_DIRECT_MINOR = 4
# Request header flag: the session's operation of this opcode's kind was finished on an HSM
# directly; the gateway ends it before handling the request.
FLAG_DIRECT_DONE = 0x1
MAX_FRAME = 64 * 1024 * 1024
APP_TOKEN_LEN = 16
REQUEST_HEADER = struct.Struct("<IHH")  # request id, opcode, flags (after the u32 length)
RESPONSE_HEADER = struct.Struct("<IIHHQ")  # length, request id, opcode, flags, rv
LENGTH = struct.Struct("<I")

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class Op(IntEnum):
    """Opcode 0 is the handshake; every other is the function's 1-based place in the 2.40
    CK_FUNCTION_LIST."""

    HELLO = 0
    Initialize = 1
    Finalize = 2
    GetInfo = 3
    GetFunctionList = 4
    GetSlotList = 5
    GetSlotInfo = 6
    GetTokenInfo = 7
    GetMechanismList = 8
    GetMechanismInfo = 9
    InitToken = 10
    InitPIN = 11
    SetPIN = 12
    OpenSession = 13
    CloseSession = 14
    CloseAllSessions = 15
    GetSessionInfo = 16
    GetOperationState = 17
    SetOperationState = 18
    Login = 19
    Logout = 20
    CreateObject = 21
    CopyObject = 22
    DestroyObject = 23
    GetObjectSize = 24
    GetAttributeValue = 25
    SetAttributeValue = 26
    FindObjectsInit = 27
    FindObjects = 28
    FindObjectsFinal = 29
    EncryptInit = 30
    Encrypt = 31
    EncryptUpdate = 32
    EncryptFinal = 33
    DecryptInit = 34
    Decrypt = 35
    DecryptUpdate = 36
    DecryptFinal = 37
    DigestInit = 38
    Digest = 39
    DigestUpdate = 40
    DigestKey = 41
    DigestFinal = 42
    SignInit = 43
    Sign = 44
    SignUpdate = 45
    SignFinal = 46
    SignRecoverInit = 47
    SignRecover = 48
    VerifyInit = 49
    Verify = 50
    VerifyUpdate = 51
    VerifyFinal = 52
    VerifyRecoverInit = 53
    VerifyRecover = 54
    DigestEncryptUpdate = 55
    DecryptDigestUpdate = 56
    SignEncryptUpdate = 57
    DecryptVerifyUpdate = 58
    GenerateKey = 59
    GenerateKeyPair = 60
    WrapKey = 61
    UnwrapKey = 62
    DeriveKey = 63
    SeedRandom = 64
    GenerateRandom = 65
    GetFunctionStatus = 66
    CancelFunction = 67
    WaitForSlotEvent = 68


class ParamKind(IntEnum):
    NONE = 0
    RAW = 1
    GCM = 2
    OAEP = 3
    PSS = 4
    CTR = 5
    ECDH1 = 6
    KDF108 = 7
    RSA_AES = 8


class Truncated(Pkcs11Error):
    """A request body ended early or had trailing garbage: CKR_ARGUMENTS_BAD, connection kept."""


class Reader:
    """Reads one frame body; any overrun raises CKR_ARGUMENTS_BAD."""

    __slots__ = ("_buf", "_pos")

    def __init__(self, buf: bytes | memoryview) -> None:
        self._buf = memoryview(buf)
        self._pos = 0

    def _take(self, n: int) -> memoryview:
        end = self._pos + n
        if n < 0 or end > len(self._buf):
            raise Truncated(RV.ARGUMENTS_BAD, "request body is truncated")
        view = self._buf[self._pos:end]
        self._pos = end
        return view

    def u8(self) -> int:
        return int(self._take(1)[0])

    def u16(self) -> int:
        return int(_U16.unpack(self._take(2))[0])

    def u32(self) -> int:
        return int(_U32.unpack(self._take(4))[0])

    def u64(self) -> int:
        return int(_U64.unpack(self._take(8))[0])

    def bytes(self) -> builtins.bytes:
        return builtins.bytes(self._take(self.u32()))

    def count(self, limit: int = 4096) -> int:
        n = self.u32()
        if n > limit:
            raise Truncated(RV.ARGUMENTS_BAD, f"count {n} exceeds {limit}")
        return n

    def tell(self) -> int:
        return self._pos

    def span(self, start: int, end: int | None) -> builtins.bytes:
        """Bytes [start, end) of the body (negative end: from the end), without moving."""
        return builtins.bytes(self._buf[start:end])

    def skip(self, n: int) -> None:
        self._take(n)

    def end(self) -> None:
        if self._pos != len(self._buf):
            raise Truncated(RV.ARGUMENTS_BAD, "request body has trailing bytes")


class Writer:
    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def u8(self, v: int) -> "Writer":
        self.parts.append(_U8.pack(v))
        return self

    def u16(self, v: int) -> "Writer":
        self.parts.append(_U16.pack(v))
        return self

    def u32(self, v: int) -> "Writer":
        self.parts.append(_U32.pack(v))
        return self

    def u64(self, v: int) -> "Writer":
        self.parts.append(_U64.pack(v & 0xFFFFFFFFFFFFFFFF))
        return self

    def bytes(self, b: builtins.bytes) -> "Writer":
        self.parts.append(_U32.pack(len(b)))
        self.parts.append(b)
        return self

    def ulongs(self, values: list[int]) -> "Writer":
        self.parts.append(_U32.pack(len(values)))
        self.parts.append(struct.pack(f"<{len(values)}Q", *values))
        return self

    def done(self) -> builtins.bytes:
        return b"".join(self.parts)


@dataclass(frozen=True)
class Hello:
    major: int
    minor: int
    max_frame: int
    pid: int
    app_token: bytes

    @classmethod
    def decode(cls, r: Reader) -> "Hello":
        if r.u32() != MAGIC:
            raise Pkcs11Error(RV.GENERAL_ERROR, "bad handshake magic")
        major, minor, max_frame, pid = r.u16(), r.u16(), r.u32(), r.u64()
        token = r.bytes()
        r.end()
        if len(token) not in (0, APP_TOKEN_LEN):
            raise Pkcs11Error(RV.ARGUMENTS_BAD, "bad application token length")
        return cls(major, minor, max_frame, pid, token)


def response(request_id: int, op: int, rv: int, body: bytes = b"") -> bytes:
    return RESPONSE_HEADER.pack(16 + len(body), request_id, op, 0, rv) + body
