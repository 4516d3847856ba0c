"""The daemon side of the control API: a Unix socket (0600) that decodes requests, calls one
handler per operation and translates errors once into control responses."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from hsmsim.control.protocol import ControlError, ProtocolError, encode, read_frame
from hsmsim.errors import HsmsimError
from hsmsim.pkcs11.errors import Pkcs11Error

log = logging.getLogger("hsmsim.control")

Progress = Callable[[int, int, str], Awaitable[None]]
Handler = Callable[[dict[str, Any], Progress], Awaitable[Any]]


class ControlServer:
    """Serves `handlers` (op name -> coroutine(args, progress)) on a Unix socket."""

    def __init__(self, handlers: dict[str, Handler]) -> None:
        self.handlers = handlers
        self._server: asyncio.AbstractServer | None = None

    async def start(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    req = await read_frame(reader)
                except ProtocolError as exc:
                    writer.write(encode({"ok": False, "error": str(exc), "kind": "protocol"}))
                    await writer.drain()
                    return
                if req is None:
                    return
                writer.write(encode(await self._dispatch(req, writer)))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _dispatch(self, req: dict[str, Any], writer: asyncio.StreamWriter) -> dict[str, Any]:
        op, args = req.get("op"), req.get("args", {})
        if not isinstance(op, str) or not isinstance(args, dict):
            return {"ok": False, "error": "a request needs a string `op` and an object `args`",
                    "kind": "protocol"}
        handler = self.handlers.get(op)
        if handler is None:
            return {"ok": False, "error": f"unknown control operation {op!r}", "kind": "protocol"}

        async def progress(done: int, total: int, label: str) -> None:
            writer.write(encode({"progress": {"done": done, "total": total, "label": label}}))
            await writer.drain()

        try:
            return {"ok": True, "result": await handler(args, progress)}
        except ControlError as exc:
            return {"ok": False, "error": str(exc), "kind": exc.kind}
        except Pkcs11Error as exc:
            return {"ok": False, "error": f"{exc} (CKR_{exc.rv.name})", "kind": f"CKR_{exc.rv.name}"}
        except HsmsimError as exc:
            return {"ok": False, "error": str(exc), "kind": type(exc).__name__}
        except (KeyError, TypeError, ValueError) as exc:
            return {"ok": False, "error": f"bad arguments for {op}: {exc}", "kind": "arguments"}
        except Exception:  # a bug: log it, keep serving
            log.exception("control operation %s failed", op)
            return {"ok": False, "error": f"internal error in {op} (see daemon.log)",
                    "kind": "internal"}
