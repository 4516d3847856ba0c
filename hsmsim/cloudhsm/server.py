"""The CloudHSMv2 HTTP endpoint on the daemon, beside the KMS: reads a request in either wire
protocol (AWS JSON 1.1 on `POST /`, Smithy RPC v2 CBOR on `POST /service/BaldrApiService/
operation/<Op>`), authenticates it (SigV4 header parsed, its Region picked; the signature is
not verified, as the KMS in its default mode), validates it, runs the operation on the plane,
and answers in the request's protocol with `x-amzn-RequestId`. Errors are translated once,
here. `start_cloudhsm` is what the daemon calls."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import re
import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web

from hsmsim.cloudhsm import errors as e
from hsmsim.cloudhsm import hosting, wire
from hsmsim.cloudhsm.config import CloudHsmConfig
from hsmsim.cloudhsm.ops import HANDLERS
from hsmsim.cloudhsm.plane import Plane

if TYPE_CHECKING:
    from hsmsim.daemon.main import Daemon

log = logging.getLogger("hsmsim.cloudhsm")

MAX_REQUEST_BYTES = 256 * 1024
_REGION = re.compile(r"[a-z]{2}(-gov)?-[a-z]+-\d")


def _region(headers: dict[str, str]) -> str:
    from hsmsim.kms import errors as kms_errors
    from hsmsim.kms import sigv4
    try:
        cred = sigv4.parse_authorization(headers.get("authorization"))
    except kms_errors.KmsError as exc:
        raise e.AuthIncomplete(exc.message) from None
    if cred is None:
        raise e.AuthMissing("Missing Authentication Token")
    if not _REGION.fullmatch(cred.region):
        raise e.AuthBadSignature(f"Credential should be scoped to a valid region, not '{cred.region}'. ")
    return cred.region


async def handle(plane: Plane, method: str, path: str, headers: dict[str, str],
                 body: bytes | None) -> tuple[int, bytes, bool]:
    """One request (`body` None: it was too large to read): (HTTP status, body, body is CBOR).
    Never raises."""
    lower = {k.lower(): v for k, v in headers.items()}
    is_cbor = path.startswith("/service/") or "cbor" in lower.get("content-type", "")
    op = "Unknown"
    try:
        if method != "POST":
            raise e.UnknownOperation("")
        if body is None or len(body) > MAX_REQUEST_BYTES:
            raise e.TooLarge(f"Request body exceeds {MAX_REQUEST_BYTES} bytes")
        op = (wire.operation_from_path(path) if path.startswith("/service/")
              else wire.operation_from_target(lower.get("x-amz-target")))
        region = _region(lower)
        params = wire.decode_request(op, wire.parse_body(body, is_cbor))
        handler = HANDLERS[op]
        output = await handler.run(plane, region, wire.typed_input(op, params))
        return 200, wire.encode(output, is_cbor), is_cbor
    except e.CloudHsmError as exc:
        err = wire.to_wire(exc)
    except Exception:
        log.exception("CloudHSMv2 %s failed", op)
        err = wire.to_wire(e.Internal(""))
    return err.status, wire.encode(err.fields(), is_cbor), is_cbor


class CloudHsmServer:
    def __init__(self, plane: Plane, runner: web.AppRunner, url: str) -> None:
        self.plane = plane
        self._runner = runner
        self.url = url

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    async def close(self) -> None:
        await self._runner.cleanup()
        for t in list(self.plane.tasks):
            t.cancel()
        await asyncio.gather(*self.plane.tasks, return_exceptions=True)
        await asyncio.gather(*self.plane.closing, return_exceptions=True)  # closes a task began
        for cid in list(self.plane.hosted):
            with contextlib.suppress(Exception):
                await hosting.unhost(self.plane, cid)


def make_app(plane: Plane) -> web.Application:
    async def serve(request: web.Request) -> web.Response:
        request_id = str(uuid.uuid4())
        try:
            if request.content_length is not None and request.content_length > MAX_REQUEST_BYTES:
                raise web.HTTPRequestEntityTooLarge(max_size=MAX_REQUEST_BYTES,
                                                    actual_size=request.content_length)
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            body = None
        status, out, is_cbor = await handle(plane, request.method, request.raw_path.split("?", 1)[0],
                                            dict(request.headers), body)
        headers = {"x-amzn-RequestId": request_id,
                   "Content-Type": wire.CBOR_CONTENT_TYPE if is_cbor else wire.JSON_CONTENT_TYPE}
        if is_cbor:
            headers["smithy-protocol"] = "rpc-v2-cbor"
        return web.Response(status=status, body=out, headers=headers)

    app = web.Application(client_max_size=MAX_REQUEST_BYTES + 1)
    app.router.add_route("*", "/{tail:.*}", serve)
    return app


async def start_cloudhsm(daemon: "Daemon", warnings: list[str]) -> CloudHsmServer:
    """The plane over the daemon's cluster, the clusters it hosts restarted (in the
    background), and the endpoint on [cloudhsm] host:port."""
    from hsmsim.config import resolve_section
    config = resolve_section(CloudHsmConfig, "cloudhsm", daemon.file_data, daemon.environ)
    plane = Plane(daemon)
    runner = web.AppRunner(make_app(plane), access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE or config.port == 0:
            await runner.cleanup()
            raise
        warnings.append(f"the CloudHSMv2 port {config.port} is in use; the endpoint took a free "
                        "port (`hsmsim env` exports it; set [cloudhsm] port to choose)")
        site = web.TCPSite(runner, config.host, 0, reuse_address=True)
        await site.start()
    server: Any = site._server  # aiohttp keeps the listening server here
    port = int(server.sockets[0].getsockname()[1])
    for cid, rec in plane.data["clusters"].items():
        if rec.get("primary") or rec["phase"] == "DELETED" or rec.get("parked"):
            continue
        if plane.cluster_dir(cid).exists():
            plane.spawn(hosting.host(plane, cid), f"restarting cluster {cid}")
    return CloudHsmServer(plane, runner, f"http://{config.host}:{port}")
