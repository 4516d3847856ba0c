"""nginx (Debian nginx-light, master + 2 workers) started from the kit's own nginx.conf, its key
in the token through `ssl_certificate_key "engine:pkcs11:<uri>"`, answering HTTPS from
Python's ssl + http.client: the served certificate and chain, and workers that log in again
after fork (reload, and a worker killed and respawned)."""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from hsmsim.tls import certs
from hsmsim.tls.servers import Server, nginx

from .conftest import Kits


@pytest.fixture(scope="session")
def nginx_server(kits: Kits, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        pytest.skip("nginx is not installed (Debian package nginx-light; `make deps`)")
    log = tmp_path_factory.mktemp(f"nginx-{kits.backend.name}") / "nginx.out"
    srv = nginx(kits.rsa, log)
    try:
        srv.wait_ready(timeout=30)
        yield srv
    finally:
        srv.stop(signal.SIGTERM)


def _get(port: int, cafile: str, version: ssl.TLSVersion | None = None,
         host: str = "localhost") -> tuple[int, bytes, bytes, tuple[str, str, int]]:
    ctx = ssl.create_default_context(cafile=cafile)
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=15)
    try:
        conn.connect()
        assert conn.sock is not None
        der = conn.sock.getpeercert(binary_form=True) or b""
        cipher = conn.sock.cipher() or ("", "", 0)
        conn.request("GET", "/")
        resp = conn.getresponse()
        return resp.status, resp.read(), der, cipher
    finally:
        conn.close()


def _workers(master: int) -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == master and fields[0] != "Z":
            out.add(int(entry))
    return out


def _wait_workers(master: int, exclude: set[int], timeout: float = 20.0) -> set[int]:
    """Waits until the master has exactly 2 workers, none of them in `exclude`."""
    deadline = time.monotonic() + timeout
    current: set[int] = set()
    while time.monotonic() < deadline:
        current = _workers(master)
        if len(current) == 2 and not current & exclude:
            return current
        time.sleep(0.05)
    raise AssertionError(f"nginx workers did not turn over: {current} (old {exclude})")


def _served_by(error_log: Path) -> set[int]:
    """Worker pids that logged a finished connection."""
    text = error_log.read_text(errors="replace")
    return {int(m) for m in re.findall(r"\[info\] (\d+)#\d+: \*\d+ client 127\.0\.0\.1", text)}


def _requests(kits: Kits, n: int) -> None:
    expected = b"hsmsim TLS offload: localhost\n"
    for i in range(n):
        status, body, _der, _c = _get(kits.port, kits.rsa.files["chain"])
        assert (status, body) == (200, expected), f"request {i}"


def test_served_certificate_and_chain(kits: Kits, nginx_server: Server, tmp_path: Path) -> None:
    kit = kits.rsa
    leaf_pem, ca_pem = x509.load_pem_x509_certificates(Path(kit.files["fullchain"]).read_bytes())
    for version, cipher_prefix in ((ssl.TLSVersion.TLSv1_2, "ECDHE-RSA-"),
                                   (ssl.TLSVersion.TLSv1_3, "TLS_")):
        status, body, der, cipher = _get(kits.port, kit.files["chain"], version)
        assert status == 200 and body == b"hsmsim TLS offload: localhost\n"
        assert der == leaf_pem.public_bytes(serialization.Encoding.DER)
        assert cipher[0].startswith(cipher_prefix), cipher
    # The chain on the wire is leaf + local CA, as fullchain.pem says.
    r = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{kits.port}",
                        "-servername", "localhost", "-showcerts", "-CAfile", kit.files["chain"],
                        "-verify_return_error"],
                       input=b"", capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    served = x509.load_pem_x509_certificates(r.stdout)
    assert served == [leaf_pem, ca_pem]
    assert b"Verify return code: 0 (ok)" in r.stdout
    # Verification can fail: another CA, or another host name.
    other = certs.load_or_create_ca(tmp_path)
    with pytest.raises(ssl.SSLCertVerificationError):
        _get(kits.port, str(other.cert_path))
    ctx = ssl.create_default_context(cafile=kit.files["chain"])
    with socket.create_connection(("127.0.0.1", kits.port), timeout=15) as raw:
        with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
            ctx.wrap_socket(raw, server_hostname="other.example.test")


def test_workers_log_in_again_after_reload_and_respawn(kits: Kits, nginx_server: Server) -> None:
    master = nginx_server.proc.pid
    error_log = Path(kits.rsa.out_dir) / "nginx-error.log"
    first = _wait_workers(master, set())
    _requests(kits, 6)
    assert _served_by(error_log) & first
    # Reload: the master re-reads its configuration (loading the key through the engine
    # again) and forks new workers; the old ones finish and exit.
    os.kill(master, signal.SIGHUP)
    second = _wait_workers(master, first)
    _requests(kits, 12)
    assert _served_by(error_log) & second, "no new worker served a request"
    # A worker dies: the master forks a replacement, which must work too.
    victim = min(second)
    os.kill(victim, signal.SIGKILL)
    third = _wait_workers(master, {victim})
    _requests(kits, 12)
    assert nginx_server.proc.poll() is None
    bad = [line for line in error_log.read_text(errors="replace").splitlines()
           if re.search(r"\[(emerg|alert|crit|error)\]", line)
           and f"worker process {victim} exited on signal 9" not in line]
    assert not bad, bad
    assert _served_by(error_log) & third


def test_serving_survives_an_hsm_failure(kits: Kits, nginx_server: Server) -> None:
    """CloudHSM's reason to have several HSMs: when an HSM's process dies behind the daemon's
    back, the handshakes of the running nginx go to the others (the client retries and fails
    over); the daemon brings the HSM back."""
    cluster = kits.backend.cluster
    if cluster is None:
        pytest.skip("SoftHSM2 directly has no second HSM to fail over to")
    _requests(kits, 2)
    cluster.crash(cluster.hsm_ids[0])  # type: ignore[attr-defined]
    try:
        _requests(kits, 12)
    finally:
        cluster.wait_converged(timeout=60)  # type: ignore[attr-defined]
    _requests(kits, 4)


@pytest.mark.soak
def test_soak_nginx_under_reloads_and_hsm_crashes(kits: Kits, nginx_server: Server) -> None:
    """A minute of HTTPS from 4 client threads while nginx reloads every 10 s and, on the
    hsmsim backend, an HSM's process dies every 20 s: no request may fail."""
    import threading

    failures: list[str] = []
    done = threading.Event()
    counts = [0] * 4

    def client(i: int) -> None:
        while not done.is_set():
            try:
                status, _body, _der, _c = _get(kits.port, kits.rsa.files["chain"])
                if status != 200:
                    failures.append(f"status {status}")
                counts[i] += 1
            except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
                failures.append(repr(exc))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    cluster = kits.backend.cluster
    try:
        for second in range(1, 61):
            time.sleep(1)
            if second % 10 == 0:
                os.kill(nginx_server.proc.pid, signal.SIGHUP)
            if cluster is not None and second % 20 == 0:
                ids = cluster.hsm_ids  # type: ignore[attr-defined]
                cluster.crash(ids[(second // 20) % len(ids)])  # type: ignore[attr-defined]
    finally:
        done.set()
        for t in threads:
            t.join(timeout=30)
        if cluster is not None:
            cluster.wait_converged(timeout=60)  # type: ignore[attr-defined]
    assert not failures, failures[:10]
    assert min(counts) > 0, counts
