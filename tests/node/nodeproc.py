"""Test helper: real `hsmsim node serve` processes in temporary state directories."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from hsmsim.node.client import NodeClient
from hsmsim.pkcs11.constants import UserType

T = TypeVar("T")
PASSWORDS = {"admin": "adminpass1", "crypto_user": "userpass01", "alice": "alicepass1",
             "bob": "bobpass001", "carol": "carolpass1", "admin2": "admin2pass"}


class NodeProc:
    """One node process. `start()` waits for its READY line."""

    def __init__(self, state: Path, hsm_id: str, az: str, secret_file: Path,
                 init: str | None = "new") -> None:
        self.state = state
        self.hsm_id = hsm_id
        self.az = az
        self.secret_file = secret_file
        self.init = init
        self.sock = state / "nodes" / f"{hsm_id}.sock"
        self.address = f"unix:{self.sock}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.bound = self.address  # the address from the READY line (tcp port 0 resolved)
        self.extra_args: list[str] = []

    @property
    def dir(self) -> Path:
        return self.state / "nodes" / self.hsm_id

    @property
    def secret(self) -> bytes:
        return self.secret_file.read_bytes().strip()

    def start(self, timeout: float = 30.0) -> "NodeProc":
        (self.state / "nodes").mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "hsmsim", "node", "serve", "--state", str(self.state),
                "--hsm-id", self.hsm_id, "--az", self.az, "--listen", self.address,
                "--cluster-secret-file", str(self.secret_file)]
        if self.init:
            args += ["--init", self.init]
        args += self.extra_args
        env = {k: v for k, v in os.environ.items() if not k.startswith("HSMSIM_")}
        self.log = self.state / "nodes" / f"{self.hsm_id}.log"
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, env=env)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if r:
                line = self.proc.stdout.readline()
                if line.startswith(b"READY "):
                    self.bound = line.split()[1].decode()
                    return self
            if self.proc.poll() is not None:
                break
        err = self.log.read_text(errors="replace")[-3000:]
        self.kill()
        raise RuntimeError(f"node {self.hsm_id} did not start: {line!r} {err}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def restart(self) -> "NodeProc":
        self.kill()
        return self.start()

    async def client(self, cluster: bool = True) -> NodeClient:
        return await NodeClient.connect(self.address,
                                        cluster_secret=self.secret if cluster else None)

    async def login(self, username: str, cluster: bool = False) -> tuple[NodeClient, int]:
        c = await self.client(cluster)
        role = UserType.SO if username.startswith("admin") else UserType.USER
        li = await c.login(role, username, PASSWORDS[username])
        return c, li.login_id


def run(coro_fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    return asyncio.run(coro_fn(*args))  # type: ignore[arg-type]


def write_secret(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_bytes(os.urandom(32).hex().encode())
    os.chmod(path, 0o600)
    return path
