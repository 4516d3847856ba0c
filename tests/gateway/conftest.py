"""Fixtures for the gateway ring: the gateway service driven in-process (no C module, no
socket), over a daemon's cluster in this process (its event loop in a thread) with real node
processes and real SoftHSM2 tokens. Requests are built as the module builds them
(docs/gateway-protocol.md) and go through the gateway's one opcode table."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from hsmsim.cluster.state import StateDir, prepare_new_cluster
from hsmsim.daemon.main import Daemon, DaemonOptions
from hsmsim.gateway.config import GatewayConfig
from hsmsim.gateway.dispatch import dispatch
from hsmsim.gateway.protocol import Op, Writer
from hsmsim.gateway.service import Gateway
from hsmsim.gateway.state import Application, new_token
from hsmsim.pkcs11 import attributes
from hsmsim.pkcs11.constants import SessionFlag, UserType
from hsmsim.pkcs11.errors import Pkcs11Error

T = TypeVar("T")
CU_PASSWORD = "cu-password-1"


class Loop:
    """A daemon (cluster only, services off) on an event loop in a background thread."""

    def __init__(self, root: Path) -> None:
        prepare_new_cluster(StateDir(root), ["us-east-1a", "us-east-1b"], 1, "admin-password-1",
                            CU_PASSWORD)
        self._log = logging.FileHandler(root / "daemon.log")
        logging.getLogger("hsmsim").addHandler(self._log)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.daemon = Daemon(DaemonOptions(root, None, (), services=False), dict(os.environ))
        self.call(self.daemon.start(), timeout=120)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        try:
            self.call(self.daemon.close(), timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            logging.getLogger("hsmsim").removeHandler(self._log)
            self._log.close()


class Client:
    """One application of an in-process gateway: `call(op, body)` answers (rv, reply body) as
    the server would send them (a Pkcs11Error becomes its return value)."""

    def __init__(self, loop: Loop, config: GatewayConfig) -> None:
        self.loop = loop
        assert loop.daemon.cluster is not None
        self.gw = Gateway(loop.daemon.cluster, config)
        self.app = Application(new_token(), os.getpid())
        self.gw.apps[self.app.token] = self.app

    def call(self, op: Op, body: bytes) -> tuple[int, bytes]:
        async def run() -> tuple[int, bytes]:
            try:
                reply = dispatch(self.gw, self.app, int(op), memoryview(body))
                if type(reply) is not tuple:
                    reply = await reply  # type: ignore[misc]
                return reply  # type: ignore[return-value]
            except Pkcs11Error as exc:
                return int(exc.rv), b""
        return self.loop.call(run())

    def open_session(self, login: bool = True) -> int:
        flags = int(SessionFlag.SERIAL_SESSION | SessionFlag.RW_SESSION)
        rv, body = self.call(Op.OpenSession, Writer().u64(self.gw.config.slot_id).u64(flags).done())
        assert rv == 0
        handle = int.from_bytes(body[:8], "little")
        if login and self.app.login is None:
            pin = f"crypto_user:{CU_PASSWORD}".encode()
            rv, _ = self.call(Op.Login, Writer().u64(handle).u64(int(UserType.USER)).bytes(pin).done())
            assert rv == 0
        return handle

    def close(self) -> None:
        self.loop.call(self.gw.close_application(self.app))


def template(*attrs: tuple[int, Any]) -> bytes:
    w = Writer().u32(len(attrs))
    for attr, value in attrs:
        w.u64(int(attr)).bytes(attributes.encode(int(attr), value))
    return w.done()


def mechanism(mech: int, kind: int = 0, param: bytes = b"") -> bytes:
    """The flat mechanism encoding: u64 mechanism, u8 parameter kind, the kind's fields."""
    return Writer().u64(int(mech)).u8(kind).done() + param


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loop]:
    try:
        from hsmsim.resources import softhsm_library
        softhsm_library()
    except FileNotFoundError as exc:
        pytest.skip(f"SoftHSM2 is not installed: {exc}")
    lp = Loop(tmp_path_factory.mktemp("gwcluster"))
    try:
        yield lp
    finally:
        lp.close()


@pytest.fixture
def client(loop: Loop) -> Iterator[Client]:
    c = Client(loop, GatewayConfig())
    try:
        yield c
    finally:
        c.close()
