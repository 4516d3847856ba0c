"""GnuTLS (Debian's gnutls-bin): p11tool opens read-only sessions even to list tokens, so on a
cluster with CloudHSM's read-only refusal it sees no token; with gateway.quirk_ro_session_fails
= false (a cluster of this module's own) it lists the token, test-signs with an HSM key, writes
a certificate to the token, and certtool makes a self-signed certificate with the HSM key,
checked here by pyca. p11tool's own key generation is refused (its public-key template says
CKA_PRIVATE=false), so the key comes from pkcs11-tool."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from hsmsim.testing.cluster import HsmsimCluster, free_port, start_cluster

from .conftest import HERE, assert_recipe_in_source, b64, client_env, require, run_client

SCRIPT = HERE / "gnutls" / "hsmsim-gnutls.sh"


@pytest.fixture(scope="module")
def rw_only_off_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HsmsimCluster]:
    """A cluster that lets read-only sessions open (what the README tells GnuTLS users to set)."""
    state = tmp_path_factory.mktemp("gnutls") / "state"
    state.mkdir()
    (state / "hsmsim.toml").write_text(
        f"[kms]\nport = {free_port()}\n\n[gateway]\nquirk_ro_session_fails = false\n")
    c = start_cluster(state)
    try:
        yield c
    finally:
        c.down()


def test_p11tool_sees_no_token_while_ro_sessions_fail(client_cluster: HsmsimCluster,
                                                      tmp_path: Path) -> None:
    tools = require("p11tool")
    env = client_env(client_cluster, HOME=str(tmp_path), GNUTLS_PIN=client_cluster.pin)
    r = subprocess.run([tools["p11tool"], "--provider", str(client_cluster.module_path),
                        "--list-tokens"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "hsm1" not in r.stdout and "Token 0" not in r.stdout


def test_gnutls(rw_only_off_cluster: HsmsimCluster, tmp_path: Path) -> None:
    require("p11tool", "certtool", "pkcs11-tool")
    c = rw_only_off_cluster
    # The README's setting, accepted as written (the value is already in force here).
    set_it = c.cli("config", "set", "gateway.quirk_ro_session_fails", "false")
    assert set_it.returncode == 0, set_it.stderr
    env = client_env(c, HOME=str(tmp_path), TMPDIR=str(tmp_path))
    out = run_client(["bash", str(SCRIPT)], env)

    assert "PKCS #11 error in attribute" in out["p11tool_generate"]
    tokens = b64(out, "tokens").decode()
    assert "Label: hsm1" in tokens and "Model: CloudHSM" in tokens
    objects = b64(out, "objects").decode()
    for kind in ("public", "private", "cert"):
        assert f"id=%61%01;object=tls-rsa;type={kind}" in objects
    assert b64(out, "test_sign").decode().splitlines() == [
        "Signing using RSA-SHA256... ok",
        "Verifying against private key parameters... ok",
        "Verifying against public key in the token... ok"]

    # certtool's certificate: signed by the HSM key, over the HSM key's public half, and the
    # same bytes read back from the token.
    cert = x509.load_pem_x509_certificate(b64(out, "cert_pem"))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "hsmsim gnutls"
    cert.verify_directly_issued_by(cert)
    pub = serialization.load_pem_public_key(b64(out, "public_pem"))
    assert isinstance(pub, rsa.RSAPublicKey) and pub.key_size == 2048
    assert cert.public_key() == pub
    token_cert = x509.load_pem_x509_certificate(b64(out, "token_cert_pem"))
    assert token_cert == cert


def test_readme_recipe_is_what_runs() -> None:
    assert_recipe_in_source("GnuTLS (p11tool, certtool)", SCRIPT)
