"""The node's direct listener (docs/direct-protocol.md): single-part C_Sign, C_Verify,
C_Encrypt and C_Decrypt sent by the PKCS#11 module straight to this HSM, without the daemon.

A call carries a *ticket* (issued to the daemon by `direct_ticket` and bound to one of this
node's logins: it dies with that login, at logout, when the daemon's connection closes, and
with this process) and an *operation descriptor* that the daemon prepared at *Init, MACed with
the ticket's key (the application cannot change the key, mechanism, chosen GCM IV or limits it
was given). The node applies the same access rules as for the daemon's calls (the crypto
operations of ops_crypto run with the ticket's login) and the same faults (pause, latency,
throttling; a partition closes direct connections). Anything the node cannot answer for the
cluster (throttled, unknown ticket, key not here yet, input too large for one request) is
answered with the *fallback* flag: the module then hands the call to the daemon."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import struct
import types
from collections.abc import Callable, Coroutine, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import msgpack

from hsmsim.node import codec, protocol
from hsmsim.node.codec import Fields
from hsmsim.node.context import Conn
from hsmsim.node.direct_tls import HandshakeLog, TlsAccept
from hsmsim.node.faults import Faults
from hsmsim.node.service import NodeService
from hsmsim.pkcs11.constants import RV
from hsmsim.pkcs11.errors import Pkcs11Error
from hsmsim.pkcs11.params import MechanismSpec

if TYPE_CHECKING:
    import ssl

log = logging.getLogger("hsmsim.node.direct")

MAGIC = 0x5044_4D48  # b"HMDP" read as a little-endian u32
MAJOR = 1
MINOR = 0
MAX_FRAME = 1 << 20  # the module sends larger inputs to the daemon (it streams them)
TICKET_LEN = 32
MAC_LEN = 16
HELLO = struct.Struct("<IHH")  # magic, major, minor (after the u32 length)
HELLO_REPLY = struct.Struct("<IIHHI")  # length, magic, major, minor, max frame
REQ_HEAD = struct.Struct("<IB")  # request id, verb
REPLY_HEAD = struct.Struct("<IIQB")  # length, request id, rv, flags
_U32 = struct.Struct("<I")
FALLBACK = 1  # reply flag: hand this call to the daemon
VERBS = {1: "encrypt", 2: "decrypt", 3: "sign", 4: "verify"}
_NOT_HERE = (int(RV.KEY_HANDLE_INVALID), int(RV.OBJECT_HANDLE_INVALID))


def descriptor_mac(key: bytes, desc: bytes) -> bytes:
    return hmac.new(key, desc, hashlib.sha256).digest()[:MAC_LEN]


@dataclass(frozen=True)
class Descriptor:
    """What the daemon decided at *Init for one operation (msgpack map, docs/direct-protocol.md)."""

    verb: str
    handle: int
    mech: Any  # node wire form (codec.mech_to_wire)
    hash: str | None  # hash-and-sign: the node hashes the data...
    prefix: bytes  # ...and prepends this (a DigestInfo for RSA PKCS#1 v1.5)
    max_data: int | None  # CloudHSM's data limit (CKR_DATA_LEN_RANGE above it)
    overhead: int  # bytes of the input not counted by the limit (the GCM tag on decryption)
    max_direct: int  # larger inputs go to the daemon
    spec: MechanismSpec  # `mech` decoded once (the node runs it on every call)
    digest: Callable[[bytes], Any] | None  # `hash`'s constructor

    @classmethod
    def decode(cls, raw: bytes) -> "Descriptor":
        m = protocol.unpack(raw)
        if not isinstance(m, dict):
            raise ValueError("descriptor is not a map")
        verb = m["verb"]
        if verb not in VERBS.values():
            raise ValueError("bad verb")
        spec = codec.mech_from_wire(m["mech"])  # checked and decoded once here
        h = m.get("hash")
        if h is not None and h not in hashlib.algorithms_available:
            raise ValueError("bad hash")
        digest = getattr(hashlib, h, None) if h is not None else None
        if h is not None and digest is None:
            name = h
            digest = lambda data: hashlib.new(name, data)  # noqa: E731 - a name without a shortcut
        return cls(verb, int(m["handle"]), m["mech"], h, bytes(m.get("prefix") or b""),
                   m.get("max_data"), int(m.get("overhead") or 0), int(m["max_direct"]),
                   spec, digest)


class _DirectFields(Fields):
    """A direct call's fields for ops_crypto: the descriptor's mechanism, decoded once when
    the descriptor was first seen, instead of from its wire form on every call."""

    def __init__(self, raw: dict[str, Any], spec: MechanismSpec) -> None:
        super().__init__(raw)
        self._spec = spec

    def mech(self, name: str = "mech") -> MechanismSpec:
        return self._spec


@types.coroutine
def _resume(coro: Coroutine[Any, Any, None], first: Any) -> Generator[Any, Any, None]:
    """Continues, inside a task, a coroutine already stepped once outside of one: hands its
    pending future to the task and relays results and exceptions (what `yield from` does for a
    coroutine not yet started)."""
    value = first
    while True:
        try:
            sent = yield value
        except BaseException as exc:  # noqa: BLE001 - relayed (CancelledError included)
            try:
                value = coro.throw(exc)
            except StopIteration:
                return
        else:
            try:
                value = coro.send(sent)
            except StopIteration:
                return


async def _rest(coro: Coroutine[Any, Any, None], first: Any) -> None:
    await _resume(coro, first)


def encode_descriptor(verb: str, handle: int, mech: Any, hash_name: str | None, prefix: bytes,
                      max_data: int | None, overhead: int, max_direct: int) -> bytes:
    raw: bytes = msgpack.packb({"verb": verb, "handle": handle, "mech": mech, "hash": hash_name,
                               "prefix": prefix, "max_data": max_data, "overhead": overhead,
                               "max_direct": max_direct}, use_bin_type=True)
    return raw


class NodeOwner(Protocol):
    """What the direct listener uses of the node server that owns it (server.NodeServer): its
    service (logins, crypto operations), its faults and its connection cap. A Protocol, so this
    module needs no import of the server (which imports this one)."""

    @property
    def service(self) -> NodeService: ...

    @property
    def faults(self) -> Faults: ...

    @property
    def max_connections(self) -> int: ...


class DirectService:
    """Tickets and the direct calls of one node."""

    def __init__(self, server: NodeOwner) -> None:
        self.server = server
        self.tickets: dict[bytes, tuple[int, bytes]] = {}  # ticket -> (login id, descriptor key)
        self.address: str | None = None
        # the TCP+TLS listener (direct_tls.py): "tls:NAME@HOST:PORT" as given to modules
        self.tls_address: str | None = None
        self.connections: set[_DirectConnection] = set()
        self.handshaking = 0  # TCP connections still in their TLS handshake (count to the cap)
        self.handshakes = HandshakeLog()
        self.calls = 0  # direct calls answered (any result), for tests and the bench
        self.tls_calls = 0  # of which over TCP+TLS
        self.fallbacks = 0
        self.delayed = 0  # direct calls that waited for injected latency
        self._descs: dict[bytes, Descriptor] = {}
        # (ticket, descriptor) -> its MAC, once checked: one HMAC per operation kind and key,
        # not per call (the ticket is looked up, and must be live, before this is)
        self._macs: dict[tuple[bytes, bytes], bytes] = {}
        self._conns: dict[int, Conn] = {}  # login id -> the principal ops_crypto checks
        self._srv: asyncio.AbstractServer | None = None
        self._tls_srv: asyncio.AbstractServer | None = None

    # -- tickets (node protocol op `direct_ticket`, cluster principal) ---------------------------
    def issue(self, login_id: int) -> dict[str, Any]:
        if login_id not in self.server.service.ctx.logins:
            raise Pkcs11Error(RV.USER_NOT_LOGGED_IN, "no such login on this HSM")
        if self.address is None:
            raise Pkcs11Error(RV.FUNCTION_NOT_SUPPORTED, "this HSM has no direct listener")
        if len(self.tickets) > 4096:  # forget the tickets of logins that ended
            live = self.server.service.ctx.logins
            self.tickets = {t: v for t, v in self.tickets.items() if v[0] in live}
        ticket, key = os.urandom(TICKET_LEN), os.urandom(32)
        self.tickets[ticket] = (login_id, key)
        return {"ticket": ticket, "key": key, "address": self.address,
                "tls_address": self.tls_address or ""}

    # -- listening ----------------------------------------------------------------------------------
    async def listen(self, path: str) -> str:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        old = os.umask(0o177)
        try:
            self._srv = await asyncio.get_running_loop().create_unix_server(
                lambda: _DirectConnection(self), path)
        finally:
            os.umask(old)
        # FIDELITY: 0600 like the daemon's socket: the application runs as the same user.
        os.chmod(path, 0o600)
        self.address = f"unix:{path}"
        return self.address

    async def listen_tls(self, candidates: list[tuple[str, int]], ctx: "ssl.SSLContext",
                         name: str) -> str:
        """The TCP+TLS listener on the first of `candidates` (host, port) that binds; returns
        its address, tls:HOST:PORT. Module connections verify the certificate names `name`."""
        loop = asyncio.get_running_loop()
        err: OSError | None = None
        for host, port in candidates:
            try:
                self._tls_srv = await loop.create_server(
                    lambda: TlsAccept(self, ctx, _DirectConnection(self, tls=True)), host, port)
            except OSError as exc:
                err = exc
                continue
            h, p = self._tls_srv.sockets[0].getsockname()[:2]
            where = f"[{h}]:{p}" if ":" in h else f"{h}:{p}"
            self.tls_address = f"tls:{name}@{where}"
            return f"tls:{where}"
        assert err is not None
        raise err

    def admit(self) -> bool:
        """Whether a new connection may be served: not while partitioned, and at most the
        node's max_connections direct connections (both listeners, handshakes included)."""
        if self.server.faults.partitioned:
            return False
        return len(self.connections) + self.handshaking < self.server.max_connections

    def partition(self) -> None:
        """A partition cuts the module off too: every direct connection closes (new ones are
        closed at once while the partition lasts)."""
        for c in list(self.connections):
            c.abort()

    async def close(self) -> None:
        for srv in (self._srv, self._tls_srv):
            if srv is not None:
                srv.close()
        for c in list(self.connections):
            c.abort()
        for srv in (self._srv, self._tls_srv):
            if srv is not None:
                await srv.wait_closed()
        self._srv = self._tls_srv = None

    # -- calls ------------------------------------------------------------------------------------
    def _descriptor(self, raw: bytes) -> Descriptor:
        d = self._descs.get(raw)
        if d is None:
            try:
                d = Descriptor.decode(raw)
            except Exception:
                raise Pkcs11Error(RV.ARGUMENTS_BAD, "bad operation descriptor") from None
            if len(self._descs) >= 4096:
                self._descs.clear()
            self._descs[raw] = d
        return d

    async def call(self, verb: int, ticket: bytes, desc: bytes, mac: bytes, data: bytes,
                   sig: bytes) -> tuple[int, int, bytes]:
        """(rv, flags, output) of one direct call."""
        self.calls += 1
        entry = self.tickets.get(ticket)
        ctx = self.server.service.ctx
        login = ctx.logins.get(entry[0]) if entry is not None else None
        if entry is None or login is None:
            if entry is not None:
                del self.tickets[ticket]  # its login ended: revoked
            # the daemon knows whether the application is still logged in
            self.fallbacks += 1
            return int(RV.USER_NOT_LOGGED_IN), FALLBACK, b""
        known = self._macs.get((ticket, desc))
        if known is None:
            known = descriptor_mac(entry[1], desc)
            if not hmac.compare_digest(known, mac):
                return int(RV.ARGUMENTS_BAD), 0, b""
            if len(self._macs) >= 4096:
                self._macs.clear()
            self._macs[(ticket, desc)] = known
        elif not hmac.compare_digest(known, mac):
            return int(RV.ARGUMENTS_BAD), 0, b""
        d = self._descriptor(desc)
        if VERBS.get(verb) != d.verb:
            return int(RV.ARGUMENTS_BAD), 0, b""
        faults = self.server.faults
        if faults.latency_ms > 0:
            self.delayed += 1
        await faults.gate()
        if not faults.admit():
            self.fallbacks += 1
            return int(RV.FUNCTION_FAILED), FALLBACK, b""  # the daemon retries with backoff
        if len(data) > d.max_direct:
            self.fallbacks += 1
            return int(RV.DATA_LEN_RANGE), FALLBACK, b""
        if d.max_data is not None and len(data) - d.overhead > d.max_data:
            return int(RV.DATA_LEN_RANGE), 0, b""
        if d.digest is not None:
            data = d.prefix + d.digest(data).digest()
        lid = login.login_id
        conn = self._conns.get(lid)
        if conn is None or conn.logins.get(lid) is not login:
            if len(self._conns) >= 4096:
                self._conns.clear()
            conn = self._conns[lid] = Conn(0, b"", hello=True, logins={lid: login})
        f = _DirectFields({"login_id": lid, "handle": d.handle, "mech": d.mech, "data": data,
                           "signature": sig}, d.spec)
        crypto = self.server.service.crypto
        try:
            if d.verb == "encrypt":
                out = (await crypto.encrypt(conn, f))["data"]
            elif d.verb == "decrypt":
                out = await crypto.decrypt(conn, f)
            elif d.verb == "sign":
                out = await crypto.sign(conn, f)
            else:
                await crypto.verify(conn, f)
                out = b""
        except Pkcs11Error as exc:
            if int(exc.rv) in _NOT_HERE:  # not synced to this HSM yet: the daemon routes it
                self.fallbacks += 1
                return int(exc.rv), FALLBACK, b""
            return int(exc.rv), 0, b""
        return int(RV.OK), 0, bytes(out)


