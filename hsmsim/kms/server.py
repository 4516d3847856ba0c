"""The KMS HTTP server: an aiohttp application in the daemon's event loop that serves
`POST /` (AWS JSON 1.1, `X-Amz-Target: TrentService.*`), stamps `x-amzn-RequestId` on every
response, enforces the request size limit, and runs the background sweep (scheduled deletions,
automatic rotation). `start_kms` is what the daemon calls; `python -m hsmsim.kms.server` is not
provided: the endpoint always runs inside the daemon, next to its cluster."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from http import HTTPStatus
from pathlib import Path

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from hsmsim.cluster.api import ClusterClient
from hsmsim.kms import errors as e
from hsmsim.kms import wire
from hsmsim.kms.audit import AuditLog
from hsmsim.kms.clock import ClockError
from hsmsim.kms.config import KmsConfig
from hsmsim.kms.runtime import Kms
from hsmsim.kms.service import HttpRequest, KmsService
from hsmsim.kms.store import Store

log = logging.getLogger("hsmsim.kms")


# aiohttp's own log of a request it could not parse quotes the offending bytes (a header line
# with a secret in it, say). Its records go through this logger, which keeps the reason only.
http_log = logging.getLogger("hsmsim.kms.http")


class _Redact(logging.Filter):
    """Rewrites aiohttp's "Error handling request" records for unparsable requests: the reason
    (e.g. "Invalid header token") and the peer, never the request's bytes or a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            reason = str(exc.message).split(":", 1)[0].strip() if exc.message else ""
            args = record.args if isinstance(record.args, tuple) else ()
            peer = args[0] if len(args) == 1 and isinstance(args[0], str) else "?"
            record.msg = "bad HTTP request from %s (%d %s: %s)"
            record.args = (peer, exc.code, type(exc).__name__, reason[:80] or "unparsable")
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


http_log.addFilter(_Redact())


