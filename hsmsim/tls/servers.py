"""Runs the TLS servers of a kit as child processes (`openssl s_server`, nginx in the
foreground) on 127.0.0.1, waits until they accept connections and stops them by their own
process id. Used by `hsmsim tls bench` and by the TLS tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from hsmsim.tls.errors import TlsError
from hsmsim.tls.kit import Kit, nginx_binary

BENCH_CIPHER = "ECDHE-RSA-AES128-GCM-SHA256"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kit_environ(kit: Kit, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The process environment env.sh would give: module variables, OPENSSL_CONF, the PIN."""
    env = dict(os.environ if base is None else base)
    env.update(kit.env)
    from hsmsim.tls.kit import PIN_ENV
    try:
        env[PIN_ENV] = Path(kit.pin_file).read_text().strip("\r\n")
    except OSError as exc:
        raise TlsError(f"cannot read the PIN file {kit.pin_file}: {exc.strerror}") from None
    return env


class Server:
    """A server child process with its output in a log file."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], port: int,
                 log_path: Path, cwd: Path | None = None) -> None:
        self.name, self.port, self.log_path = name, port, log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(list(argv), env=dict(env), stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd,
                                     start_new_session=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, timeout: float = 30.0) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise TlsError(f"{self.name} exited with {self.proc.returncode} before "
                               f"accepting connections:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TlsError(f"{self.name} did not accept connections on port {self.port} within "
                       f"{timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def s_server(kit: Kit, port: int, log_path: Path, key_pem: Path | None = None,
             extra: Sequence[str] = ()) -> Server:
    """`openssl s_server -engine pkcs11` with the kit's token key (or `key_pem`, a PEM file,
    with the engine loaded all the same)."""
    files = kit.files
    key_args = (["-key", str(key_pem)] if key_pem is not None
                else ["-keyform", "engine", "-key", kit.uri])
    argv = ["openssl", "s_server", "-engine", "pkcs11", *key_args,
            "-cert", files["cert"], "-accept", f"127.0.0.1:{port}", "-quiet", *extra]
    return Server(f"s_server ({kit.label})", argv, kit_environ(kit), port, log_path)


def nginx(kit: Kit, log_path: Path) -> Server:
    """nginx in the foreground through the kit's own nginx.sh (which execs nginx, so the
    process is the master; 2 workers); the port is the one `tls init --port` wrote."""
    out = Path(kit.out_dir)
    nginx_binary()
    text = Path(kit.files["nginx_server"]).read_text()
    port = int(text.split("listen 127.0.0.1:", 1)[1].split()[0])
    return Server("nginx", ["sh", kit.files["nginx_sh"]], os.environ, port, log_path, cwd=out)


def s_server_script(kit: Kit, port: int, log_path: Path) -> Server:
    """The kit's own s-server.sh (`openssl s_server ... -www`) on `port`."""
    return Server("s-server.sh", ["sh", kit.files["s_server"]], {**os.environ, "PORT": str(port)},
                  port, log_path)


def s_time(port: int, seconds: int, cipher: str = BENCH_CIPHER) -> tuple[int, float]:
    """Full TLS 1.2 handshakes (`openssl s_time -new`) for `seconds`: (count, wall seconds)."""
    argv = ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new", "-time", str(seconds),
            "-tls1_2", "-cipher", cipher]
    start = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60,
                       stdin=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    for line in r.stdout.splitlines():
        if " connections in " in line and "real seconds" not in line:
            count = int(line.split()[0])
            if count == 0:
                break
            return count, elapsed
    raise TlsError(f"openssl s_time completed no handshake (exit {r.returncode}): "
                   f"{(r.stdout + r.stderr).strip()[-500:]}")
