"""Certificate assembly around an external signature, and the local CA (software keys stand
in for the token here; the backends' tests sign through PKCS#11)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hsmsim.tls import certs
from hsmsim.tls.errors import TlsError
from hsmsim.tls.hsmkey import KEY_SPECS

NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "www.example.test")])


def _key(spec_name: str) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    spec = KEY_SPECS[spec_name]
    if spec.is_rsa:
        return rsa.generate_private_key(65537, spec.bits)
    return ec.generate_private_key(ec.SECP256R1() if spec.bits == 256 else ec.SECP384R1())


def _signer(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, hash_name: str) -> certs.Signer:
    h = {"sha256": hashes.SHA256(), "sha384": hashes.SHA384()}[hash_name]
    if isinstance(key, rsa.RSAPrivateKey):
        return lambda data: key.sign(data, padding.PKCS1v15(), h)
    return lambda data: key.sign(data, ec.ECDSA(h))


@pytest.mark.parametrize("spec_name", ["rsa2048", "ec-p256", "ec-p384"])
def test_self_signed_certificate_from_external_signature(spec_name: str) -> None:
    spec = KEY_SPECS[spec_name]
    key = _key(spec_name)
    builder = certs.leaf_builder("www.example.test", key.public_key(), NAME, 30,
                                 ["127.0.0.1"], None)
    cert = certs.sign_certificate(builder, spec, _signer(key, spec.hash))
    cert.verify_directly_issued_by(cert)
    assert cert.public_key() == key.public_key()
    assert cert.signature_hash_algorithm is not None
    assert cert.signature_hash_algorithm.name == spec.hash
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["www.example.test"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment == spec.is_rsa


def test_a_wrong_signature_does_not_verify() -> None:
    spec = KEY_SPECS["ec-p256"]
    key, other = _key("ec-p256"), _key("ec-p256")
    builder = certs.leaf_builder("x.test", key.public_key(), NAME, 1, [], None)
    cert = certs.sign_certificate(builder, spec, _signer(other, spec.hash))
    with pytest.raises(TlsError, match="certificate check failed"):
        certs.verify_signed_by(cert, cert)


@pytest.mark.parametrize("spec_name", ["rsa2048", "ec-p384"])
def test_csr_is_signed_by_the_external_key(spec_name: str) -> None:
    spec = KEY_SPECS[spec_name]
    key = _key(spec_name)
    csr = certs.sign_csr(NAME, key.public_key(), spec, _signer(key, spec.hash))
    assert csr.is_signature_valid and csr.public_key() == key.public_key()
    assert csr.subject == NAME
    with pytest.raises(TlsError, match="does not verify"):
        certs.sign_csr(NAME, key.public_key(), spec, _signer(_key(spec_name), spec.hash))


def test_der_lengths_in_every_form() -> None:
    for n in (0, 127, 128, 255, 256, 65535, 65536):
        tlv = certs._tlv(0x04, b"\x00" * n)
        assert certs._elements(certs._tlv(0x30, tlv)) == [tlv]


def test_local_ca_is_created_once_with_private_files(tmp_path: Path) -> None:
    ca = certs.load_or_create_ca(tmp_path)
    key_file = tmp_path / "tls" / "ca" / "ca.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "tls" / "ca").stat().st_mode) == 0o700
    again = certs.load_or_create_ca(tmp_path)
    assert again.cert == ca.cert
    bc = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0
    leaf_key = _key("ec-p256")
    leaf = ca.issue(certs.leaf_builder("a.test", leaf_key.public_key(), ca.cert.subject, 1, [],
                                       ca.cert.public_key()))  # type: ignore[arg-type]
    certs.verify_signed_by(leaf, ca.cert)
    assert "BEGIN PRIVATE KEY" not in repr(ca)


def test_corrupt_or_mismatched_ca_is_a_clear_error(tmp_path: Path) -> None:
    certs.load_or_create_ca(tmp_path)
    ca_dir = tmp_path / "tls" / "ca"
    (ca_dir / "ca.key").write_text("garbage")
    with pytest.raises(TlsError, match="unreadable"):
        certs.load_or_create_ca(tmp_path)
    os.remove(ca_dir / "ca.key")
    other = tmp_path / "other"
    certs.load_or_create_ca(other)
    (ca_dir / "ca.key").write_bytes((other / "tls" / "ca" / "ca.key").read_bytes())
    with pytest.raises(TlsError, match="do not match"):
        certs.load_or_create_ca(tmp_path)
