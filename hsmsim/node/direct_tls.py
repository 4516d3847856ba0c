"""The node's direct listener over TCP with TLS, for applications whose module reaches the daemon
over TLS (`HSMSIM_SOCKET=tls:host:port`; docs/direct-protocol.md, "TCP and TLS").

The frames are the Unix listener's (hsmsim.node.direct); this file adds what TCP needs: the
address (by default a loopback address of this HSM's own, 127.A.B.C derived from its id, on
CloudHSM's port 2223), a server certificate issued by the cluster CA naming the HSM id (the
module checks both against the trust anchor it already has for the daemon), a TLS handshake
bounded in time, and a bounded log of failed handshakes (peer and reason only)."""

from __future__ import annotations

import asyncio
import datetime as _dt
import hashlib
import ipaddress
import logging
import os
import ssl
import time
from pathlib import Path
from typing import Protocol, cast

from hsmsim import files

log = logging.getLogger("hsmsim.node.direct")

PORT = 2223  # CloudHSM's HSM port (SDK 5 connects to 2223-2225 of each HSM's ENI)
HANDSHAKE_TIMEOUT_S = 10.0  # a client that does not finish its handshake in time is dropped
ADDRESS_FILE = "direct.addr"  # in the node's directory: the direct TLS address it listens on
_LOG_EVERY_S = 60.0
_LOG_BURST = 10  # failed handshakes logged per minute; the rest are counted


def loopback_ip(hsm_id: str) -> str:
    """This HSM's own loopback address, 127.A.B.C (the first bytes of SHA-256 of its id, C at
    least 1), so that each HSM on one host has its own IP as each CloudHSM HSM has its own ENI
    (the CloudHSMv2 API's EniIp derives the same address: hsmsim.cloudhsm.plane.eni_ip).
    FIDELITY: real HSMs are on the VPC's subnets; Linux answers every 127/8 address."""
    d = hashlib.sha256(hsm_id.encode()).digest()
    return f"127.{d[0]}.{d[1]}.{max(1, d[2])}"


def parse_listen(setting: str, hsm_id: str) -> list[tuple[str, int]] | None:
    """The (host, port) to try in turn for `[node] direct_tls_listen`: `auto` (this HSM's
    loopback address on port 2223, else any port there, else 127.0.0.1 on any port), `off`
    (None), or HOST:PORT (port 0: any)."""
    s = setting.strip()
    if s == "off":
        return None
    if s == "auto":
        ip = loopback_ip(hsm_id)
        return [(ip, PORT), (ip, 0), ("127.0.0.1", 0)]
    host, sep, port = s.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"node.direct_tls_listen must be auto, off or HOST:PORT, not {setting!r}")
    try:
        if ipaddress.ip_address(host).is_unspecified:
            # the address is given to applications as it is: it must be one they can reach
            raise ValueError("node.direct_tls_listen needs the address applications connect "
                             f"to, not the wildcard {host}")
    except ValueError as exc:
        if "wildcard" in str(exc):
            raise
    return [(host, int(port))]


