"""Starting and stopping the daemon from a command: detached (a new session reporting
readiness on a pipe, `hsmsim up --detach`), in the foreground (`hsmsim up`), waiting for it
to stop, and stopping node processes a crashed daemon left behind."""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hsmsim import aio, files
from hsmsim.cluster.api import ClusterClient, ClusterInfo
from hsmsim.cluster.members import Member
from hsmsim.cluster.state import StateDir, StateError
from hsmsim.cloudhsm import hosting
from hsmsim.cloudhsm.server import start_cloudhsm
from hsmsim.daemon.main import Daemon, DaemonOptions, read_pid, serve, setup_logging
from hsmsim.errors import ConfigError, HsmsimError
from hsmsim.kms.server import KmsServer

log = logging.getLogger("hsmsim.daemon")

READY_TIMEOUT = 60.0


async def start_cloudhsm_endpoint(d: Daemon) -> None:
    """The CloudHSMv2 control plane (docs/cloudhsmv2.md): this cluster and the ones it creates.
    Started from here, not by the daemon itself: the plane hosts nested daemons, so it imports
    the daemon, and the daemon importing it back would be an import cycle."""
    try:
        chsm = await start_cloudhsm(d, d.warnings)
        d.services["cloudhsm"] = chsm
        d.endpoints["cloudhsm"] = chsm.url
        kms = d.services.get("kms")
        if isinstance(kms, KmsServer):  # KMS custom key stores on any cluster the plane serves
            plane = chsm.plane
            clusters = kms.service.kms.clusters

            async def lookup(cid: str, region: str) -> tuple[ClusterClient, ClusterInfo] | None:
                return await hosting.kms_cluster(plane, cid, region)
            clusters.lookup = lookup
            clusters.serving = lambda cid: hosting.served(plane, cid)
            clusters.exists = plane.known
            clusters.related = plane.related
    except Exception as exc:
        log.exception("the CloudHSMv2 endpoint failed to start")
        d.warnings.append(f"the CloudHSMv2 endpoint did not start: {exc} (choose another "
                          "port with [cloudhsm] port in hsmsim.toml or HSMSIM_CLOUDHSM_PORT)")


# What a launched daemon (`hsmsim up`, detached or not) serves beside the gateway and the KMS.
EXTRA_SERVICES = (start_cloudhsm_endpoint,)


class LaunchError(HsmsimError):
    """The daemon did not start (or stop) as asked; the message says why and where to look."""


def spawn_detached(state: StateDir, config: str | None, overrides: Sequence[str],
                   ready_timeout: float = READY_TIMEOUT) -> dict[str, Any]:
    """Start `python -m hsmsim.daemon` in a new session and wait for the JSON line it writes on
    its ready pipe: the ready message (cluster id, endpoints, warnings), or LaunchError with the
    reason it could not start. `overrides` are [cluster] settings as KEY=VALUE."""
    r, w = os.pipe()
    cmd = [sys.executable, "-m", "hsmsim.daemon", "--state", str(state.root),
           "--ready-fd", str(w), "--log-file", str(state.log_file)]
    if config:
        cmd += ["--config", str(Path(config).absolute())]
    for o in overrides:
        cmd += ["--set", o]
    with files.open_append(state.log_file) as log:  # 0600 whatever the umask
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                pass_fds=(w,), start_new_session=True, close_fds=True)
    os.close(w)
    deadline = time.monotonic() + ready_timeout
    buf = b""
    try:
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                proc.kill()
                raise LaunchError(f"the daemon did not become ready within {ready_timeout:.0f}s "
                                  f"(see {state.log_file})")
            ready, _, _ = select.select([r], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(r, 4096)
                if not chunk:
                    break
                buf += chunk
    finally:
        os.close(r)
    if not buf.strip():
        code = proc.wait(timeout=10)
        raise LaunchError(f"the daemon exited (status {code}) before it was ready (see "
                          f"{state.log_file})")
    msg = json.loads(buf.splitlines()[0])
    if not msg.get("ok"):
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise LaunchError(str(msg.get("error", "the daemon failed to start")))
    return dict(msg)


def run_foreground(state: StateDir, config: str | None, overrides: Sequence[str],
                   environ: Mapping[str, str],
                   on_ready: Callable[[dict[str, Any]], None]) -> tuple[int, list[str]]:
    """Serve in this process until SIGTERM, SIGINT (Ctrl-C) or `hsmsim down`: the exit code
    and the errors that stopped it starting (empty when it started)."""
    setup_logging(state.log_file)
    errors: list[str] = []
    ov = tuple((o.split("=", 1)[0], o.split("=", 1)[1]) for o in overrides)
    opts = DaemonOptions(state.root, Path(config).absolute() if config else None, ov,
                         extra_services=EXTRA_SERVICES)
    try:
        code = aio.run(serve(opts, environ, on_ready, errors.append))
    except KeyboardInterrupt:
        code = 0
    except ConfigError as exc:  # e.g. a bad HSMSIM_EVENT_LOOP
        errors.append(str(exc))
        code = 2
    return code, errors


def wait_stopped(state: StateDir, timeout: float = 30.0) -> None:
    """Wait for the daemon asked to shut down to be gone (no pid, no control socket)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if read_pid(state) is None and not state.control_sock.exists():
            return
        time.sleep(0.05)
    raise LaunchError(f"the daemon did not stop within {timeout:.0f}s")


def stop_orphan_nodes(state: StateDir) -> int:
    """Node processes outlive a crashed daemon (as HSMs outlive their client); `down` without
    a daemon stops them. Returns how many were sent SIGTERM."""
    try:
        spec = state.load_spec()
    except StateError:
        return 0
    n = 0
    for h in spec.hsms:
        pid = Member(h.hsm_id, h.az, state).running_orphan()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGTERM)
                n += 1
            except ProcessLookupError:
                pass
    return n
