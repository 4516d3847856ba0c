"""The control protocol's framing and values: 4-byte big-endian length + one JSON object.

Request:  {"op": str, "args": {...}}
Progress: {"progress": {"done": int, "total": int, "label": str}}   (zero or more, long ops)
Response: {"ok": true, "result": ...} | {"ok": false, "error": str, "kind": str}"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from typing import Any

from hsmsim.errors import HsmsimError

MAX_FRAME = 4 * 1024 * 1024
_LEN = struct.Struct(">I")


class ControlError(HsmsimError):
    """The daemon refused a control request; `kind` names the class of failure."""

    def __init__(self, message: str, kind: str = "error") -> None:
        super().__init__(message)
        self.kind = kind


class ProtocolError(ControlError):
    def __init__(self, message: str) -> None:
        super().__init__(message, "protocol")


def encode(obj: dict[str, Any]) -> bytes:
    body = json.dumps(obj, separators=(",", ":"), default=str).encode()
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"control frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _LEN.pack(len(body)) + body


def decode_body(body: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ProtocolError("control frame is not JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError("control frame is not a JSON object")
    return obj


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next frame, or None at a clean end of stream."""
    try:
        head = await reader.readexactly(4)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise ProtocolError("truncated control frame header") from None
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME:
        raise ProtocolError(f"control frame of {n} bytes exceeds {MAX_FRAME}")
    try:
        body = await reader.readexactly(n)
    except asyncio.IncompleteReadError:
        raise ProtocolError("truncated control frame") from None
    return decode_body(body)


def recv_frame(sock: socket.socket) -> dict[str, Any]:
    head = _recv_exact(sock, 4)
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME:
        raise ProtocolError(f"control frame of {n} bytes exceeds {MAX_FRAME}")
    return decode_body(_recv_exact(sock, n))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ControlError("the daemon closed the control connection", "unavailable")
        buf += chunk
    return bytes(buf)