def server_context(state: Path, ndir: Path, hsm_id: str, hosts: list[str]) -> ssl.SSLContext:
    """A TLS server context with a certificate from the cluster CA (`STATE/ca/`) naming this
    HSM (DNS: its id; and the `hosts` it may listen on), issued afresh at every start.
    FIDELITY: a CloudHSM HSM's certificate chains to the cluster certificate the customer signed
    at initialisation; here the node issues its own from the cluster CA's key, which is in the
    same state directory."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca_cert_path, ca_key_path = state / "ca" / "ca.crt", state / "ca" / "ca.key"
    ca = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the cluster CA key is not an EC key")
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(hsm_id)]
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    now = _dt.datetime.now(_dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hsmsim"),
                                     x509.NameAttribute(NameOID.COMMON_NAME, hsm_id)]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(min(now + _dt.timedelta(days=365), ca.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = ndir / "direct-tls.crt", ndir / "direct-tls.key"
    files.write_private(key_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    files.write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM)
                        + ca.public_bytes(serialization.Encoding.PEM))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert_path), str(key_path))
    return ctx


class HandshakeLog:
    """Failed handshakes, logged with the peer and the reason only (never bytes received), at
    most _LOG_BURST a minute; `failed` counts them all (node `counters`: direct_tls_refused)."""

    def __init__(self) -> None:
        self.failed = 0
        self._window = 0.0
        self._logged = 0
        self._quiet = 0

    def failure(self, peer: object, exc: BaseException) -> None:
        self.failed += 1
        now = time.monotonic()
        if now - self._window > _LOG_EVERY_S:
            if self._quiet:
                log.warning("direct TLS: %d more failed handshakes were not logged", self._quiet)
            self._window, self._logged, self._quiet = now, 0, 0
        if self._logged >= _LOG_BURST:
            self._quiet += 1
            return
        self._logged += 1
        reason = getattr(exc, "reason", None) or type(exc).__name__
        log.warning("direct TLS handshake from %s failed: %s", _peer(peer), reason)


def _peer(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return "?"


class Listener(Protocol):
    """What a TLS connection uses of the listener that accepted it (direct.DirectService): its
    admission (the connection cap), the count of handshakes in progress (which the cap counts)
    and the log of failed ones. A Protocol, so this module needs no import of direct.py (which
    imports this one)."""

    handshaking: int

    @property
    def handshakes(self) -> HandshakeLog: ...

    def admit(self) -> bool: ...


class TlsAccept(asyncio.Protocol):
    """One accepted TCP connection, TLS done here over memory BIOs (whatever the event loop):
    counted against the listener's cap, its handshake bounded by HANDSHAKE_TIMEOUT_S and a
    failed one logged (HandshakeLog), then the plaintext handed to `inner` (a direct
    connection), for which this object is the transport (write, close, abort)."""

    def __init__(self, svc: Listener, ctx: ssl.SSLContext, inner: asyncio.Protocol) -> None:
        self.svc = svc
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.inc, self.out, server_side=True)
        self.inner = inner
        self.raw: asyncio.Transport | None = None
        self.peer: object = None
        self.shaking = False  # counted in svc.handshaking
        self.ready = False  # handshake done: plaintext goes to `inner`
        self.timer: asyncio.TimerHandle | None = None

    # -- the TCP side ------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = cast(asyncio.Transport, transport)
        if not self.svc.admit():
            self.raw.abort()
            return
        self.peer = transport.get_extra_info("peername")
        self.shaking = True
        self.svc.handshaking += 1
        self.timer = asyncio.get_running_loop().call_later(HANDSHAKE_TIMEOUT_S, self._too_slow)

    def data_received(self, data: bytes) -> None:
        if self.raw is None or self.raw.is_closing():
            return
        self.inc.write(data)
        if not self.ready:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                return
            except (ssl.SSLError, OSError) as exc:
                self._flush()  # the alert, if any
                self._failed(exc)
                return
            self._handshaken()
        while not self.raw.is_closing():
            try:
                chunk = self.tls.read(65536)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLError, OSError):
                self.abort()  # a broken record stream cannot be trusted
                return
            if not chunk:  # close_notify
                self.close()
                return
            self.inner.data_received(chunk)
        self._flush()

    def eof_received(self) -> bool | None:
        return None  # close

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.shaking:
            self._failed(exc or ConnectionResetError("closed during the handshake"))
        if self.ready:
            self.inner.connection_lost(exc)

    def _handshaken(self) -> None:
        assert self.raw is not None
        self.shaking = False
        self.svc.handshaking -= 1
        if self.timer is not None:
            self.timer.cancel()
        self._flush()
        self.ready = True
        self.inner.connection_made(cast(asyncio.Transport, self))

    def _failed(self, exc: BaseException) -> None:
        if self.shaking:
            self.shaking = False
            self.svc.handshaking -= 1
            self.svc.handshakes.failure(self.peer, exc)
        if self.raw is not None:
            self.raw.abort()

    def _too_slow(self) -> None:
        self._failed(TimeoutError("no TLS handshake in time"))

    def _flush(self) -> None:
        pending = self.out.read()
        if pending and self.raw is not None and not self.raw.is_closing():
            self.raw.write(pending)

    # -- the transport of `inner` ------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.raw is None or self.raw.is_closing():
            return
        try:
            self.tls.write(data)
        except (ssl.SSLError, OSError):
            self.abort()
            return
        self._flush()

    def close(self) -> None:
        if self.raw is not None and not self.raw.is_closing():
            self._flush()
            self.raw.close()

    def abort(self) -> None:
        if self.raw is not None:
            self.raw.abort()

    def get_extra_info(self, name: str, default: object = None) -> object:
        if name == "peername":
            return self.peer
        return default


def write_address(ndir: Path, address: str | None) -> None:
    """`direct.addr` in the node's directory: the direct TLS address (read by the daemon for
    `hsmsim status`), removed when the node has none."""
    path = ndir / ADDRESS_FILE
    if address is None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    # no half-written file left behind (the previous address, if any, stays)
    files.atomic_write(path, (address + "\n").encode())


def read_address(ndir: Path) -> str | None:
    """The direct TLS address the node in `ndir` listens on (tls:HOST:PORT), or None."""
    try:
        return (ndir / ADDRESS_FILE).read_text().strip() or None
    except OSError:
        return None
