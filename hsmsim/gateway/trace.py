"""The call trace: one log line per PKCS#11 call a module sends, for debugging client code
(`[gateway] trace_calls`, or HSMSIM_GATEWAY_TRACE_CALLS=1 when the daemon starts). A line names
the application, the function, the session, the mechanism and the lengths in and out, the
return value and, for a refusal, its reason. Never data, PINs, templates or key material:
only the fixed-position header fields of a request body are read (docs/gateway-protocol.md)."""

from __future__ import annotations

import struct

from hsmsim.gateway.protocol import REQUEST_HEADER, Op
from hsmsim.pkcs11.constants import RV, Mechanism

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
# Bodies that start with a slot id, or with nothing, rather than a session handle.
_NO_SESSION = frozenset({Op.Finalize, Op.GetSlotList, Op.GetSlotInfo, Op.GetTokenInfo,
                         Op.GetMechanismList, Op.GetMechanismInfo, Op.OpenSession,
                         Op.CloseAllSessions})
# Bodies whose mechanism type follows the session handle.
_MECHANISM = frozenset({Op.EncryptInit, Op.DecryptInit, Op.DigestInit, Op.SignInit,
                        Op.VerifyInit, Op.GenerateKey, Op.GenerateKeyPair, Op.WrapKey,
                        Op.UnwrapKey, Op.DeriveKey})
# Bodies whose `bytes data` follows the session handle.
_DATA_IN = frozenset({Op.Encrypt, Op.EncryptUpdate, Op.Decrypt, Op.DecryptUpdate, Op.Digest,
                      Op.DigestUpdate, Op.Sign, Op.SignUpdate, Op.Verify, Op.VerifyUpdate})
# Replies that start with the PKCS#11 output length (u64).
_DATA_OUT = frozenset({Op.Encrypt, Op.EncryptUpdate, Op.EncryptFinal, Op.Decrypt,
                       Op.DecryptUpdate, Op.DecryptFinal, Op.Digest, Op.DigestFinal, Op.Sign,
                       Op.SignFinal, Op.WrapKey})


def name(enum: type[Op] | type[RV] | type[Mechanism], value: int, prefix: str) -> str:
    try:
        return prefix + enum(value).name
    except ValueError:
        return f"0x{value:x}"


def line(app: str, op: int, frame: bytes, rv: int, out: bytes, reason: str) -> str:
    """One trace line for the request `frame` (header included) and its reply."""
    body = memoryview(frame)[REQUEST_HEADER.size:]
    parts = [f"app={app}", name(Op, op, "C_")]
    if op not in _NO_SESSION and len(body) >= 8:
        parts.append(f"session={_U64.unpack_from(body)[0]}")
    if op in _MECHANISM and len(body) >= 16:
        parts.append(name(Mechanism, _U64.unpack_from(body, 8)[0], "CKM_"))
    if op in _DATA_IN and len(body) >= 12:
        parts.append(f"in={_U32.unpack_from(body, 8)[0]}")
    if op in _DATA_OUT and len(out) >= 8 and rv in (RV.OK, RV.BUFFER_TOO_SMALL):
        parts.append(f"out={_U64.unpack_from(out)[0]}")
    parts.append(f"-> {name(RV, rv, 'CKR_')}")
    if reason and rv != RV.OK:
        parts.append(f"({reason})")
    return " ".join(parts)
