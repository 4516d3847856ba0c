"""One HSM of the cluster as the daemon sees it: its node process (spawn, kill, pause,
restart), its NodeClient connection as the cluster principal, its health and its faults."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hsmsim import files
from hsmsim.cluster.state import StateDir
from hsmsim.errors import HsmsimError
from hsmsim.node.client import NodeClient, NodeUnavailable

log = logging.getLogger("hsmsim.cluster")

# CloudHSMv2 HsmState values.
CREATE_IN_PROGRESS = "CREATE_IN_PROGRESS"
ACTIVE = "ACTIVE"
DEGRADED = "DEGRADED"
DELETE_IN_PROGRESS = "DELETE_IN_PROGRESS"
DELETED = "DELETED"


# Logins sent to one HSM at a time (each costs a slow password hash on the node; the node
# hashes HASH_THREADS at a time, hsmsim.node.ops_users). FIDELITY: how CloudHSM's client paces
# logins is not documented.
LOGIN_WINDOW = 4


class MemberDown(HsmsimError):
    """The member cannot take requests now (stopped, paused, partitioned, unreachable)."""


@dataclass(frozen=True)
class MemberStatus:
    hsm_id: str
    az: str
    state: str
    condition: str  # healthy | converging | down | killed | paused | partitioned | starting
    pid: int | None
    keys: int
    sync_lag: int
    last_error: str | None
    restarts: int
    latency_ms: int
    throttle_rps: int


class Member:
    """A node process and the daemon's connection to it."""

    def __init__(self, hsm_id: str, az: str, state: StateDir, python: str = sys.executable,
                 adding: bool = False) -> None:
        self.hsm_id, self.az, self.state, self.python = hsm_id, az, state, python
        self.proc: asyncio.subprocess.Process | None = None
        self.client: NodeClient | None = None
        self.generation = 0  # bumps on every new connection: node login ids die with it
        # The one HSM state every view reads (`hsmsim status`, ClusterInfo, DescribeClusters).
        # An HSM of the cluster's spec is CREATE_IN_PROGRESS only until its node first answers;
        # one being added (`adding`: `hsm add`, CreateHsm) stays CREATE_IN_PROGRESS until
        # Supervisor.add_hsm has cloned and reconciled it (it then holds every key), as a new
        # CloudHSM HSM is ACTIVE once cloned from the cluster's backup.
        self.hsm_state = CREATE_IN_PROGRESS
        self.adding = adding
        self.killed = False  # stopped on purpose (`hsm kill`): not restarted by supervision
        self.paused = False
        self.partitioned = False
        self.removing = False
        self.converged = False  # reconciled since the last (re)connection
        self.last_error: str | None = None
        self.restarts = 0
        self.start_failures = 0
        self.ping_failures = 0
        self.inflight = 0  # node requests awaiting an answer (load-aware placement)
        self.sync_window = asyncio.Semaphore(2)  # background key-sync copies in flight
        # Logins in flight to this HSM: the rest queue here, not on the node, so that a storm
        # of logins waits its turn instead of running into the request timeout there.
        self.login_window = asyncio.Semaphore(LOGIN_WINDOW)
        self.pending_sync = 0  # background copies queued or running
        self.replacements = 0
        self.latency_ms = 0
        self.throttle_rps = 0
        self.logins: dict[int, int] = {}  # cluster login id -> node login id (this generation)
        self.adopted_pid: int | None = None  # a node left running by a previous daemon
        self.login_refused: set[int] = set()  # cluster logins this HSM refused (this generation)
        self.login_retried: set[int] = set()  # ...and of those, the ones tried once more since
        self.login_pending: dict[int, asyncio.Future[int]] = {}
        self.down_since: float | None = time.monotonic()
        self._lock = asyncio.Lock()

    # -- paths -----------------------------------------------------------------------------------
    @property
    def dir(self) -> Path:
        return self.state.node_dir(self.hsm_id)

    @property
    def address(self) -> str:
        return f"unix:{self.state.node_socket(self.hsm_id)}"

    @property
    def pid_file(self) -> Path:
        return self.dir / "node.pid"

    @property
    def pid(self) -> int | None:
        if self.proc is not None:
            return self.proc.pid if self.proc.returncode is None else None
        if self.adopted_pid is not None and _alive(self.adopted_pid):
            return self.adopted_pid
        return None

    # -- health ----------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self.client is not None and not self.client.closed

    def connection(self) -> NodeClient:
        """The current connection to the node; NodeUnavailable when there is none (the caller
        then treats the HSM as lost, as it would a connection that fails mid-call)."""
        client = self.client
        if client is None:
            raise NodeUnavailable(f"{self.hsm_id} is not connected")
        return client

    @property
    def usable(self) -> bool:
        """May take requests for objects it holds."""
        return (self.connected and not self.paused and not self.partitioned and not self.killed
                and not self.removing)

    @property
    def routable(self) -> bool:
        """May take new work (creation, finds): usable and caught up."""
        return self.usable and self.converged

    def answering(self, within: float) -> bool:
        """The node answered something (a health check, another request) on the current
        connection in the last `within` seconds: a slow request there is slow work, not a
        dead HSM."""
        client = self.client
        return (client is not None and not client.closed
                and time.monotonic() - client.last_heard < within)

    def condition(self) -> str:
        if self.removing:
            return "removing"
        if self.killed:
            return "killed"
        if self.partitioned:
            return "partitioned"
        if self.paused:
            return "paused"
        if not self.connected:
            return "starting" if self.hsm_state == CREATE_IN_PROGRESS else "down"
        return "healthy" if self.converged else "converging"

    def mark_down(self, why: str) -> None:
        """The connection failed: forget it (the supervisor reconnects or restarts)."""
        if self.client is not None:
            client, self.client = self.client, None
            asyncio.get_running_loop().create_task(_close_quietly(client))
            log.warning("%s: down (%s)", self.hsm_id, why)
        self.last_error = why
        self.converged = False
        self.logins.clear()
        if self.down_since is None:
            self.down_since = time.monotonic()
        if self.hsm_state == ACTIVE:
            self.hsm_state = DEGRADED

    # -- process ---------------------------------------------------------------------------------
    def _command(self, init: str | None) -> list[str]:
        cmd = [self.python, "-m", "hsmsim", "node", "serve", "--state", str(self.state.root),
               "--hsm-id", self.hsm_id, "--az", self.az, "--listen", self.address,
               "--cluster-secret-file", str(self.state.cluster_secret)]
        if init is not None:
            cmd += ["--init", init]
        return cmd

    async def spawn(self, init: str | None, timeout: float) -> None:
        """Start the node process and connect to it as the cluster principal."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        sock = self.state.node_socket(self.hsm_id)
        sock.unlink(missing_ok=True)
        logf = files.open_append(self.dir / "node.log")  # 0600 whatever the umask
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self._command(init), stdin=asyncio.subprocess.DEVNULL, stdout=logf,
                stderr=logf, start_new_session=True, env=_node_env())
        finally:
            logf.close()
        self.adopted_pid = None
        files.write_private(self.pid_file, f"{self.proc.pid}\n")
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.returncode is not None:
                raise MemberDown(f"node {self.hsm_id} exited with status {self.proc.returncode} "
                                 f"while starting (see {self.dir / 'node.log'})")
            if sock.exists():
                try:
                    await self.connect()
                    return
                except (HsmsimError, OSError) as exc:
                    if time.monotonic() > deadline:
                        raise MemberDown(f"node {self.hsm_id} did not accept connections: {exc}") from None
            if time.monotonic() > deadline:
                await self.terminate()
                raise MemberDown(f"node {self.hsm_id} did not start within {timeout:.0f}s "
                                 f"(see {self.dir / 'node.log'})")
            await asyncio.sleep(0.02)

    async def connect(self) -> None:
        secret = self.state.cluster_secret.read_bytes()
        client = await NodeClient.connect(self.address, cluster_secret=secret, timeout=3.0)
        self.client = client
        self.generation += 1
        self.logins.clear()
        self.login_refused.clear()
        self.login_retried.clear()
        self.converged = False
        self.ping_failures = 0
        self.down_since = None
        if self.hsm_state == DEGRADED or (self.hsm_state == CREATE_IN_PROGRESS and not self.adding):
            self.hsm_state = ACTIVE

    def exited(self) -> bool:
        if self.proc is not None:
            return self.proc.returncode is not None
        return self.adopted_pid is None or not _alive(self.adopted_pid)

    def running_orphan(self) -> int | None:
        """The pid of this HSM's node process left running by a previous daemon (a daemon
        crash does not take the HSMs down), or None."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        if self.hsm_id.encode() not in cmdline or b"serve" not in cmdline:
            return None
        return pid

    async def adopt(self) -> bool:
        """Reconnect to a node left running by a previous daemon; False if there is none."""
        pid = self.running_orphan()
        if pid is None:
            return False
        self.adopted_pid = pid
        self.proc = None
        try:
            await self.connect()
        except (HsmsimError, OSError) as exc:
            log.warning("%s: cannot reconnect to running node %d (%s); restarting it",
                        self.hsm_id, pid, exc)
            _kill_pid(pid)
            self.adopted_pid = None
            return False
        log.info("%s: reconnected to running node (pid %d)", self.hsm_id, pid)
        return True

    def send_signal(self, sig: int) -> None:
        pid = self.pid
        if pid is not None:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    async def _wait_exit(self, timeout: float | None = None) -> bool:
        if self.proc is not None:
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
                return True
            except asyncio.TimeoutError:
                return False
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        while self.adopted_pid is not None and _alive(self.adopted_pid):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def kill(self) -> None:
        """SIGKILL, as an HSM failing hard; it stays down until started again."""
        self.killed = True
        self.send_signal(signal.SIGKILL)
        await self._wait_exit()
        self.mark_down("killed on purpose")

    async def terminate(self, grace: float = 3.0) -> None:
        """Stop the node cleanly (SIGTERM, then SIGKILL after `grace`)."""
        if self.client is not None:
            client, self.client = self.client, None
            await _close_quietly(client)
        if self.exited():
            return
        if self.paused:
            self.send_signal(signal.SIGCONT)
        self.send_signal(signal.SIGTERM)
        if not await self._wait_exit(grace):
            self.send_signal(signal.SIGKILL)
            await self._wait_exit()

    def status(self, keys: int, sync_lag: int) -> MemberStatus:
        return MemberStatus(self.hsm_id, self.az, self.hsm_state, self.condition(), self.pid,
                            keys, sync_lag, self.last_error, self.restarts, self.latency_ms,
                            self.throttle_rps)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True


def _kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _node_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("SOFTHSM2_CONF", None)  # each node renders and sets its own
    return env


async def _close_quietly(client: Any) -> None:
    try:
        await client.close()
    except Exception:
        pass
