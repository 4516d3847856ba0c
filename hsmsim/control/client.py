"""A blocking client of the control API, used by the CLI and the pytest plugin."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hsmsim.control.protocol import ControlError, encode, recv_frame

ProgressFn = Callable[[int, int, str], None]


class ControlClient:
    def __init__(self, socket_path: Path, timeout: float = 120.0) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout

    def call(self, op: str, progress: ProgressFn | None = None, timeout: float | None = None,
             **args: Any) -> Any:
        """Send one request and return its result; ControlError on refusal."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout or self.timeout)
        try:
            try:
                sock.connect(str(self.socket_path))
            except (FileNotFoundError, ConnectionRefusedError):
                raise ControlError(f"no hsmsim daemon is running for {self.socket_path.parent} "
                                   "(start it with `hsmsim up`)", "unavailable") from None
            except OSError as exc:
                raise ControlError(f"cannot reach the daemon at {self.socket_path}: "
                                   f"{exc.strerror}", "unavailable") from None
            sock.sendall(encode({"op": op, "args": args}))
            while True:
                try:
                    frame = recv_frame(sock)
                except socket.timeout:
                    raise ControlError(f"the daemon did not answer `{op}` in time",
                                       "timeout") from None
                if "progress" in frame:
                    p = frame["progress"]
                    if progress is not None and isinstance(p, dict):
                        progress(int(p.get("done", 0)), int(p.get("total", 0)),
                                 str(p.get("label", "")))
                    continue
                if frame.get("ok") is True:
                    return frame.get("result")
                raise ControlError(str(frame.get("error", "request failed")),
                                   str(frame.get("kind", "error")))
        finally:
            sock.close()

    def alive(self) -> bool:
        try:
            self.call("ping", timeout=2.0)
            return True
        except ControlError:
            return False