def _raw_error(err: wire.WireError) -> bytes:
    """A whole HTTP/1.1 error response for a connection that no aiohttp handler serves."""
    body = err.body()
    return (f"HTTP/1.1 {err.status} {HTTPStatus(err.status).phrase}\r\n"
            f"Content-Type: {wire.CONTENT_TYPE}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


_REFUSED = _raw_error(wire.to_wire(e.Overloaded("Too many open connections to the KMS endpoint")))


class _Refused(asyncio.Protocol):
    """A connection over the endpoint's cap: answered 503 and closed at once, so that it holds
    no descriptor the daemon needs for its gateway, control and node connections.

    FIDELITY: AWS's front-end connection limits are undocumented; ours answers 503
    ServiceUnavailableException (which SDKs retry; status and code from `wire.ERROR_TABLE`)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # duck-typed, not isinstance(asyncio.WriteTransport): uvloop's transports are not subclasses
        transport.write(_REFUSED)  # type: ignore[attr-defined]
        transport.close()


class KmsServer:
    """The running endpoint; `close()` stops it and releases the store and cluster logins."""

    def __init__(self, service: KmsService, runner: web.AppRunner, url: str,
                 listener: asyncio.AbstractServer | None = None) -> None:
        self.service = service
        self._runner = runner
        self._listener = listener
        self.url = url
        self.max_connections = 0  # the cap in force (set by start_kms)
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def open_connections(self) -> int:
        """HTTP connections being served now (refused ones are not counted)."""
        http = self._runner.server
        return len(http.connections) if http is not None else 0

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def start_sweeper(self, every: float) -> None:
        async def loop() -> None:
            while True:
                await asyncio.sleep(every)
                try:
                    await self.service.sweep()
                except Exception:
                    log.exception("KMS sweep failed")
        self._sweeper = asyncio.get_running_loop().create_task(loop())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._listener is not None:
            self._listener.close()
        await self._runner.cleanup()
        kms = self.service.kms
        for regional in kms.regional():
            regional.flush_usage()
            await regional.keystores.close()
        await kms.fleet.close()
        self.service.audit.close()
        kms.store.close()


def _response(status: int, body: bytes, request_id: str) -> web.Response:
    return web.Response(status=status, body=body, headers={
        "x-amzn-RequestId": request_id, "Content-Type": wire.CONTENT_TYPE})


def _error(exc: e.KmsError, request_id: str) -> web.Response:
    """The response for a domain error, from the wire layer's one table."""
    err = wire.to_wire(exc)
    return _response(err.status, err.body(), request_id)


def make_app(service: KmsService) -> web.Application:
    max_size = service.kms.config.max_request_bytes
    idle_timeout = service.kms.config.idle_timeout_seconds

    async def handle(request: web.Request) -> web.Response:
        request_id = str(uuid.uuid4())
        if request.method != "POST":
            return _error(e.UnknownOperation(""), request_id)
        if request.content_length is not None and request.content_length > max_size:
            return _error(e.TooLarge(f"Request body exceeds {max_size} bytes"), request_id)
        try:
            async with asyncio.timeout(idle_timeout):
                body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _error(e.TooLarge(f"Request body exceeds {max_size} bytes"), request_id)
        except TimeoutError:
            # FIDELITY: AWS's front end answers a body that stalls with a bare 408; ours has a
            # JSON body (RequestTimeoutException) and closes the connection.
            resp = _error(e.RequestTimeout(
                f"The request body did not arrive within {idle_timeout:g} seconds"), request_id)
            resp.force_close()
            return resp
        result = await service.handle(HttpRequest(
            method=request.method, path=request.raw_path.split("?", 1)[0], query=request.query_string,
            headers=dict(request.headers), body=body, source_ip=request.remote or "",
            request_id=request_id))
        return _response(result.status, result.body, request_id)

    async def clock(request: web.Request) -> web.Response:
        """Test control: {"advance_seconds": N} moves the KMS clock forward, then sweeps.
        Authenticated like every KMS call (SigV4; verified in strict mode)."""
        request_id = str(uuid.uuid4())
        try:
            body = await request.read()
            service.authenticate(HttpRequest(
                method=request.method, path=request.raw_path.split("?", 1)[0],
                query=request.query_string, headers=dict(request.headers), body=body,
                source_ip=request.remote or "", request_id=request_id))
            data = wire.parse_json(body or b"{}")
            if not isinstance(data, dict):
                raise e.Malformed("Expected a JSON object")
            try:
                service.kms.clock.advance(data.get("advance_seconds", 0))
            except ClockError as exc:
                raise e.Invalid(str(exc)) from None
        except e.KmsError as exc:
            return _error(exc, request_id)
        service.kms.store.set_meta("clock_offset", repr(service.kms.clock.offset))
        await service.sweep()
        return _response(200, json.dumps({"now": service.kms.clock.now(),
                                          "offset": service.kms.clock.offset}).encode(), request_id)

    async def reset(request: web.Request) -> web.Response:
        """moto_server's `POST /moto-api/reset` (test suites written for moto point here
        unchanged): the KMS starts over. FIDELITY: as moto, it takes an unsigned request,
        unless `[kms] strict_sigv4` is on: then it is verified like every KMS call. Off with
        `[kms] clock_control = false`, as every test endpoint."""
        request_id = str(uuid.uuid4())
        try:
            body = await request.read()
            if service.kms.config.strict_sigv4 or "authorization" in {
                    k.lower() for k in request.headers}:
                service.authenticate(HttpRequest(
                    method=request.method, path=request.raw_path.split("?", 1)[0],
                    query=request.query_string, headers=dict(request.headers), body=body,
                    source_ip=request.remote or "", request_id=request_id))
        except e.KmsError as exc:
            return _error(exc, request_id)
        await service.reset()
        return _response(200, json.dumps({"status": "ok"}).encode(), request_id)

    async def refused(request: web.Request) -> web.Response:
        return _error(e.NoSuchEndpoint("No such endpoint: the hsmsim test endpoints are POST "
                                       "/_hsmsim/clock and POST /moto-api/reset, served while "
                                       "[kms] clock_control is on"), str(uuid.uuid4()))

    app = web.Application(client_max_size=max_size)
    if service.kms.config.clock_control:
        app.router.add_post("/_hsmsim/clock", clock)
        app.router.add_post("/moto-api/reset", reset)
    app.router.add_route("*", "/_hsmsim/{tail:.*}", refused)
    app.router.add_route("*", "/moto-api/{tail:.*}", refused)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def start_kms(cluster: ClusterClient, config: KmsConfig, state_dir: Path,
                    max_connections: int | None = None) -> KmsServer:
    """Opens the store in `state_dir/kms/`, reconnects custom key stores that were connected,
    and serves the endpoint on config.host:config.port (port 0 picks a free port), with at most
    min(config.max_connections, max_connections) connections open at once."""
    store = Store(state_dir / "kms" / "kms.sqlite3", config.region)  # a schema-1 store migrates to this Region
    kms = Kms(cluster, config, state_dir, store)
    kms.open_stored_regions()
    service = KmsService(kms, AuditLog(state_dir))
    # Keep-alive clients must not hold the daemon's shutdown for long. keepalive_timeout also
    # bounds how long a connection may take to send a whole request header (aiohttp closes a
    # connection that has no complete request when it expires): slow clients are closed.
    runner = web.AppRunner(make_app(service), access_log=None, handle_signals=False, shutdown_timeout=2.0,
                           keepalive_timeout=config.idle_timeout_seconds, logger=http_log)
    await runner.setup()
    http = runner.server
    assert http is not None
    cap = min(config.max_connections, max_connections or config.max_connections)

    def protocol() -> asyncio.BaseProtocol:
        if len(http.connections) >= cap:
            return _Refused()
        return http()

    try:
        listener = await asyncio.get_running_loop().create_server(
            protocol, config.host, config.port, reuse_address=True)
    except OSError:
        await runner.cleanup()
        store.close()
        raise
    port = config.port
    for sock in listener.sockets or ():
        port = int(sock.getsockname()[1])
    server = KmsServer(service, runner, f"http://{config.host}:{port}", listener)
    server.max_connections = cap
    for regional in kms.regional():
        await regional.keystores.resume()
    try:
        await service.sweep()
    except Exception:
        log.exception("KMS start-up sweep failed; the periodic sweep will retry")
    server.start_sweeper(config.rotation_check_seconds)
    return server