class _DirectConnection(asyncio.Protocol):
    """One module connection: a version handshake, then requests answered in order of
    completion (each carries its id)."""

    def __init__(self, svc: DirectService, tls: bool = False) -> None:
        self.svc = svc
        self.tls = tls  # over TCP+TLS (admitted by direct_tls.TlsAccept)
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.greeted = False
        self.closed = False
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.svc.server.faults.partitioned or (not self.tls and not self.svc.admit()):
            self.abort()
            return
        self.svc.connections.add(self)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        if not buf and self.greeted and not self.closed and type(data) is bytes and len(data) >= 4:
            # the usual case, one whole request: parsed where it lies, without buffering it
            (n,) = _U32.unpack_from(data)
            if n == len(data) - 4 and HELLO.size <= n <= MAX_FRAME + 4096:
                self._request(data, 4)
                return
        buf += data
        while len(buf) >= 4 and not self.closed:
            (n,) = _U32.unpack_from(buf)
            if n > MAX_FRAME + 4096 or n < HELLO.size:
                self.abort()  # a bad length: the stream cannot be trusted
                return
            if len(buf) < 4 + n:
                return
            frame = bytes(buf[4:4 + n])
            del buf[:4 + n]
            if not self.greeted:
                self._hello(frame)
            else:
                self._request(frame)

    def _hello(self, frame: bytes) -> None:
        magic, major, _minor = HELLO.unpack_from(frame)
        if magic != MAGIC:
            self.abort()
            return
        assert self.transport is not None
        self.transport.write(HELLO_REPLY.pack(HELLO_REPLY.size - 4, MAGIC, MAJOR, MINOR, MAX_FRAME))
        if major != MAJOR:
            self.close()
            return
        self.greeted = True

    def _request(self, frame: bytes, start: int = 0) -> None:
        """The request in frame[start:] (the u32 length before it already checked)."""
        try:
            rid, verb = REQ_HEAD.unpack_from(frame, start)
            pos = start + REQ_HEAD.size
            fields = []
            for _ in range(5):
                (k,) = _U32.unpack_from(frame, pos)
                pos += 4
                if pos + k > len(frame):
                    raise ValueError("truncated")
                fields.append(frame[pos:pos + k])
                pos += k
            if pos != len(frame) or len(fields[0]) != TICKET_LEN or len(fields[2]) != MAC_LEN:
                raise ValueError("bad fields")
        except (struct.error, ValueError):
            self.abort()  # a malformed request: close, as the node protocol does
            return
        if self.tls:
            self.svc.tls_calls += 1
        # Run the call at once, in this loop pass: most finish without waiting (a cached key,
        # a signature in the C core), and a task per call cost a loop pass and its bookkeeping.
        # A call that must wait (paused, latency, RSA batch, a thread) continues as a task.
        coro = self._answer(rid, verb, *fields)
        try:
            first = coro.send(None)
        except StopIteration:
            return
        except BaseException:
            coro.close()
            raise
        task = asyncio.get_running_loop().create_task(_rest(coro, first))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _answer(self, rid: int, verb: int, ticket: bytes, desc: bytes, mac: bytes,
                      data: bytes, sig: bytes) -> None:
        try:
            rv, flags, out = await self.svc.call(verb, ticket, desc, mac, data, sig)
        except Pkcs11Error as exc:
            rv, flags, out = int(exc.rv), 0, b""
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("direct call failed")
            rv, flags, out = int(RV.GENERAL_ERROR), 0, b""
        if self.closed or self.transport is None:
            return
        body_len = REPLY_HEAD.size - 4 + 4 + len(out)
        self.transport.write(REPLY_HEAD.pack(body_len, rid, rv, flags) + _U32.pack(len(out)) + out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.svc.connections.discard(self)
        for t in list(self.tasks):
            t.cancel()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
