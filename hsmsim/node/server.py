"""The node protocol server: accepts connections, checks the handshake and principals,
applies faults and dispatches each request to NodeService concurrently, translating every
failure into an error response once, here. One bad connection never affects the others."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from hsmsim import __version__
from hsmsim.node import protocol
from hsmsim.node.codec import Fields
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
        self.max_connections = max_connections
        self._conn_ids = 0
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        s, u, o, c, m = service, service.users, service.objects, service.crypto, service.masking
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
            "wrap_key": c.wrap_key,
            "unwrap_key": c.unwrap_key,
            "derive_key": c.derive_key,
            "export_masked": lambda c_, f: m.export_masked(f),
            "import_masked": lambda c_, f: m.import_masked(f),
            "inventory": self._sync(lambda c_, f: m.inventory()),
            "clone_offer": lambda c_, f: m.clone_offer(),
            "clone_export": self._sync(lambda c_, f: m.clone_export(f)),
            "clone_accept": self._none_async(lambda c_, f: m.clone_accept(f)),
            "set_fault": self._sync(lambda c_, f: self.faults.set(
                f.num("latency_ms"), f.num("throttle_rps"), f.opt_bool("paused"))),
            "audit_read": self._sync(lambda c_, f: [
                {"seq": r.seq, "time_us": r.time_us, "event": r.event, "fields": r.fields}
                for r in s.audit.read(f.int("since_seq", 0), f.int("limit", 1000, lo=1,
                                                                     hi=10000))]),
        }
        missing = set(protocol.OPS) - set(self.handlers) - {"hello", "auth_cluster"}
        assert not missing, f"ops without handler: {missing}"

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
        if kind == "unix":
            try:
                os.unlink(where)
            except FileNotFoundError:
                pass
            old = os.umask(0o177)
            try:
                srv = await asyncio.start_unix_server(self._serve, where,
                                                      limit=protocol.MAX_FRAME + 64)
            finally:
                os.umask(old)
            os.chmod(where, 0o600)
            bound = f"unix:{where}"
        else:
            srv = await asyncio.start_server(self._serve, where, port, ssl=ssl,
                                             limit=protocol.MAX_FRAME + 64)
            sock = srv.sockets[0].getsockname()
            bound = f"tcp:{sock[0]}:{sock[1]}"
        self._servers.append(srv)
        return bound

    async def close(self) -> None:
        for srv in self._servers:
            srv.close()
        for t in list(self._tasks):
            t.cancel()
        for srv in self._servers:
            await srv.wait_closed()

    # -- one connection ----------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._conn_ids += 1
        conn = Conn(self._conn_ids, os.urandom(32))
        self.service.connections += 1
        inflight: set[asyncio.Task[None]] = set()
        try:
            if self.service.connections > self.max_connections:
                await self._send(writer, _error(0, RV.SESSION_COUNT, "too many connections"))
                return
            while True:
                try:
                    payload = await protocol.read_frame(reader)
                except ProtocolError as exc:
                    await self._send(writer, _error(0, RV.ARGUMENTS_BAD, str(exc)))
                    return
                t = asyncio.get_running_loop().create_task(self._request(conn, writer, payload))
                inflight.add(t)
                t.add_done_callback(inflight.discard)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            for t in list(inflight):
                t.cancel()
            self.service.connections -= 1
            self._tasks.discard(task)
            try:
                await self.service.disconnect(conn)
            except asyncio.CancelledError:
                pass  # shutting down: session objects die with the process anyway
            except Exception:  # pragma: no cover - logged, never fatal
                log.exception("cleaning up connection %d", conn.conn_id)
            writer.close()

    async def _send(self, writer: asyncio.StreamWriter, msg: dict[str, Any]) -> None:
        try:
            frame = protocol.pack(msg)
        except ProtocolError:
            frame = protocol.pack(_error(msg.get("id", 0), RV.DATA_LEN_RANGE,
                                         "response exceeds the frame limit"))
        except (TypeError, ValueError):
            frame = protocol.pack(_error(msg.get("id", 0), RV.GENERAL_ERROR, "unencodable result"))
        try:
            writer.write(frame)
            await writer.drain()
        except (ConnectionError, OSError):
            pass

    async def _request(self, conn: Conn, writer: asyncio.StreamWriter, payload: bytes) -> None:
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
            result = await self._dispatch(conn, op, Fields(msg))
            await self._send(writer, {"id": rid, "ok": True, "result": result})
        except Throttled:
            await self._send(writer, {"id": rid, "ok": False, "rv": int(RV.FUNCTION_FAILED),
                                      "msg": "HSM is busy (throttled)", "throttled": True})
        except Pkcs11Error as exc:
            await self._send(writer, _error(rid, exc.rv, str(exc)))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("request failed")
            await self._send(writer, _error(rid, RV.GENERAL_ERROR, "internal error in the HSM node"))

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
            return None
        who = protocol.OPS[op]
        if who is Principal.CLUSTER and not conn.cluster:
            raise Pkcs11Error(RV.USER_NOT_LOGGED_IN, f"{op} needs the cluster principal")
        if who is Principal.USER_OR_CLUSTER and not conn.cluster and f.raw("login_id") is None:
            raise Pkcs11Error(RV.USER_NOT_LOGGED_IN, f"{op} needs a login_id")
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
