"""The gateway's socket server: accepts module connections on a 0600 Unix socket, checks the
handshake, binds each connection to its application, frames requests and replies, and turns
every failure into a return value. One bad connection never affects another."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections import deque
from collections.abc import Awaitable
from pathlib import Path

from hsmsim.cluster.api import ClusterClient
from hsmsim.errors import ConfigError, HsmsimError
from hsmsim.gateway import protocol as P
from hsmsim.gateway.config import GatewayConfig
from hsmsim.gateway.protocol import Op, Reader
from hsmsim.gateway import trace
from hsmsim.gateway.dispatch import dispatch
from hsmsim.gateway.reply import Reply
from hsmsim.gateway.routes import direct_done
from hsmsim.gateway.service import Gateway
from hsmsim.gateway.state import Application, new_token
from hsmsim.pkcs11.constants import RV
from hsmsim.pkcs11.errors import Pkcs11Error

log = logging.getLogger(__name__)
trace_log = logging.getLogger("hsmsim.trace")


class Connection(asyncio.Protocol):
    """One module connection: requests are answered in order."""

    def __init__(self, server: "GatewayServer") -> None:
        self.server = server
        self.gw = server.gateway
        self.buf = bytearray()
        self.app: Application | None = None
        self.transport: asyncio.Transport | None = None
        self.pending: deque[bytes] = deque()
        self.busy = False
        self.closed = False
        self._frame = b""  # the request in flight (one per connection), for the call trace
        self._reason = ""  # why it was refused, for the call trace

    # -- asyncio.Protocol --------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # duck-typed, not isinstance(asyncio.Transport): uvloop's transports are not subclasses
        self.transport = transport  # type: ignore[assignment]
        cap = self.server.max_connections
        if cap is not None and len(self.server.connections) >= cap:
            # Over the daemon's descriptor budget for the gateway: closed at once (the module
            # answers CKR_DEVICE_ERROR), so the control socket and the nodes keep theirs.
            self.closed = True
            transport.close()
            return
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        limit = self.gw.config.max_frame
        if not buf and len(data) >= 4:  # the usual case: exactly one whole request
            (n,) = P.LENGTH.unpack_from(data)
            if len(data) == 4 + n and P.REQUEST_HEADER.size <= n <= limit:
                self.pending.append(data[4:])
                if not self.busy:
                    self._pump()
                return
        buf += data
        while len(buf) >= 4:
            (n,) = P.LENGTH.unpack_from(buf)
            if n < P.REQUEST_HEADER.size or n > limit:
                self._drop("bad frame length")
                return
            if len(buf) < 4 + n:
                break
            self.pending.append(bytes(buf[4:4 + n]))
            del buf[:4 + n]
        if not self.busy:
            self._pump()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        app, self.app = self.app, None
        if app is not None:
            app.connections -= 1
            if app.connections <= 0 and self.gw.apps.get(app.token) is app:
                self.server.spawn(self.gw.close_application(app))

    # -- request processing ----------------------------------------------------------------------------
    def _drop(self, why: str) -> None:
        log.info("dropping a gateway connection: %s", why)
        self.pending.clear()
        self.buf.clear()
        if self.transport is not None:
            self.transport.abort()

    def _send(self, request_id: int, op: int, reply: Reply) -> None:
        if self.gw.config.trace_calls and self.app is not None and op != Op.HELLO:
            trace_log.info(trace.line(str(self.app.pid), op, self._frame, reply[0], reply[1],
                                      self._reason))
            self._reason = ""
        if self.transport is not None and not self.closed:
            self.transport.write(P.response(request_id, op, reply[0], reply[1]))

    def _pump(self) -> None:
        while self.pending and not self.busy and not self.closed:
            frame = self._frame = self.pending.popleft()
            request_id, op, flags = P.REQUEST_HEADER.unpack_from(frame)
            body = memoryview(frame)[P.REQUEST_HEADER.size:]
            if self.app is None:
                if op != Op.HELLO:
                    self._drop("first frame is not HELLO")
                    return
                self._hello(request_id, body)
                continue
            if op == Op.HELLO:
                self._send(request_id, op, (int(RV.GENERAL_ERROR), b""))
                continue
            if flags & P.FLAG_DIRECT_DONE:
                direct_done(self.app, op, body)
            try:
                reply = dispatch(self.gw, self.app, op, body)
            except Exception as exc:  # noqa: BLE001 - translated once, here
                reply = self._translate(exc, op)
            if type(reply) is tuple:  # answered at once (most calls)
                self._send(request_id, op, reply)
                if op == Op.Finalize:
                    self._finalize()
                continue
            self.busy = True  # the handler needs the cluster: one awaiting path
            self.server.spawn(self._finish(request_id, op, reply))  # type: ignore[arg-type]

    async def _finish(self, request_id: int, op: int, pending: Awaitable[Reply]) -> None:
        try:
            try:
                reply = await pending
            except Exception as exc:  # noqa: BLE001 - translated once, here
                reply = self._translate(exc, op)
            self._send(request_id, op, reply)
        finally:
            self.busy = False
            self._pump()

    def _translate(self, exc: Exception, op: int) -> Reply:
        if isinstance(exc, Pkcs11Error):
            if exc.rv != RV.BUFFER_TOO_SMALL:
                # Every refusal is logged with its reason (never a secret: Pkcs11Error messages
                # are written for logs), as CloudHSM's client logs name why a call failed.
                self._reason = str(exc)
                log.info("%s refused with %s: %s", trace.name(Op, op, "C_"), exc.rv.name, self._reason or "-")
            return int(exc.rv), b""
        if isinstance(exc, (HsmsimError, OSError, asyncio.TimeoutError)):
            # CloudHSM maps an HSM it cannot use to CKR_FUNCTION_FAILED (UG:troubleshoot-hsm-throttling).
            log.warning("cluster call failed: %s", type(exc).__name__)
            return int(RV.FUNCTION_FAILED), b""
        log.error("gateway bug: %s", type(exc).__name__, exc_info=exc)
        return int(RV.GENERAL_ERROR), b""

    def _hello(self, request_id: int, body: memoryview) -> None:
        try:
            hello = P.Hello.decode(Reader(body))
        except Pkcs11Error:
            self._send(request_id, Op.HELLO, (int(RV.GENERAL_ERROR), b""))
            self._drop("bad handshake")
            return
        if hello.major != P.MAJOR:
            self._send(request_id, Op.HELLO, (int(RV.GENERAL_ERROR), b""))
            self._drop(f"protocol major version {hello.major} is not {P.MAJOR}")
            return
        app = self.gw.apps.get(hello.app_token) if hello.app_token else None
        if app is None:
            app = Application(new_token(), hello.pid)
            app.remote = self.transport is not None and self.transport.get_extra_info("sslcontext") is not None
            self.gw.apps[app.token] = app
        app.connections += 1
        app.minor = hello.minor
        self.app = app
        max_frame = min(hello.max_frame, self.gw.config.max_frame)
        body_out = P.Writer().u16(P.MAJOR).u16(P.MINOR).u32(max_frame).bytes(app.token).done()
        self._send(request_id, Op.HELLO, (int(RV.OK), body_out))

    def _finalize(self) -> None:
        app = self.app
        if app is not None and self.gw.apps.get(app.token) is app:
            self.gw.apps.pop(app.token, None)
            self.server.spawn(self.gw.close_application(app))


class GatewayServer:
    """The running gateway; `close()` stops accepting, drops connections, closes applications."""

    def __init__(self, gateway: Gateway, socket_path: Path) -> None:
        self.gateway = gateway
        self.socket_path = socket_path
        self.connections: set[Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.AbstractServer | None = None
        self._tls_server: asyncio.AbstractServer | None = None
        self.tls_address: tuple[str, int] | None = None
        self.max_connections: int | None = None  # None: no cap

    def spawn(self, coro) -> None:  # type: ignore[no-untyped-def]
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def start(self) -> None:
        path = self.socket_path
        tmp = path.with_name(path.name + ".tmp")
        for p in (tmp, path):
            if p.exists() or p.is_symlink():
                p.unlink()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: Connection(self), str(tmp))
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        cfg = self.gateway.config
        if cfg.tls_listen:
            host, sep, port = cfg.tls_listen.rpartition(":")
            if not sep or not port.isdigit() or not cfg.tls_cert or not cfg.tls_key:
                raise ConfigError("gateway.tls_listen needs host:port, gateway.tls_cert and gateway.tls_key")
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            try:
                ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"gateway TLS certificate/key: {exc}") from None
            self._tls_server = await loop.create_server(lambda: Connection(self), host.strip("[]") or None,
                                                        int(port), ssl=ctx)
            sock = self._tls_server.sockets[0].getsockname()
            self.tls_address = (str(sock[0]), int(sock[1]))

    async def close(self) -> None:
        for srv in (self._server, self._tls_server):
            if srv is not None:
                srv.close()
                await srv.wait_closed()
        self._server = self._tls_server = None
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        await asyncio.sleep(0)
        for app in list(self.gateway.apps.values()):
            await self.gateway.close_application(app)
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=5)
        try:
            self.socket_path.unlink()
        except FileNotFoundError:
            pass


async def start_gateway(cluster: ClusterClient, config: GatewayConfig, socket_path: Path,
                        max_connections: int | None = None) -> GatewayServer:
    """Serves the PKCS#11 module on `socket_path` (created 0600) until `close()`, with at most
    `max_connections` module connections open at once (None: no cap)."""
    gateway = Gateway(cluster, config)
    await gateway.prepare()
    server = GatewayServer(gateway, Path(socket_path))
    server.max_connections = max_connections
    await server.start()
    return server
