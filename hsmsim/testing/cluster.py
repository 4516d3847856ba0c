"""A throw-away hsmsim cluster for tests: started with `hsmsim up --detach` in a directory,
with the client environment, fault injection and clean shutdown. Used by the pytest plugin
and by hsmsim's own tests; blocking, no asyncio needed in the caller."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLI = [sys.executable, "-c", "import sys; from hsmsim.cli import main; sys.exit(main())"]


class ClusterStartError(RuntimeError):
    """The cluster did not start; the message carries the CLI's error and the log's tail."""


def run_cli(args: Sequence[str], env: Mapping[str, str] | None = None,
            timeout: float = 120.0, check: bool = False) -> subprocess.CompletedProcess[str]:
    """`hsmsim ARGS...` in a subprocess, capturing output."""
    full_env = dict(os.environ if env is None else env)
    root = str(Path(__file__).resolve().parents[2])
    full_env["PYTHONPATH"] = root + (os.pathsep + full_env["PYTHONPATH"]
                                     if full_env.get("PYTHONPATH") else "")
    r = subprocess.run([*CLI, *args], capture_output=True, text=True, env=full_env,
                       timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"hsmsim {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


@dataclass
class HsmsimCluster:
    """A running cluster. `env` holds what a PKCS#11 or KMS client needs (HSMSIM_SOCKET,
    HSMSIM_PKCS11_MODULE, HSMSIM_PIN, AWS_ENDPOINT_URL_KMS, ...)."""

    state_dir: Path
    cluster_id: str
    env: dict[str, str]
    admin_password: str
    hsm_ids: list[str] = field(default_factory=list)

    @property
    def module_path(self) -> Path:
        return Path(self.env["HSMSIM_PKCS11_MODULE"])

    @property
    def pin(self) -> str:
        return self.env["HSMSIM_PIN"]

    @property
    def socket_path(self) -> Path:
        return Path(self.env["HSMSIM_SOCKET"])

    @property
    def kms_endpoint(self) -> str:
        return self.env["AWS_ENDPOINT_URL_KMS"]

    @property
    def cu_password(self) -> str:
        return self.pin.split(":", 1)[1]

    def pkcs11_lib(self) -> Any:
        """python-pkcs11's `lib` for this cluster's module, initialised against this cluster.

        python-pkcs11 keeps one library per process and the module reads HSMSIM_SOCKET at
        C_Initialize, so a process that talks to several clusters in turn (one per test) must
        re-initialise it: this sets the cluster's variables in os.environ and does that."""
        import pkcs11

        os.environ.update(self.env)
        lib = pkcs11.lib(str(self.module_path))
        if lib.initialized:
            lib.finalize()
        lib.initialize()
        return lib

    # -- control -----------------------------------------------------------------------------------
    def control(self, op: str, timeout: float = 300.0, **args: Any) -> Any:
        from hsmsim.control.client import ControlClient
        return ControlClient(self.state_dir / "control.sock", timeout=timeout).call(op, **args)

    def status(self) -> dict[str, Any]:
        return dict(self.control("status"))

    def hsm(self, hsm_id: str) -> dict[str, Any]:
        for h in self.status()["hsms"]:
            if h["hsm_id"] == hsm_id:
                return dict(h)
        raise KeyError(hsm_id)

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return run_cli([*args, "--state", str(self.state_dir)], timeout=timeout)

    # -- faults ------------------------------------------------------------------------------------
    def kill(self, hsm_id: str) -> None:
        """SIGKILL the HSM's node; it stays down until `start(hsm_id)`."""
        self.control("hsm.kill", hsm_id=hsm_id)

    def crash(self, hsm_id: str) -> None:
        """SIGKILL the node behind the daemon's back: supervision restarts it."""
        pid = self.hsm(hsm_id)["pid"]
        if pid:
            os.kill(pid, signal.SIGKILL)

    def start(self, hsm_id: str) -> None:
        self.control("hsm.start", hsm_id=hsm_id)

    def pause(self, hsm_id: str) -> None:
        self.control("hsm.pause", hsm_id=hsm_id)

    def resume(self, hsm_id: str) -> None:
        self.control("hsm.resume", hsm_id=hsm_id)

    def partition(self, hsm_id: str) -> None:
        self.control("hsm.partition", hsm_id=hsm_id)

    def heal(self, hsm_id: str) -> None:
        self.control("hsm.heal", hsm_id=hsm_id)

    def latency(self, hsm_id: str, ms: int) -> None:
        self.control("hsm.latency", hsm_id=hsm_id, ms=int(ms))

    def throttle(self, hsm_id: str, rps: int) -> None:
        self.control("hsm.throttle", hsm_id=hsm_id, rps=int(rps))

    def add_hsm(self, az: str) -> str:
        hsm_id = str(self.control("hsm.add", az=az)["hsm_id"])
        self.hsm_ids.append(hsm_id)
        return hsm_id

    def remove_hsm(self, hsm_id: str) -> None:
        self.control("hsm.remove", hsm_id=hsm_id)
        self.hsm_ids.remove(hsm_id)

    def wait_converged(self, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until every running HSM is healthy with no sync lag; returns the status."""
        deadline = time.monotonic() + timeout
        st: dict[str, Any] = {}
        while time.monotonic() < deadline:
            st = self.status()
            live = [h for h in st["hsms"] if h["condition"] not in ("killed", "paused",
                                                                     "partitioned")]
            if all(h["condition"] == "healthy" and h["sync_lag"] == 0 for h in live):
                return st
            time.sleep(0.1)
        raise TimeoutError(f"cluster did not converge in {timeout}s: {json.dumps(st)}")

    @property
    def daemon_pid(self) -> int | None:
        try:
            return int((self.state_dir / "daemon.pid").read_text())
        except (OSError, ValueError):
            return None

    def down(self) -> None:
        r = run_cli(["down", "--state", str(self.state_dir)], timeout=60)
        if r.returncode != 0:
            pid = self.daemon_pid
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def up(self, *extra: str, timeout: float = 120.0) -> None:
        """(Re)start the daemon on the same state directory."""
        r = run_cli(["up", "--detach", "--json", "--state", str(self.state_dir), *extra],
                    timeout=timeout)
        if r.returncode != 0:
            raise ClusterStartError(_failure(r, self.state_dir))


def _failure(r: subprocess.CompletedProcess[str], state_dir: Path) -> str:
    tail = ""
    log = state_dir / "daemon.log"
    if log.exists():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
    return f"hsmsim up failed ({r.returncode}): {r.stderr.strip()}\n--- daemon.log tail ---\n{tail}"


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_cluster(state_dir: Path, azs: int | Sequence[str] = 3, hsms_per_az: int = 1,
                  extra_args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                  timeout: float = 120.0) -> HsmsimCluster:
    """Create and start a cluster in `state_dir` (must not hold one yet). Its KMS endpoint
    gets a free port (written to STATE/hsmsim.toml) so that several clusters can run at once."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    toml = state_dir / "hsmsim.toml"
    if not toml.exists():
        toml.write_text(f"[kms]\nport = {free_port()}\n")
    args = ["up", "--detach", "--json", "--state", str(state_dir),
            "--hsms-per-az", str(hsms_per_az)]
    if isinstance(azs, int):
        args += ["--azs", str(azs)]
    else:
        for az in azs:
            args += ["--az", az]
    r = run_cli([*args, *extra_args], env=env, timeout=timeout)
    if r.returncode != 0:
        raise ClusterStartError(_failure(r, state_dir))
    out = json.loads(r.stdout)
    spec = json.loads((state_dir / "cluster.json").read_text())
    admin = out.get("admin_password") or (state_dir / "secrets" / "admin.password").read_text().strip()
    return HsmsimCluster(state_dir=Path(state_dir), cluster_id=out["cluster_id"], env=out["env"],
                         admin_password=admin, hsm_ids=[h["hsm_id"] for h in spec["hsms"]])
