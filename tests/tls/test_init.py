"""`hsmsim tls init` against both backends: the key pair is a non-extractable token key, the
certificate carries its public key and verifies, the written openssl.cnf loads the engine and
reaches the key through the printed URI, and no PIN is written into the kit."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from hsmsim.testing.cluster import run_cli
from hsmsim.tls.kit import Kit
from hsmsim.tls.servers import kit_environ
from hsmsim.tls.uri import Pkcs11Uri

from .conftest import Backend, Kits


def _openssl(kit: Kit, *args: str, data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["openssl", *args], input=data, capture_output=True,
                          env=kit_environ(kit), timeout=60)


def _engine_public_key(kit: Kit) -> bytes:
    r = _openssl(kit, "pkey", "-engine", "pkcs11", "-inform", "engine", "-in", kit.uri,
                 "-pubout", "-outform", "DER")
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)


def _load(path: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(Path(path).read_bytes())


def _check_kit(kit: Kit, backend: Backend, issuer: str, cn: str) -> None:
    cert, = _load(kit.files["cert"])
    # The certificate carries the token's public key, as the engine reads it through the URI.
    assert _engine_public_key(kit) == _spki(cert)
    if issuer == "self":
        cert.verify_directly_issued_by(cert)  # signed through PKCS#11 by the token key
        assert _load(kit.files["chain"]) == [cert]
        assert _load(kit.files["fullchain"]) == [cert]
    else:
        ca, = _load(kit.files["chain"])
        cert.verify_directly_issued_by(ca)
        assert ca == x509.load_pem_x509_certificate(
            (backend.state / "tls" / "ca" / "ca.crt").read_bytes())
        assert _load(kit.files["fullchain"]) == [cert, ca]
    # Either way the request was signed by the token key (proof of possession).
    csr = x509.load_pem_x509_csr(Path(kit.files["csr"]).read_bytes())
    assert csr.is_signature_valid and _spki(cert) == csr.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert cert.subject.rfc4514_string() == f"CN={cn}"
    # The URI round-trips and names exactly this key.
    uri = Pkcs11Uri.parse(kit.uri)
    assert str(uri) == kit.uri
    assert (uri.token, uri.object, uri.id, uri.type) == (
        backend.token, kit.label, bytes.fromhex(kit.key_id), "private")
    assert uri.pin_value is None and uri.pin_source is None


def test_ca_signed_rsa_kit_is_valid(kits: Kits) -> None:
    _check_kit(kits.rsa, kits.backend, "ca", "localhost")
    assert isinstance(_load(kits.rsa.files["cert"])[0].public_key(), rsa.RSAPublicKey)


def test_self_signed_ec_kit_is_valid(kits: Kits) -> None:
    _check_kit(kits.ec, kits.backend, "self", "ec.example.test")
    public = _load(kits.ec.files["cert"])[0].public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp384r1"


def test_engine_signs_with_the_token_key(kits: Kits) -> None:
    kit = kits.rsa
    public = x509.load_pem_x509_certificate(Path(kit.files["cert"]).read_bytes()).public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    digest = hashlib.sha256(b"signed through the openssl.cnf of the kit").digest()
    r = _openssl(kit, "pkeyutl", "-sign", "-engine", "pkcs11", "-keyform", "engine",
                 "-inkey", kit.uri, "-pkeyopt", "digest:sha256", data=digest)
    assert r.returncode == 0, r.stderr.decode()
    public.verify(r.stdout, digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        public.verify(r.stdout, hashlib.sha256(b"other").digest(), padding.PKCS1v15(),
                      Prehashed(hashes.SHA256()))


def test_openssl_cnf_loads_the_engine_with_the_module(kits: Kits) -> None:
    kit = kits.ec
    text = Path(kit.files["openssl_cnf"]).read_text()
    assert f"MODULE_PATH = {kits.backend.module}" in text
    r = _openssl(kit, "engine", "-t", "-c", "pkcs11")
    assert r.returncode == 0 and b"[ available ]" in r.stdout, r.stdout + r.stderr
    # The PIN comes from the environment only: without it the key cannot be reached.
    env = kit_environ(kit)
    env.pop("HSMSIM_PIN")
    r2 = subprocess.run(["openssl", "pkey", "-engine", "pkcs11", "-inform", "engine", "-in",
                         kit.uri, "-pubout"], capture_output=True, env=env, timeout=60)
    assert b"BEGIN PUBLIC KEY" not in r2.stdout and b"not found" in r2.stderr


def test_private_key_is_a_non_extractable_token_key(kits: Kits) -> None:
    backend, kit = kits.backend, kits.rsa
    env = {**os.environ, **backend.module_env}
    r = subprocess.run(["pkcs11-tool", "--module", str(backend.module), "--token-label",
                        backend.token, "--login", "--pin", backend.pin, "--list-objects",
                        "--type", "privkey", "--id", kit.key_id],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"label:      {kit.label}" in r.stdout
    access = re.search(r"Access:\s*(.*)", r.stdout)
    assert access is not None
    flags = access.group(1)
    assert "sensitive" in flags and "never extractable" in flags, r.stdout
    usage = re.search(r"Usage:\s*(.*)", r.stdout)
    assert usage is not None and "sign" in usage.group(1)


def test_no_pin_in_the_kit_and_pin_file_private(kits: Kits) -> None:
    password = kits.backend.pin.split(":", 1)[-1]
    for kit in (kits.rsa, kits.ec):
        for path in Path(kit.out_dir).iterdir():
            if path.is_file():
                assert password.encode() not in path.read_bytes(), path.name
        assert stat.S_IMODE(Path(kit.pin_file).stat().st_mode) == 0o600
        assert Path(kit.pin_file).read_text().strip() == kits.backend.pin
        assert f"cat {kit.pin_file}" in Path(kit.files["env"]).read_text()


def test_each_init_makes_its_own_key(kits: Kits) -> None:
    a, b = kits.rsa, kits.ec
    assert a.uri != b.uri and a.label != b.label and a.key_id != b.key_id
    assert _engine_public_key(a) != _engine_public_key(b)


def test_uri_matches_hsmsim_key_list(kits: Kits) -> None:
    if kits.backend.name != "hsmsim":
        pytest.skip("`hsmsim key list` lists the cluster's keys only")
    r = run_cli(["key", "list", "--json", "--state", str(kits.backend.state)])
    assert r.returncode == 0, r.stderr
    listed = {k["uri"]: k for k in json.loads(r.stdout)}
    for kit in (kits.rsa, kits.ec):
        entry = listed[kit.uri]
        assert entry["class"] == "PRIVATE_KEY" and entry["id"] == kit.key_id
        held, total = map(int, entry["coverage"].split("/"))
        assert total == 3 and held >= 2  # key availability: on 2 HSMs at least


def test_kit_files_have_explicit_modes(kits: Kits) -> None:
    """Whatever the umask: the kit's directory is the user's alone, certificates are public,
    configuration is private and scripts are executable by the user only."""
    kit = kits.rsa
    out = Path(kit.out_dir)
    assert out.stat().st_mode & 0o777 == 0o700
    want = {"cert": 0o644, "chain": 0o644, "fullchain": 0o644, "csr": 0o644,
            "openssl_cnf": 0o600, "nginx_conf": 0o600, "nginx_server": 0o600, "kit": 0o600,
            "env": 0o700, "nginx_sh": 0o700, "s_server": 0o700}
    have = {name: Path(kit.files[name]).stat().st_mode & 0o777 for name in want}
    assert have == want
