"""Fixtures for the cluster tests: a daemon running in this process (its event loop in a
thread) over real node processes with real SoftHSM2 tokens, so that tests can call the
ClusterClient directly and inspect every node."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from hsmsim.cluster.api import Login
from hsmsim.cluster.cluster import Cluster
from hsmsim.cluster.state import StateDir, prepare_new_cluster
from hsmsim.cluster.supervisor import Supervisor
from hsmsim.daemon.main import Daemon, DaemonOptions
from hsmsim.pkcs11.constants import Attribute, Mechanism, UserType
from hsmsim.pkcs11.params import MechanismSpec

T = TypeVar("T")

AES_GEN = MechanismSpec(int(Mechanism.AES_KEY_GEN))


def aes_template(token: bool = True, label: str = "k") -> dict[int, Any]:
    return {int(Attribute.TOKEN): token, int(Attribute.VALUE_LEN): 32,
            int(Attribute.LABEL): label, int(Attribute.ENCRYPT): True,
            int(Attribute.DECRYPT): True, int(Attribute.SENSITIVE): True,
            int(Attribute.EXTRACTABLE): False}


class Harness:
    """A daemon in a background event loop."""

    def __init__(self, root: Path, azs: int = 3, overrides: tuple[tuple[str, Any], ...] = (),
                 new: bool = True) -> None:
        self.root = root
        self.state = StateDir(root)
        self.overrides = overrides
        if new:
            prepare_new_cluster(self.state, [f"us-east-1{chr(97 + i)}" for i in range(azs)], 1,
                                "admin-password-1", "cu-password-1")
        self._log = logging.FileHandler(root / "daemon.log")
        self._log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("hsmsim").addHandler(self._log)
        logging.getLogger("hsmsim").setLevel(logging.INFO)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.daemon = Daemon(DaemonOptions(root, None, overrides, services=False), dict(os.environ))
        self.call(self.daemon.start(), timeout=120)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def cluster(self) -> Cluster:
        assert self.daemon.cluster is not None
        return self.daemon.cluster

    @property
    def sup(self) -> Supervisor:
        assert self.daemon.supervisor is not None
        return self.daemon.supervisor

    @property
    def hsm_ids(self) -> list[str]:
        return list(self.cluster.members)

    def login(self, user: str = "crypto_user", password: str = "cu-password-1",
              user_type: UserType = UserType.USER) -> Login:
        return self.call(self.cluster.login(user_type, user, password))

    def inventories(self) -> dict[str, dict[int, bytes]]:
        async def inv() -> dict[str, dict[int, bytes]]:
            out = {}
            for m in self.cluster.usable():
                out[m.hsm_id] = {e.handle: e.fingerprint for e in await m.client.inventory()}  # type: ignore[union-attr]
            return out
        return self.call(inv())

    def crash(self, hsm_id: str) -> None:
        pid = self.cluster.members[hsm_id].pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)

    def wait_converged(self, timeout: float = 30.0) -> float:
        """Seconds until every live member is healthy with no sync lag."""
        async def converged() -> bool:  # evaluated on the daemon's loop, not this thread
            c = self.cluster
            live = [m for m in c.members.values() if not (m.killed or m.paused or m.partitioned)]
            return all(m.usable and m.converged and c.sync_lag(m) == 0 for m in live) \
                and not self.sup.reconciler.reconciling()

        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.call(converged()):
                return time.monotonic() - t0
            time.sleep(0.05)
        st = {m.hsm_id: (m.condition(), self.cluster.sync_lag(m), m.last_error)
              for m in self.cluster.members.values()}
        raise AssertionError(f"cluster did not converge within {timeout}s: {st}")

    def close(self) -> None:
        try:
            self.call(self.daemon.close(), timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            logging.getLogger("hsmsim").removeHandler(self._log)
            self._log.close()


@pytest.fixture(scope="session")
def cluster3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    """One 3-HSM cluster shared by the tests that leave no fault behind."""
    h = Harness(tmp_path_factory.mktemp("c3") / "state")
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def fresh3(tmp_path: Path) -> Iterator[Harness]:
    """A 3-HSM cluster for one test that injects faults."""
    h = Harness(tmp_path / "state")
    try:
        yield h
    finally:
        h.close()
