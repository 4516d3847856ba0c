"""The module reaching a remote daemon over TCP with TLS: `HSMSIM_SOCKET=tls:host:port`, the
server certificate checked against a CA file and the expected name; nothing without a trust
anchor, nothing with the wrong one."""

from __future__ import annotations

import datetime
import ipaddress
import socket
from collections.abc import Iterator
from ctypes import byref, c_ubyte, c_ulong
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hsmsim.pkcs11.constants import RV, SessionState
from p11helpers import REF_PIN, ClusterGateway, copy_module
from p11raw import Raw, open_session, state

U = c_ulong


def _ca(tmp: Path, name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (tmp / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


@pytest.fixture(scope="module")
def tls_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ClusterGateway, int, Path]]:
    tmp = tmp_path_factory.mktemp("tlsgw")
    ca_key, ca = _ca(tmp, "ca")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gateway")]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("hsmsim-gateway"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    (tmp / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "server.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    (tmp / "server.key").chmod(0o600)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gw = ClusterGateway(tmp / "gateway.sock", {"tls_listen": f"127.0.0.1:{port}", "tls_cert": str(tmp / "server.pem"),
                                           "tls_key": str(tmp / "server.key")})
    yield gw, port, tmp
    gw.stop()


def test_remote_daemon_over_tls(tls_gateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    gw, port, d = tls_gateway
    raw = Raw(copy_module(tmp_path))
    monkeypatch.setenv("HSMSIM_SOCKET", f"tls:127.0.0.1:{port}")
    monkeypatch.setenv("HSMSIM_CA_FILE", str(d / "ca.pem"))
    monkeypatch.setenv("HSMSIM_SERVER_NAME", "hsmsim-gateway")
    assert raw.C_Initialize(None) == RV.OK
    try:
        h = open_session(raw, REF_PIN)
        assert state(raw, h) == SessionState.RW_USER
        h2 = open_session(raw)  # a second pooled TLS connection joins the same application
        assert state(raw, h2) == SessionState.RW_USER
        n = U()
        assert raw.C_GetSlotList(c_ubyte(1), None, byref(n)) == RV.OK and n.value == 1
    finally:
        assert raw.C_Finalize(None) == RV.OK


def test_tls_needs_the_right_trust_anchor_and_name(tls_gateway, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    gw, port, d = tls_gateway
    raw = Raw(copy_module(tmp_path))
    monkeypatch.setenv("HSMSIM_SOCKET", f"tls:127.0.0.1:{port}")
    monkeypatch.delenv("HSMSIM_CA_FILE", raising=False)
    monkeypatch.setenv("HSMSIM_CONF", str(tmp_path / "none.conf"))
    assert raw.C_Initialize(None) == RV.GENERAL_ERROR  # no CA file: never TLS without a trust anchor
    _ca(tmp_path, "other-ca")
    monkeypatch.setenv("HSMSIM_CA_FILE", str(tmp_path / "other-ca.pem"))
    assert raw.C_Initialize(None) == RV.DEVICE_ERROR  # an untrusted server certificate
    monkeypatch.setenv("HSMSIM_CA_FILE", str(d / "ca.pem"))
    monkeypatch.setenv("HSMSIM_SERVER_NAME", "someone-else")
    assert raw.C_Initialize(None) == RV.DEVICE_ERROR  # the certificate names another host
    monkeypatch.delenv("HSMSIM_SERVER_NAME")
    conf = tmp_path / "pkcs11.conf"
    conf.write_text(f"socket = tls:127.0.0.1:{port}\nca_file = {d / 'ca.pem'}\nserver_name = hsmsim-gateway\n")
    monkeypatch.delenv("HSMSIM_SOCKET")
    monkeypatch.delenv("HSMSIM_CA_FILE")
    monkeypatch.setenv("HSMSIM_CONF", str(conf))
    assert raw.C_Initialize(None) == RV.OK  # everything from the config file
    assert raw.C_Finalize(None) == RV.OK
    assert gw.alive()
