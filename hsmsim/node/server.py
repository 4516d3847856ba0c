"""The node protocol server: accepts connections, checks the handshake and principals,
applies faults and dispatches each request to NodeService concurrently, translating every
failure into an error response once, here. One bad connection never affects the others."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from hsmsim import __version__
from hsmsim.node import protocol
from hsmsim.node.codec import Fields
from hsmsim.node.direct import DirectService
from hsmsim.node.faults import Faults
from hsmsim.node.protocol import Principal, ProtocolError
from hsmsim.node.context import Conn
from hsmsim.node.service import NodeService
from hsmsim.pkcs11.constants import RV
from hsmsim.pkcs11.errors import Pkcs11Error

if TYPE_CHECKING:
    from ssl import SSLContext

log = logging.getLogger("hsmsim.node.server")
Handler = Callable[[Conn, Fields], Awaitable[Any]]


class NodeServer:
    def __init__(self, service: NodeService, *, max_connections: int) -> None:
        self.service = service
        self.faults = Faults()
        self.direct = DirectService(self)
        self.max_connections = max_connections
        self._conn_ids = 0
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._connections: set[_Connection] = set()
        s, u, o, c, m = service, service.users, service.objects, service.crypto, service.masking
        k = service.keys
        self.handlers: dict[str, Handler] = {
            "ping": self._none(lambda c_, f: None),
            "status": self._sync(lambda c_, f: s.status(self.faults.settings())),
            "login": u.login,
            "logout": self._none_async(u.logout),
            "initialize_users": self._none_async(u.initialize_users),
            "create_user": self._none_async(u.create_user),
            "delete_user": self._none_async(u.delete_user),
            "change_password": self._none_async(u.change_password),
            "unlock_user": self._none_async(u.unlock_user),
            "list_users": self._sync(u.list_users),
            "export_users": self._sync(lambda c_, f: u.export_users()),
            "import_users": lambda c_, f: u.import_users(f),
            "generate_key": o.generate_key,
            "generate_key_pair": o.generate_key_pair,
            "create_object": o.create_object,
            "copy_object": o.copy_object,
            "destroy_object": self._none_async(o.destroy_object),
            "get_attributes": o.get_attributes,
            "set_attributes": self._none_async(o.set_attributes),
            "find_objects": self._sync(o.find_objects),
            "close_session": o.close_session,
            "share_key": self._none_async(lambda c_, f: o.share(c_, f, True)),
            "unshare_key": self._none_async(lambda c_, f: o.share(c_, f, False)),
            "encrypt": c.encrypt,
            "decrypt": c.decrypt,
            "sign": c.sign,
            "verify": self._none_async(c.verify),
            "digest": lambda c_, f: c.digest(f),
            "generate_random": lambda c_, f: c.generate_random(f),
            "wrap_key": k.wrap_key,
            "unwrap_key": k.unwrap_key,
            "derive_key": k.derive_key,
            "export_masked": lambda c_, f: m.export_masked(f),
            "import_masked": lambda c_, f: m.import_masked(f),
            "inventory": self._sync(lambda c_, f: m.inventory()),
            "clone_offer": lambda c_, f: m.clone_offer(),
            "clone_export": self._sync(lambda c_, f: m.clone_export(f)),
            "clone_accept": self._none_async(lambda c_, f: m.clone_accept(f)),
            "set_fault": self._sync(self._set_fault),
            "direct_ticket": self._sync(lambda c_, f: self.direct.issue(f.int("login_id"))),
            "counters": self._sync(lambda c_, f: {
                "delayed": self.faults.delayed, "throttled": self.faults.throttled,
                "direct_calls": self.direct.calls, "direct_fallbacks": self.direct.fallbacks,
                "direct_delayed": self.direct.delayed, "direct_tls_calls": self.direct.tls_calls,
                "direct_tls_refused": self.direct.handshakes.failed}),
            "audit_read": self._sync(lambda c_, f: [
                {"seq": r.seq, "time_us": r.time_us, "event": r.event, "fields": r.fields}
                for r in s.audit.read(f.int("since_seq", 0), f.int("limit", 1000, lo=1,
                                                                     hi=10000))]),
        }
        missing = set(protocol.OPS) - set(self.handlers) - {"hello", "auth_cluster"}
        assert not missing, f"ops without handler: {missing}"

    def _set_fault(self, conn: Conn, f: Fields) -> dict[str, Any]:
        partitioned = f.opt_bool("partitioned")
        result = self.faults.set(f.num("latency_ms"), f.num("throttle_rps"), f.opt_bool("paused"),
                                 partitioned)
        if partitioned:
            self.direct.partition()
        return result

    @staticmethod
    def _sync(fn: Callable[[Conn, Fields], Any]) -> Handler:
        async def h(c: Conn, f: Fields) -> Any:
            return fn(c, f)
        return h

    @staticmethod
    def _none(fn: Callable[[Conn, Fields], Any]) -> Handler:
        async def h(c: Conn, f: Fields) -> None:
            fn(c, f)
        return h

    @staticmethod
    def _none_async(fn: Callable[[Conn, Fields], Awaitable[Any]]) -> Handler:
        async def h(c: Conn, f: Fields) -> None:
            await fn(c, f)
        return h

    # -- listening ---------------------------------------------------------------------------------

    async def listen(self, address: str, ssl: "SSLContext | None" = None) -> str:
        """Start serving on unix:PATH or tcp:HOST:PORT (port 0 picks one; `ssl`: mutual TLS,
        see hsmsim.node.tls); returns the bound address."""
        kind, where, port = _parse_listen(address)
        loop = asyncio.get_running_loop()
        if kind == "unix":
            try:
                os.unlink(where)
            except FileNotFoundError:
                pass
            old = os.umask(0o177)
            try:
                srv = await loop.create_unix_server(lambda: _Connection(self), where)
            finally:
                os.umask(old)
            os.chmod(where, 0o600)
            bound = f"unix:{where}"
            if self.direct.address is None:
                # the direct data path's listener beside the node socket (docs/direct-protocol.md);
                # its name is shorter than node.sock's, so it fits wherever that one does.
                # FIDELITY: SDK 5 reaches HSMs over the network; here only local (Unix socket)
                # nodes get a direct listener, and remote applications use the daemon.
                try:
                    await self.direct.listen(os.path.join(os.path.dirname(where), "dp.sock"))
                except OSError as exc:  # the module then sends everything through the daemon
                    log.warning("no direct listener: %s", exc)
        else:
            srv = await loop.create_server(lambda: _Connection(self), where, port, ssl=ssl)
            sock = srv.sockets[0].getsockname()
            bound = f"tcp:{sock[0]}:{sock[1]}"
        self._servers.append(srv)
        return bound

    async def close(self) -> None:
        for srv in self._servers:
            srv.close()
        await self.direct.close()
        for c in list(self._connections):
            c.abort()
        for t in list(self._tasks):
            t.cancel()
        for srv in self._servers:
            await srv.wait_closed()

    # -- requests ----------------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def handle(self, c: "_Connection", payload: bytes) -> None:
        """One request frame: each runs as its own task, so requests run concurrently."""
        rid: Any = 0
        try:
            try:
                msg = protocol.unpack(payload)
            except Exception:
                raise Pkcs11Error(RV.ARGUMENTS_BAD, "frame is not valid msgpack") from None
            if not isinstance(msg, dict):
                raise Pkcs11Error(RV.ARGUMENTS_BAD, "request must be a map")
            rid = msg.get("id")
            if not isinstance(rid, int) or isinstance(rid, bool) or not 0 <= rid < (1 << 64):
                rid = 0
                raise Pkcs11Error(RV.ARGUMENTS_BAD, "request needs an unsigned integer id")
            op = msg.get("op")
            if not isinstance(op, str) or op not in protocol.OPS:
                raise Pkcs11Error(RV.ARGUMENTS_BAD, f"unknown op {str(op)[:40]!r}")
        except Pkcs11Error as exc:
            c.send(_error(rid, exc.rv, str(exc)))
            return
        except Exception:
            log.exception("request failed")
            c.send(_error(rid, RV.GENERAL_ERROR, "internal error in the HSM node"))
            return
        c.track(self.spawn(self._request(c, rid, op, msg)))

    async def _request(self, c: "_Connection", rid: Any, op: str, msg: dict[str, Any]) -> None:
        try:
            result = await self._dispatch(c.conn, op, Fields(msg))
            c.send({"id": rid, "ok": True, "result": result})
        except Throttled:
            c.send({"id": rid, "ok": False, "rv": int(RV.FUNCTION_FAILED),
                    "msg": "HSM is busy (throttled)", "throttled": True})
        except Pkcs11Error as exc:
            c.send(_error(rid, exc.rv, str(exc)))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("request failed")
            c.send(_error(rid, RV.GENERAL_ERROR, "internal error in the HSM node"))

    async def disconnect(self, conn: Conn) -> None:
        try:
            await self.service.disconnect(conn)
        except asyncio.CancelledError:
            pass  # shutting down: session objects die with the process anyway
        except Exception:  # pragma: no cover - logged, never fatal
            log.exception("cleaning up connection %d", conn.conn_id)

    def _check_principal(self, conn: Conn, op: str, f: Fields) -> None:
        who = protocol.OPS[op]
        if who is Principal.CLUSTER and not conn.cluster:
            raise Pkcs11Error(RV.USER_NOT_LOGGED_IN, f"{op} needs the cluster principal")
        if who is Principal.USER_OR_CLUSTER and not conn.cluster and f.raw("login_id") is None:
            raise Pkcs11Error(RV.USER_NOT_LOGGED_IN, f"{op} needs a login_id")

    async def _dispatch(self, conn: Conn, op: str, f: Fields) -> Any:
        if op not in protocol.CONTROL_OPS:
            await self.faults.gate()
        if op not in protocol.UNTHROTTLED_OPS and not self.faults.admit():
            raise Throttled()
        if op == "hello":
            return self._hello(conn, f)
        if not conn.hello:
            raise Pkcs11Error(RV.ARGUMENTS_BAD, "the first request must be hello")
        if op == "auth_cluster":
            self.service.check_proof(conn, f.bytes("proof"))
            self.faults.partitioned = False  # the daemon reached this HSM again: healed
            return None
        self._check_principal(conn, op, f)
        return await self.handlers[op](conn, f)

    def _hello(self, conn: Conn, f: Fields) -> dict[str, Any]:
        versions = f.raw("versions")
        if not isinstance(versions, list):
            raise Pkcs11Error(RV.ARGUMENTS_BAD, "hello needs a list of versions")
        common = [v for v in versions if v in protocol.SUPPORTED_VERSIONS]
        if not common:
            raise Pkcs11Error(RV.ARGUMENTS_BAD, "no common protocol version "
                              f"(node speaks {list(protocol.SUPPORTED_VERSIONS)})")
        conn.hello = True
        return {"version": max(common), "hsm_id": self.service.hsm_id, "az": self.service.az,
                "server": f"hsmsim-node {__version__}", "max_frame": protocol.MAX_FRAME,
                "nonce": conn.nonce}


class _Connection(asyncio.Protocol):
    """One client connection: splits the byte stream into frames for NodeServer.handle and
    writes responses; its unfinished requests are cancelled when it closes."""

    def __init__(self, server: NodeServer) -> None:
        self.server = server
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.inflight: set[asyncio.Task[None]] = set()
        self.closed = False
        server._conn_ids += 1
        self.conn = Conn(server._conn_ids, os.urandom(32))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        srv = self.server
        srv._connections.add(self)
        srv.service.connections += 1
        if srv.service.connections > srv.max_connections:
            self.send(_error(0, RV.SESSION_COUNT, "too many connections"))
            self.close()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        size = protocol.HEADER.size
        while len(buf) >= size and not self.closed:
            (length,) = protocol.HEADER.unpack_from(buf)
            if length == 0 or length > protocol.MAX_FRAME:
                # the stream cannot be trusted after a bad length: answer once and close
                self.send(_error(0, RV.ARGUMENTS_BAD,
                                 f"frame length {length} outside 1..{protocol.MAX_FRAME}"))
                self.close()
                return
            if len(buf) < size + length:
                return
            payload = bytes(buf[size:size + length])
            del buf[:size + length]
            self.server.handle(self, payload)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        srv = self.server
        srv._connections.discard(self)
        srv.service.connections -= 1
        for t in list(self.inflight):
            t.cancel()
        self.buf.clear()
        srv.spawn(srv.disconnect(self.conn))

    def track(self, task: "asyncio.Task[None]") -> None:
        self.inflight.add(task)
        task.add_done_callback(self.inflight.discard)

    def send(self, msg: dict[str, Any]) -> None:
        if self.closed or self.transport is None:
            return
        try:
            frame = protocol.pack(msg)
        except ProtocolError:
            frame = protocol.pack(_error(msg.get("id", 0), RV.DATA_LEN_RANGE,
                                         "response exceeds the frame limit"))
        except (TypeError, ValueError):
            frame = protocol.pack(_error(msg.get("id", 0), RV.GENERAL_ERROR, "unencodable result"))
        self.transport.write(frame)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class Throttled(Exception):
    """Internal: the request is over the throttle rate."""


def _error(rid: Any, rv: int, msg: str) -> dict[str, Any]:
    return {"id": rid, "ok": False, "rv": int(rv), "msg": msg}


def _parse_listen(address: str) -> tuple[str, str, int]:
    kind, _, rest = address.partition(":")
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        if host and port.isdigit() and int(port) < 65536:
            return ("tcp", host.strip("[]"), int(port))
    return protocol.parse_address(address)
