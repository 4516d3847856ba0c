"""The direct data path over TCP+TLS (issue 12, docs/direct-protocol.md "TCP and TLS"): a module
that reaches the daemon over TLS (`HSMSIM_SOCKET=tls:host:port`) sends single-part calls to
each HSM's own TLS listener (its own loopback address, a certificate from the cluster CA naming
the HSM), checks that certificate against the trust anchor it has for the daemon, and hands the
call to the daemon whenever the node cannot be used. Observed through the nodes' counters."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import random
import signal
import socket
import ssl
import struct
import threading
from collections.abc import Iterator
from ctypes import byref, c_ulong
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from p11helpers import REF_PIN, ClusterGateway, copy_module, require_module, wait_for
from p11raw import Raw, open_session
from test_direct_path import (counters, ec_pair, healthy, node_pid, nodes, sign, sign_init, sign_once,
                              total, verify)

from hsmsim.node import codec
from hsmsim.node.client import NodeClient
from hsmsim.node.direct import MAGIC, descriptor_mac, encode_descriptor
from hsmsim.pkcs11.constants import RV
from hsmsim.pkcs11.params import MechanismSpec
from hsmsim.testing.cluster import free_port, run_cli

HELLO = struct.pack("<IIHH", 8, MAGIC, 1, 0)


def _cert(subject: str, issuer_key: ec.EllipticCurvePrivateKey | None, issuer: x509.Name | None,
          sans: list[x509.GeneralName], ca: bool = False) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1)))
    if ca:
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, b.sign(issuer_key or key, hashes.SHA256())


def _write(d: Path, stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> tuple[Path, Path]:
    c, k = d / f"{stem}.pem", d / f"{stem}.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    k.chmod(0o600)
    return c, k


class Remote:
    """A cluster whose gateway also serves TLS (its certificate from a CA of the test's own),
    and the trust anchors a remote module may be given."""

    def __init__(self, d: Path) -> None:
        self.dir = d
        ca_key, ca = _cert("test gateway CA", None, None, [], ca=True)
        (d / "gwca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        key, cert = _cert("gateway", ca_key, ca.subject, [x509.DNSName("hsmsim-gateway")])
        crt, k = _write(d, "gateway", key, cert)
        self.port = free_port()
        self.gw = ClusterGateway(d / "gateway.sock", {"tls_listen": f"127.0.0.1:{self.port}",
                                                      "tls_cert": str(crt), "tls_key": str(k)})
        self.cluster_ca = self.gw.state / "ca" / "ca.crt"
        # the trust anchor of a remote module: the gateway's CA and the cluster CA (the HSMs)
        self.bundle = d / "bundle.pem"
        self.bundle.write_bytes((d / "gwca.pem").read_bytes() + self.cluster_ca.read_bytes())

    def module(self, tmp: Path, mp: pytest.MonkeyPatch, ca_file: Path | None = None) -> Raw:
        mp.setenv("HSMSIM_SOCKET", f"tls:127.0.0.1:{self.port}")
        mp.setenv("HSMSIM_CA_FILE", str(ca_file or self.bundle))
        mp.setenv("HSMSIM_SERVER_NAME", "hsmsim-gateway")
        raw = Raw(copy_module(tmp))
        assert raw.C_Initialize(None) == 0
        return raw


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    require_module()
    r = Remote(tmp_path_factory.mktemp("directtls"))
    yield r
    r.gw.stop()


@pytest.fixture
def mod(tmp_path: Path, remote: Remote, monkeypatch: pytest.MonkeyPatch) -> Iterator[Raw]:
    raw = remote.module(tmp_path, monkeypatch)
    yield raw
    raw.C_Finalize(None)


def status(gw: ClusterGateway) -> dict[str, dict[str, object]]:
    r = run_cli(["status", "--json", "--state", str(gw.state)], timeout=60)
    assert r.returncode == 0, r.stderr
    return {h["hsm_id"]: h for h in json.loads(r.stdout)["hsms"]}


def host_port(address: str) -> tuple[str, int]:
    assert address.startswith("tls:")
    host, _, port = address[4:].rpartition(":")
    return host, int(port)


def tls_client(remote: Remote, hsm_id: str, address: str | None = None) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(remote.cluster_ca))
    address = address or str(status(remote.gw)[hsm_id]["direct_address"])
    raw = socket.create_connection(host_port(address), timeout=30)
    return ctx.wrap_socket(raw, server_hostname=hsm_id)


def recv_all(c: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = c.recv(n - len(out))
        assert chunk, "closed"
        out += chunk
    return out


# -- the path ------------------------------------------------------------------------------------

def test_each_hsm_has_its_own_direct_tls_address_in_status(remote: Remote) -> None:
    hsms = status(remote.gw)
    addresses = {h: str(v["direct_address"]) for h, v in hsms.items()}
    assert len(set(addresses.values())) == len(hsms) == 2
    for hsm_id, address in addresses.items():
        host, port = host_port(address)
        assert host.startswith("127.") and host != "127.0.0.1" and port > 0  # its own loopback IP
        with tls_client(remote, hsm_id) as c:  # chains to the cluster CA and names the HSM
            c.sendall(HELLO)
            magic, major = struct.unpack("<IIHHI", recv_all(c, 16))[1:3]
            assert (magic, major) == (MAGIC, 1)


def test_remote_sign_goes_to_the_hsm_over_tls_while_the_daemon_is_stopped(remote: Remote, mod: Raw) -> None:
    h = open_session(mod, REF_PIN)
    pub, priv = ec_pair(mod, h)
    assert sign_once(mod, h, priv)[0] == 0  # the key's copies are in place
    before = counters(remote.gw)
    assert sign_init(mod, h, priv) == 0
    pid = int((remote.gw.state / "daemon.pid").read_text())
    os.kill(pid, signal.SIGSTOP)
    try:
        n = c_ulong(0)
        assert mod.C_Sign(c_ulong(h), b"while stopped", c_ulong(13), None, byref(n)) == 0
        rv, sig = sign(mod, h, b"while stopped")
        assert rv == 0 and len(sig) == 64
    finally:
        os.kill(pid, signal.SIGCONT)
    after = counters(remote.gw)
    assert total(after, "direct_tls_calls") == total(before, "direct_tls_calls") + 1  # over TCP+TLS
    assert total(after, "direct_calls") == total(before, "direct_calls") + 1
    assert verify(mod, h, pub, b"while stopped", sig) == 0


def test_threads_and_a_forked_child_use_their_own_tls_connections(remote: Remote, mod: Raw) -> None:
    h = open_session(mod, REF_PIN)
    pub, priv = ec_pair(mod, h)
    before = counters(remote.gw)
    errors: list[str] = []

    def worker(i: int) -> None:
        s = open_session(mod)
        for j in range(10):
            data = b"t%d-%d" % (i, j)
            rv, sig = sign_once(mod, s, priv, data)
            if rv != 0 or verify(mod, s, pub, data, sig) != 0:
                errors.append(f"{i}/{j}: {rv:#x}")
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert total(counters(remote.gw), "direct_tls_calls") >= total(before, "direct_tls_calls") + 4 * 10 * 2
    assert sign_init(mod, h, priv) == 0  # pooled TLS connections to the nodes exist now
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            if mod.C_Sign(c_ulong(h), b"x", c_ulong(1), None, byref(c_ulong())) == RV.CRYPTOKI_NOT_INITIALIZED \
                    and mod.C_Initialize(None) == 0:
                s = open_session(mod, REF_PIN)
                code = 0 if all(sign_once(mod, s, priv, b"child")[0] == 0 for _ in range(20)) else 2
        finally:
            os._exit(code)
    assert sign(mod, h, b"begun before the fork")[0] == 0
    for _ in range(20):  # the parent signs meanwhile, on its own TLS connections
        assert sign_once(mod, h, priv)[0] == 0
    _, st = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(st) == 0
    rv, sig = sign_once(mod, h, priv, b"parent")
    assert rv == 0 and verify(mod, h, pub, b"parent", sig) == 0


# -- certificates and fallback -----------------------------------------------------------------

def test_a_node_certificate_that_does_not_chain_is_refused_and_the_call_falls_back(
        remote: Remote, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # this module trusts the gateway's CA only: the nodes' certificates (cluster CA) do not chain
    mod = remote.module(tmp_path, monkeypatch, ca_file=remote.dir / "gwca.pem")
    try:
        h = open_session(mod, REF_PIN)
        pub, priv = ec_pair(mod, h)
        before = counters(remote.gw)
        for i in range(8):
            rv, sig = sign_once(mod, h, priv, b"%d" % i)
            assert rv == 0 and verify(mod, h, pub, b"%d" % i, sig) == 0  # through the daemon
        after = counters(remote.gw)
        assert total(after, "direct_tls_calls") == total(before, "direct_tls_calls")  # none reached a node
        # each HSM's handshake was refused once; the module then remembers that address
        assert 1 <= total(after, "direct_tls_refused") - total(before, "direct_tls_refused") <= 2
    finally:
        mod.C_Finalize(None)


class Impostor:
    """A TLS server on a killed HSM's address: each connection presents the next certificate
    of `certs` (cert, key files); records finished handshakes and application bytes."""

    def __init__(self, address: tuple[str, int], certs: list[tuple[Path, Path]]) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ok = False
        for _ in range(200):  # the port is free once the process is gone
            try:
                self.sock.bind(address)
                ok = True
                break
            except OSError:
                threading.Event().wait(0.02)
        assert ok, "the killed HSM's address did not come free"
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.ctxs = []
        for crt, key in certs:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(crt), str(key))
            self.ctxs.append(ctx)
        self.attempts = 0
        self.handshakes = 0
        self.received = b""
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            ctx = self.ctxs[self.attempts % len(self.ctxs)]
            self.attempts += 1
            c.settimeout(5)
            try:
                with ctx.wrap_socket(c, server_side=True) as t:
                    self.handshakes += 1
                    self.received += t.recv(4096)
            except OSError:
                c.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.sock.close()


def test_kill_9_of_the_chosen_hsm_and_an_impostor_on_its_address(remote: Remote, mod: Raw, tmp_path: Path) -> None:
    """kill -9 of the HSM a pending Sign names first: the module hands the call to the daemon.
    A server then taking over the HSM's address with a cluster-CA certificate naming another
    HSM, or a certificate naming this HSM from another CA, gets no request (no ticket)."""
    h = open_session(mod, REF_PIN)
    pub, priv = ec_pair(mod, h)
    for i in range(2):
        assert sign_once(mod, h, priv, b"%d" % i)[0] == 0
    gw = remote.gw
    victim, other = nodes(gw)[0], nodes(gw)[1]
    address = host_port(str(status(gw)[victim.name]["direct_address"]))
    ca_key = serialization.load_pem_private_key((gw.state / "ca" / "ca.key").read_bytes(), password=None)
    ca = x509.load_pem_x509_certificate(remote.cluster_ca.read_bytes())
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    k1, c1 = _cert(other.name, ca_key, ca.subject, [x509.DNSName(other.name)])  # names another HSM
    bad_ca_key, bad_ca = _cert("not the cluster CA", None, None, [], ca=True)
    k2, c2 = _cert(victim.name, bad_ca_key, bad_ca.subject, [x509.DNSName(victim.name)])  # wrong chain
    certs = [_write(tmp_path, "other-name", k1, c1), _write(tmp_path, "other-chain", k2, c2)]
    sessions = [open_session(mod) for _ in range(8)]
    for s in sessions:
        assert sign_init(mod, s, priv) == 0  # half of them name the victim first
    os.kill(node_pid(victim), signal.SIGKILL)
    impostor = Impostor(address, certs)
    try:
        for s in sessions:
            rv, sig = sign(mod, s, b"impostor")
            assert rv == 0 and verify(mod, h, pub, b"impostor", sig) == 0, hex(rv)
    finally:
        impostor.close()
    # both certificates were presented (the other name first: a wrong name is not remembered,
    # a wrong chain is, so no third attempt)...
    assert impostor.attempts == 2
    assert impostor.handshakes == 0 and impostor.received == b""  # ...and refused before any request
    assert wait_for(lambda: healthy(gw), 120)
    # kill -9 alone: nothing listens at the address any more; the daemon answers
    for s in sessions:
        assert sign_init(mod, s, priv) == 0
    os.kill(node_pid(victim), signal.SIGKILL)
    for s in sessions:
        rv, sig = sign(mod, s, b"killed")
        assert rv == 0 and verify(mod, h, pub, b"killed", sig) == 0, hex(rv)
    assert wait_for(lambda: healthy(gw), 120)
    before = counters(gw)[victim.name]["direct_tls_calls"]

    def victim_serves() -> bool:  # once the module stops skipping the impostor's address
        for i in range(2):
            rv, sig = sign_once(mod, h, priv, b"again %d" % i)
            assert rv == 0 and verify(mod, h, pub, b"again %d" % i, sig) == 0
        return counters(gw)[victim.name]["direct_tls_calls"] > before
    assert wait_for(victim_serves, 120)  # the restarted HSM serves direct calls again


# -- hostile clients -----------------------------------------------------------------------------

def test_plaintext_and_fuzzed_frames_at_the_tls_listener(remote: Remote, mod: Raw) -> None:
    gw = remote.gw
    node = nodes(gw)[0]
    address = host_port(str(status(gw)[node.name]["direct_address"]))
    before = counters(gw)[node.name]
    # a plaintext client: the handshake fails, the connection closes unanswered, a log line says so
    c = socket.create_connection(address, timeout=30)
    try:
        c.sendall(HELLO + b"\x00" * 64)
        assert c.recv(16) == b""
    except ConnectionResetError:
        pass
    c.close()
    assert wait_for(lambda: counters(gw)[node.name]["direct_tls_refused"] > before["direct_tls_refused"], 30)
    log = (node / "node.log").read_text()
    assert "direct TLS handshake from 127." in log
    # a slow client holding a connection open without a handshake does not stop the others
    slow = socket.create_connection(address, timeout=30)
    # fuzzed frames inside TLS, as at the Unix listener
    rng = random.Random(1213)
    where = str(status(gw)[node.name]["direct_address"])
    for i in range(60):
        kind = i % 4
        if kind == 0:
            payload = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 64)))
        elif kind == 1:
            payload = struct.pack("<I", rng.choice([0, 1, 0xFFFFFFFF, 1 << 21])) + b"zz"
        elif kind == 2:
            body = struct.pack("<IB", 1, rng.randrange(256)) + struct.pack("<I", 0xFFFFFF00)
            payload = HELLO + struct.pack("<I", len(body)) + body
        else:
            body = struct.pack("<IB", 1, 3) + b"".join(
                struct.pack("<I", n) + os.urandom(n) for n in (32, rng.randrange(0, 40), 16, 3, 0))
            payload = HELLO + struct.pack("<I", len(body)) + body
        try:
            with tls_client(remote, node.name, where) as t:
                t.sendall(payload)
                t.shutdown(socket.SHUT_WR)  # EOF: the node closes its side
                while t.recv(4096):
                    pass
        except OSError:
            pass
    slow.close()
    h = open_session(mod, REF_PIN)
    pub, priv = ec_pair(mod, h)
    mid = counters(gw)
    for i in range(4):  # the nodes still serve direct calls over TLS
        rv, sig = sign_once(mod, h, priv, b"after %d" % i)
        assert rv == 0 and verify(mod, h, pub, b"after %d" % i, sig) == 0
    assert total(counters(gw), "direct_tls_calls") >= total(mid, "direct_tls_calls") + 4


def test_a_revoked_ticket_is_refused_over_tls(remote: Remote, mod: Raw) -> None:
    h = open_session(mod, REF_PIN)
    _, priv = ec_pair(mod, h)
    assert sign_once(mod, h, priv)[0] == 0
    gw = remote.gw
    node = nodes(gw)[0]
    secret = (gw.state / "secrets" / "cluster.secret").read_bytes()
    user, password = REF_PIN.split(":", 1)
    desc = encode_descriptor("sign", priv, codec.mech_to_wire(MechanismSpec(0x1041)), "sha256", b"",
                             None, 0, 1 << 19)
    loop = asyncio.new_event_loop()
    c = loop.run_until_complete(NodeClient.connect(f"unix:{node / 'node.sock'}", cluster_secret=secret))
    lid = loop.run_until_complete(c.login(1, user, password)).login_id
    t, key, addresses = loop.run_until_complete(c.direct_ticket(lid))
    tls = [a for a in addresses.split(" ") if a.startswith("tls:")]
    assert tls and tls[0].startswith(f"tls:{node.name}@")  # the name the module checks

    def call(ticket: bytes) -> tuple[int, int, int]:
        with tls_client(remote, node.name) as s:
            s.sendall(HELLO)
            recv_all(s, 16)
            body = struct.pack("<IB", 9, 3) + b"".join(struct.pack("<I", len(x)) + x for x in (
                ticket, desc, descriptor_mac(key, desc), b"m", b""))
            s.sendall(struct.pack("<I", len(body)) + body)
            _, rid, rv, flags, n = struct.unpack("<IIQBI", recv_all(s, 21))
            recv_all(s, n) if n else b""
            assert rid == 9
            return rv, flags, n
    try:
        assert call(t) == (0, 0, 64)
    finally:
        loop.run_until_complete(c.logout(lid))
        loop.run_until_complete(c.close())
        loop.close()
    assert call(t) == (RV.USER_NOT_LOGGED_IN, 1, 0)  # revoked: handed to the daemon
    assert call(os.urandom(32)) == (RV.USER_NOT_LOGGED_IN, 1, 0)


def test_a_partition_closes_the_tls_listener_too(remote: Remote, mod: Raw) -> None:
    gw = remote.gw
    h = open_session(mod, REF_PIN)
    pub, priv = ec_pair(mod, h)
    assert sign_once(mod, h, priv)[0] == 0
    victim = nodes(gw)[0]
    address = host_port(str(status(gw)[victim.name]["direct_address"]))
    sessions = [open_session(mod) for _ in range(4)]
    for s in sessions:
        assert sign_init(mod, s, priv) == 0
    r = run_cli(["hsm", "partition", victim.name, "--state", str(gw.state)], timeout=120)
    assert r.returncode == 0, r.stderr
    try:
        for s in sessions:
            rv, sig = sign(mod, s, b"partitioned")
            assert rv == 0 and verify(mod, h, pub, b"partitioned", sig) == 0, hex(rv)
        c = socket.create_connection(address, timeout=10)  # accepted, then closed at once
        try:
            assert c.recv(16) == b""
        except ConnectionResetError:
            pass
        c.close()
    finally:
        r = run_cli(["hsm", "heal", victim.name, "--state", str(gw.state)], timeout=120)
        assert r.returncode == 0, r.stderr
    assert wait_for(lambda: healthy(gw), 90)


# -- the listener's bounds, in-process (a real listener; a stand-in for the node's server) ---------

class _StandIn:
    """What DirectService reads of the node server when no call is made."""

    def __init__(self, max_connections: int) -> None:
        from hsmsim.node.faults import Faults
        self.faults = Faults()
        self.max_connections = max_connections


def test_the_tls_listener_caps_connections_and_drops_slow_handshakes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from hsmsim.node import direct_tls
    from hsmsim.node.direct import DirectService

    ca_key, ca = _cert("ca", None, None, [], ca=True)
    key, cert = _cert("hsm-aaaaaaaaaaa", ca_key, ca.subject, [x509.DNSName("hsm-aaaaaaaaaaa")])
    crt, k = _write(tmp_path, "node", key, cert)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(crt), str(k))
    monkeypatch.setattr(direct_tls, "HANDSHAKE_TIMEOUT_S", 0.5)

    async def run() -> None:
        svc = DirectService(_StandIn(max_connections=2))  # type: ignore[arg-type]
        where = await svc.listen_tls([("127.0.0.1", 0)], ctx, "hsm-aaaaaaaaaaa")
        host, port = host_port(where)
        assert svc.tls_address == f"tls:hsm-aaaaaaaaaaa@{host}:{port}"
        slow = [await asyncio.open_connection(host, port) for _ in range(2)]  # no handshake
        r3, w3 = await asyncio.open_connection(host, port)  # over the cap: closed at once
        assert await asyncio.wait_for(r3.read(), 30) == b""
        for r, _ in slow:  # dropped when their handshake time is up, and counted
            assert await asyncio.wait_for(r.read(), 30) == b""
        assert svc.handshakes.failed == 2 and svc.handshaking == 0
        for _, w in slow + [(r3, w3)]:
            w.close()
        await svc.close()

    with caplog.at_level("WARNING", logger="hsmsim.node.direct"):
        asyncio.run(run())
    lines = [r.getMessage() for r in caplog.records if "handshake" in r.getMessage()]
    assert len(lines) == 2 and all(line.startswith("direct TLS handshake from 127.0.0.1:") for line in lines)
