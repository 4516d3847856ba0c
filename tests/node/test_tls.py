"""Mutual TLS on the node's TCP listener: a client with a cluster-CA certificate connects;
one without a certificate, or with a certificate from another CA, is refused."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hsmsim.node.client import NodeClient, NodeUnavailable
from hsmsim.node.tls import client_context

from .nodeproc import NodeProc, run, write_secret


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(out: Path, cn: str, issuer: tuple[ec.EllipticCurvePrivateKey, x509.Name] | None,
           ca: bool = False) -> tuple[ec.EllipticCurvePrivateKey, x509.Name]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    signer, issuer_name = issuer if issuer else (key, _name(cn))
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(issuer_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(signer, hashes.SHA256()))
    (out / f"{cn}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / f"{cn}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return key, _name(cn)


def test_mutual_tls(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    ca = _issue(pki, "cluster-ca", None, ca=True)
    _issue(pki, "node", ca)
    _issue(pki, "daemon", ca)
    rogue = _issue(pki, "rogue-ca", None, ca=True)
    _issue(pki, "intruder", rogue)
    node = NodeProc(tmp_path, "hsm-tlstlstlstl", "us-east-1a",
                    write_secret(tmp_path / "secrets" / "cluster.secret"), "new")
    node.address = "tcp:127.0.0.1:0"
    node.extra_args = ["--tls-ca", str(pki / "cluster-ca.crt"), "--tls-cert",
                       str(pki / "node.crt"), "--tls-key", str(pki / "node.key")]
    node.start()
    try:
        async def body() -> None:
            good = client_context(pki / "cluster-ca.crt", pki / "daemon.crt", pki / "daemon.key")
            c = await NodeClient.connect(node.bound, cluster_secret=node.secret, ssl=good)
            assert (await c.status()).hsm_id == "hsm-tlstlstlstl"
            await c.close()
            # Another CA's client certificate: the node refuses the handshake.
            bad = client_context(pki / "cluster-ca.crt", pki / "intruder.crt",
                                 pki / "intruder.key")
            with pytest.raises((NodeUnavailable, ssl.SSLError, ConnectionError)):
                c = await NodeClient.connect(node.bound, cluster_secret=node.secret, ssl=bad,
                                             timeout=5)
                await c.ping()
            # No client certificate at all.
            anon = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            anon.check_hostname = False
            anon.load_verify_locations(str(pki / "cluster-ca.crt"))
            with pytest.raises((NodeUnavailable, ssl.SSLError, ConnectionError)):
                c = await NodeClient.connect(node.bound, cluster_secret=node.secret, ssl=anon,
                                             timeout=5)
                await c.ping()
            # Plain TCP to a TLS listener fails too.
            with pytest.raises(NodeUnavailable):
                await NodeClient.connect(node.bound, cluster_secret=node.secret, timeout=3)
            # And the node still serves good clients.
            c = await NodeClient.connect(node.bound, cluster_secret=node.secret, ssl=good)
            await c.ping()
            await c.close()
        run(body)
    finally:
        node.stop()
