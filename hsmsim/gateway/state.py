"""The gateway's state model: applications (one per client; one login shared by all its sessions),
their sessions, and each session's active operations (init/update/final state)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hsmsim.cluster.api import Login
from hsmsim.gateway.multipart import CipherStream
from hsmsim.gateway.params import DecodedMechanism
from hsmsim.pkcs11.constants import RV, SessionFlag, SessionState, UserType
from hsmsim.pkcs11.errors import Pkcs11Error
from hsmsim.pkcs11.mechanisms import MechanismInfo


class OpKind(Enum):
    ENCRYPT = "encrypt"
    DECRYPT = "decrypt"
    DIGEST = "digest"
    SIGN = "sign"
    VERIFY = "verify"


@dataclass
class Operation:
    """One active cryptographic operation. Multi-part input is hashed (hash-and-sign, digests),
    streamed to the HSMs (`stream`: AES/DES3 ECB, CBC, CBC-PAD, CTR) or buffered (HMAC, CMAC,
    raw RSA: bounded as it arrives); `total` counts the input so far, for the data limits. A
    computed result is cached until the caller has fetched it, so a length query and the
    follow-up call see the same bytes (same signature, same HSM-generated IV)."""

    kind: OpKind
    mech: DecodedMechanism
    info: MechanismInfo
    key: int
    hasher: Any = None
    buffer: bytearray = field(default_factory=bytearray)
    stream: CipherStream | None = None
    total: int = 0
    updated: bool = False
    cached_input: bytes | None = None
    cached: bytes | None = None
    cached_iv: bytes | None = None
    speculative: bool = False  # the result went to the module with a length query


@dataclass
class Session:
    handle: int
    flags: int
    ops: dict[OpKind, Operation] = field(default_factory=dict)
    found: list[int] | None = None
    wrap_cache: tuple[tuple[Any, ...], bytes, bytes | None] | None = None

    def op(self, kind: OpKind) -> Operation:
        op = self.ops.get(kind)
        if op is None:
            raise Pkcs11Error(RV.OPERATION_NOT_INITIALIZED, f"no {kind.value} operation is active")
        return op


_RW = int(SessionFlag.RW_SESSION)
_SO = int(UserType.SO)
_RW_PUBLIC, _RO_PUBLIC = int(SessionState.RW_PUBLIC), int(SessionState.RO_PUBLIC)
_RW_SO, _RW_USER, _RO_USER = int(SessionState.RW_SO), int(SessionState.RW_USER), int(SessionState.RO_USER)


class Application:
    """One client application: all connections presenting the same application token."""

    def __init__(self, token: bytes, pid: int) -> None:
        self.token = token
        self.pid = pid
        self.login: Login | None = None
        self.sessions: dict[int, Session] = {}
        self.connections = 0
        self.minor = 0  # the module's protocol minor version (1.3: the direct data path)
        self.remote = False  # connected over TLS: direct calls go to the nodes' TLS listeners

    def session(self, handle: int) -> Session:
        s = self.sessions.get(handle)
        if s is None:
            raise Pkcs11Error(RV.SESSION_HANDLE_INVALID, "no such session in this application")
        return s

    def state(self, s: Session) -> int:
        # plain ints: enum.Flag arithmetic costs microseconds on the C_GetSessionInfo path
        rw = int(s.flags) & _RW
        if self.login is None:
            return _RW_PUBLIC if rw else _RO_PUBLIC
        if self.login.user_type == _SO:
            return _RW_SO
        return _RW_USER if rw else _RO_USER

    def require_login(self) -> Login:
        if self.login is None:
            raise Pkcs11Error(RV.USER_NOT_LOGGED_IN, "the application is not logged in")
        return self.login


class HandleSource:
    """Session handles: a random per-daemon epoch in the high bits, so handles from before a
    daemon restart are never valid afterwards; kept below 2**31 for 32-bit-minded callers."""

    def __init__(self) -> None:
        self._next = (secrets.randbelow(1 << 10) << 20) | 1

    def next(self) -> int:
        h = self._next
        self._next = h + 1 if (h + 1) & 0xFFFFF else (h & ~0xFFFFF) + 1
        return h


def new_token() -> bytes:
    return secrets.token_bytes(16)
