"""The hsmsim daemon: one asyncio process that starts the cluster (its node processes), then
serves the control socket, the PKCS#11 gateway and the KMS endpoint until told to stop."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import resource
import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hsmsim import files
from hsmsim.cluster.api import Service
from hsmsim.cluster.cluster import Cluster
from hsmsim.cluster.config import ClusterConfig, load_cluster_config
from hsmsim.cluster.state import ClusterSpec, StateDir, StateError, finish_new_cluster
from hsmsim.cluster.supervisor import Supervisor
from hsmsim.config import load_file, resolve_section
from hsmsim.control.context import ControlContext
from hsmsim.control.ops import handlers
from hsmsim.control.server import ControlServer
from hsmsim.daemon.settings import config_environ, settings
from hsmsim.errors import HsmsimError
from hsmsim.gateway.config import GatewayConfig
from hsmsim.gateway.server import start_gateway
from hsmsim.kms import config as kms_config
from hsmsim.kms.config import KmsConfig
from hsmsim.kms.server import start_kms

log = logging.getLogger("hsmsim.daemon")

KMS_DEFAULT = "http://127.0.0.1:4599"

# File descriptors kept back from the gateway's and the KMS's connection caps: the control
# socket and its clients (`hsmsim status`), the node processes' connections and pipes (and
# those of a node being restarted), the logs, the KMS store and audit file.
RESERVED_FDS = 192
# The soft RLIMIT_NOFILE is raised towards the hard limit at start, up to this many.
FD_TARGET = 65536


def raise_fd_limit() -> int:
    """Raises the soft RLIMIT_NOFILE to the hard limit (at most FD_TARGET) where allowed;
    returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = FD_TARGET if hard == resource.RLIM_INFINITY else min(hard, FD_TARGET)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return FD_TARGET if soft == resource.RLIM_INFINITY else int(soft)


