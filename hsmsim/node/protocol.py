"""The node protocol's framing and vocabulary: 4-byte big-endian length + msgpack map frames,
the protocol version, size limits, operation names and which principal may call each.

Specified in docs/node-protocol.md; both the server and NodeClient use only this module to
put bytes on the wire."""

from __future__ import annotations

import asyncio
import struct
from enum import Enum
from typing import Any

import msgpack

from hsmsim.errors import HsmsimError

VERSION = 1
SUPPORTED_VERSIONS = (1,)
MAX_FRAME = 1 << 20  # bytes of msgpack payload per frame, both directions
HEADER = struct.Struct(">I")
AUTH_CONTEXT = b"hsmsim-node-auth-v1"  # HMAC context string for the cluster principal proof


class ProtocolError(HsmsimError):
    """The peer broke the framing (bad length, undecodable payload); the connection is closed."""


class Principal(Enum):
    """Who may call an operation."""

    ANYONE = "anyone"  # no authentication needed (after hello)
    CLUSTER = "cluster"  # the daemon, proven by the cluster secret
    USER = "user"  # a login_id of a logged-in CO or CU on this connection
    USER_OR_CLUSTER = "user_or_cluster"


P = Principal
OPS: dict[str, Principal] = {
    # session
    "hello": P.ANYONE,
    "auth_cluster": P.ANYONE,
    "ping": P.ANYONE,
    "status": P.CLUSTER,
    # users
    "login": P.ANYONE,
    "logout": P.USER,
    "initialize_users": P.CLUSTER,
    "create_user": P.USER,
    "delete_user": P.USER,
    "change_password": P.USER,
    "unlock_user": P.USER,
    "list_users": P.USER_OR_CLUSTER,
    "export_users": P.CLUSTER,
    "import_users": P.CLUSTER,
    # objects
    "generate_key": P.USER,
    "generate_key_pair": P.USER,
    "create_object": P.USER,
    "copy_object": P.USER,
    "destroy_object": P.USER_OR_CLUSTER,
    "get_attributes": P.USER,
    "set_attributes": P.USER,
    "find_objects": P.USER,
    "close_session": P.USER_OR_CLUSTER,
    "share_key": P.USER,
    "unshare_key": P.USER,
    # crypto
    "encrypt": P.USER,
    "decrypt": P.USER,
    "sign": P.USER,
    "verify": P.USER,
    "digest": P.ANYONE,
    "generate_random": P.ANYONE,
    "wrap_key": P.USER,
    "unwrap_key": P.USER,
    "derive_key": P.USER,
    # masking, sync, cloning
    "export_masked": P.CLUSTER,
    "import_masked": P.CLUSTER,
    "inventory": P.CLUSTER,
    "clone_offer": P.CLUSTER,
    "clone_export": P.CLUSTER,
    "clone_accept": P.CLUSTER,
    # operations
    "set_fault": P.CLUSTER,
    "audit_read": P.CLUSTER,
    # the direct data path (docs/direct-protocol.md)
    "direct_ticket": P.CLUSTER,
    "counters": P.CLUSTER,
}

# Operations that a paused node still answers, and that are never throttled or delayed.
CONTROL_OPS = frozenset({"set_fault", "counters"})
UNTHROTTLED_OPS = frozenset({"hello", "auth_cluster", "ping", "status", "set_fault",
                             "audit_read", "inventory", "counters"})


def pack(message: dict[str, Any]) -> bytes:
    """One frame: header + msgpack payload. Raises ProtocolError if it exceeds MAX_FRAME."""
    payload: bytes = msgpack.packb(message, use_bin_type=True)
    if len(payload) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(payload)} bytes exceeds the {MAX_FRAME}-byte limit")
    return HEADER.pack(len(payload)) + payload


def unpack(payload: bytes) -> Any:
    """Decode one payload (never executes anything: msgpack with no ext hooks)."""
    return msgpack.unpackb(payload, raw=False, strict_map_key=False, use_list=True)


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    """The next frame's payload. asyncio.IncompleteReadError at EOF; ProtocolError if the
    announced length is 0 or above MAX_FRAME (the stream cannot be trusted after that)."""
    header = await reader.readexactly(HEADER.size)
    (length,) = HEADER.unpack(header)
    if length == 0 or length > MAX_FRAME:
        raise ProtocolError(f"frame length {length} outside 1..{MAX_FRAME}")
    return await reader.readexactly(length)


def parse_address(address: str) -> tuple[str, str, int]:
    """'unix:PATH' -> ('unix', PATH, 0); 'tcp:HOST:PORT' -> ('tcp', HOST, PORT)."""
    kind, _, rest = address.partition(":")
    if kind == "unix" and rest:
        return ("unix", rest, 0)
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        if host and port.isdigit() and 0 < int(port) < 65536:
            return ("tcp", host.strip("[]"), int(port))
    raise HsmsimError(f"node address must be unix:PATH or tcp:HOST:PORT, not {address!r}")