def connection_caps(limit: int) -> tuple[int, int]:
    """(KMS, gateway) connection caps for a limit of `limit` descriptors: what RESERVED_FDS
    leaves, one third to the KMS endpoint and two thirds to the gateway (at least 8 each)."""
    spare = max(0, limit - RESERVED_FDS)
    kms = max(8, spare // 3)
    return kms, max(8, spare - kms)


class DaemonError(HsmsimError):
    """The daemon cannot start (already running, corrupt state, nodes do not start)."""


@dataclass(frozen=True)
class DaemonOptions:
    state_dir: Path
    config_file: Path | None = None
    cluster_overrides: tuple[tuple[str, Any], ...] = ()
    services: bool = True  # start the gateway and the KMS (tests of the cluster alone: False)
    # Started after the KMS when `services` (hsmsim.daemon.launch.EXTRA_SERVICES); each records
    # its service, endpoint and warnings on the daemon.
    extra_services: tuple[Callable[[Daemon], Awaitable[None]], ...] = ()


def read_pid(state: StateDir) -> int | None:
    try:
        pid = int(state.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    try:  # a recycled pid that is not an hsmsim daemon does not count
        if b"hsmsim" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return None
    except OSError:
        pass
    return pid


class Daemon:
    def __init__(self, opts: DaemonOptions, environ: Mapping[str, str]) -> None:
        self.opts = opts
        self.environ = dict(environ)
        self.state = StateDir(opts.state_dir)
        self.file_data = load_file(opts.config_file or self.state.config_file)
        self.config: ClusterConfig = load_cluster_config(
            self.file_data, environ, dict(opts.cluster_overrides))
        if self.config.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"):
            logging.getLogger("hsmsim").setLevel(self.config.log_level.upper())
        self.cluster: Cluster | None = None
        self.supervisor: Supervisor | None = None
        self.control: ControlServer | None = None
        self.services: dict[str, Service] = {}
        self.endpoints: dict[str, str] = {}
        self.warnings: list[str] = []
        # The settings it runs with (`hsmsim config`): fixed at start, as the daemon reads its
        # config only then.
        self.settings_rows = settings(self.file_data, config_environ(self.environ),
                                      {"cluster": dict(opts.cluster_overrides)})
        self._backups: asyncio.Task[None] | None = None
        self.stopping = asyncio.Event()

    async def start(self) -> dict[str, Any]:
        state = self.state
        pid = read_pid(state)
        if pid is not None and pid != os.getpid():
            raise DaemonError(f"a daemon (pid {pid}) already runs for {state.root}; stop it with "
                              "`hsmsim down`")
        new = state.init_marker.exists() and not state.cluster_json.exists()
        if new:
            try:
                spec = ClusterSpec.from_json(state.init_marker.read_bytes(), state.init_marker)
            except StateError:
                raise DaemonError(f"{state.root} holds an interrupted cluster initialisation; "
                                  "run `hsmsim up` again to recreate it") from None
        else:
            spec = state.load_spec()
        files.make_dir(state.root)  # 0700 even if an older version (or a umask) made it wider
        files.write_private(state.pid_file, f"{os.getpid()}\n")
        self.cluster = Cluster(state, spec, self.config)
        self.supervisor = Supervisor(self.cluster)
        if new:
            await self.supervisor.bootstrap_new(state.read_secret(state.admin_password),
                                                state.read_secret(state.cu_password))
            finish_new_cluster(state, spec)
        else:
            await self.supervisor.start_existing()
        self.control = ControlServer(handlers(self.control_context()))
        await self.control.start(state.control_sock)
        if self.opts.services:
            await self._start_services()
        self.supervisor.start()
        from hsmsim.cluster.backup import backup_loop
        self._backups = asyncio.get_running_loop().create_task(backup_loop(
            self.cluster, state, self.config.backup_interval_h, self.config.backup_retention_days))
        return {"cluster_id": spec.cluster_id, "new": new, "warnings": self.warnings_now(),
                **self.endpoints}

    def warnings_now(self) -> list[str]:
        """The start-up warnings, and one while the cluster has fewer HSMs than the key
        availability check needs."""
        c = self.cluster
        if c is not None and c.check_availability and len(c.members) < 2:
            return self.warnings + [
                f"the cluster has {len(c.members)} HSM(s): CloudHSM's key availability check "
                "needs 2, so creating token keys fails (CKR_FUNCTION_FAILED); add an HSM "
                "(`hsmsim hsm add --az ...`) or start with --disable-key-availability-check"]
        return self.warnings

    def control_context(self) -> ControlContext:
        """What the control operations work on (once the cluster has started)."""
        assert self.cluster is not None and self.supervisor is not None
        return ControlContext(cluster=self.cluster, supervisor=self.supervisor, state=self.state,
                              endpoints=self.endpoints, settings_rows=self.settings_rows,
                              warnings=self.warnings_now, stop=self.stopping.set)

    async def _start_services(self) -> None:
        assert self.cluster is not None
        fd_limit = raise_fd_limit()
        kms_cap, gateway_cap = connection_caps(fd_limit)
        log.info("file descriptors: limit %d; connection caps: KMS %d, gateway %d",
                 fd_limit, kms_cap, gateway_cap)
        config = resolve_section(GatewayConfig, "gateway", self.file_data, self.environ)
        try:
            self.services["gateway"] = await start_gateway(self.cluster, config,
                                                           self.state.gateway_sock,
                                                           max_connections=gateway_cap)
            self.endpoints["gateway"] = str(self.state.gateway_sock)
        except Exception as exc:
            log.exception("the PKCS#11 gateway failed to start")
            self.warnings.append(f"the PKCS#11 gateway did not start: {exc}")
        kcfg = resolve_section(KmsConfig, "kms", self.file_data, self.environ)
        # The first `up`'s port is kept.
        kcfg, moved = kms_config.settle_port(kcfg, self.state.root,
                                             kms_config.port_given(self.file_data, self.environ))
        if moved:
            self.warnings.append(moved)
        try:
            svc = await start_kms(self.cluster, kcfg, self.state.root, max_connections=kms_cap)
            self.services["kms"] = svc
            # The server's own address: right even for `port = 0` (any free port).
            self.endpoints["kms"] = str(svc.url)
            kms_config.remember_port(self.state.root, int(svc.port))
        except OSError as exc:
            # Never leave clients pointed at an endpoint this cluster does not own: a busy
            # port (another cluster's KMS, moto, LocalStack) fails `up` instead of a warning
            # that `hsmsim env` would contradict.
            why = ("is in use by another process" if exc.errno == errno.EADDRINUSE
                   else f"cannot be opened ({exc.strerror or exc})")
            raise DaemonError(
                f"the KMS port {kcfg.port} {why}. Choose another with `hsmsim config set kms.port "
                "N` (0: any free port) or HSMSIM_KMS_PORT=N, then `hsmsim up` again") from None
        except Exception as exc:
            log.exception("the KMS endpoint failed to start")
            self.warnings.append(f"the KMS endpoint did not start: {exc} (choose another "
                                 "port with [kms] port in hsmsim.toml or HSMSIM_KMS_PORT)")
        # The services above the daemon (the CloudHSMv2 endpoint, which hosts nested daemons):
        # given by whoever launches it (hsmsim.daemon.launch), so this module does not know them.
        for start in self.opts.extra_services:
            await start(self)

    async def close(self) -> None:
        for name, svc in list(self.services.items()):
            try:
                await asyncio.wait_for(svc.close(), 10)
            except Exception:
                log.exception("closing %s failed", name)
        self.services.clear()
        if self.control is not None:
            await self.control.close()
        if self._backups is not None:
            self._backups.cancel()
        if self.supervisor is not None:
            await self.supervisor.stop()
        if self.cluster is not None:
            await self.cluster.close()
        for p in (self.state.control_sock, self.state.gateway_sock):
            with contextlib.suppress(OSError):
                p.unlink()
        with contextlib.suppress(OSError):
            if read_pid(self.state) == os.getpid():
                self.state.pid_file.unlink()


def setup_logging(path: Path | None, level: str = "INFO") -> None:
    root = logging.getLogger()
    root.handlers.clear()
    # 0600 whatever the umask or whoever created it: the log names clients and requests.
    handler: logging.Handler = (files.file_handler(path) if path is not None
                                else logging.StreamHandler())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else logging.INFO)


async def serve(opts: DaemonOptions, environ: Mapping[str, str],
                on_ready: Callable[[dict[str, Any]], None],
                on_error: Callable[[str], None]) -> int:
    """Run the daemon until SIGTERM/SIGINT or a `shutdown` control request."""
    files.private_umask()  # defence in depth: whatever is created without a mode is private
    try:
        daemon = Daemon(opts, environ)
    except HsmsimError as exc:
        on_error(str(exc))
        return 1
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stopping.set)
    try:
        try:
            info = await daemon.start()
        except HsmsimError as exc:
            log.error("start failed: %s", exc)
            on_error(str(exc))
            return 1
        except Exception as exc:
            log.exception("start failed")
            on_error(f"internal error while starting: {exc} (see {daemon.state.log_file})")
            return 1
        log.info("ready: %s", json.dumps(info))
        on_ready(info)
        await daemon.stopping.wait()
        log.info("stopping")
        return 0
    finally:
        await daemon.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
