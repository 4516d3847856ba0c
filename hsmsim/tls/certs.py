"""Certificates for token keys: X.509 structures built with `cryptography`, signed by a callable
(the token key through PKCS#11, or the local CA's key), and the local CA kept under
`$STATE/tls/ca/`.

`cryptography` cannot sign with an external key, so the to-be-signed part is produced by
signing once with a throw-away software key of the same family (the signature algorithm
identifier depends only on family and hash), then re-assembled around the token's signature."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hsmsim import files
from hsmsim.tls.errors import TlsError
from hsmsim.tls.hsmkey import KeySpec, PublicKey

Signer = Callable[[bytes], bytes]  # to-be-signed bytes -> signature value

CA_DIR = Path("tls") / "ca"
CA_KEY = "ca.key"
CA_CERT = "ca.crt"
CA_NAME = "hsmsim local TLS CA"

_HASHES: dict[str, hashes.SHA256 | hashes.SHA384 | hashes.SHA512] = {
    "sha256": hashes.SHA256(), "sha384": hashes.SHA384(), "sha512": hashes.SHA512()}


# ---- minimal DER, only what re-assembly needs ------------------------------------------

def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(content)) + content


def _elements(der: bytes) -> list[bytes]:
    """The complete TLVs inside one outer SEQUENCE."""
    def read(buf: bytes, pos: int) -> tuple[int, int]:  # (content start, content end)
        first = buf[pos + 1]
        if first < 0x80:
            return pos + 2, pos + 2 + first
        n = first & 0x7F
        length = int.from_bytes(buf[pos + 2:pos + 2 + n], "big")
        return pos + 2 + n, pos + 2 + n + length

    start, end = read(der, 0)
    out, pos = [], start
    while pos < end:
        _, stop = read(der, pos)
        out.append(der[pos:stop])
        pos = stop
    return out


def _signed(tbs: bytes, algorithm: bytes, signature: bytes) -> bytes:
    """SEQUENCE { tbs, AlgorithmIdentifier, BIT STRING signature } (certificates and CSRs)."""
    return _tlv(0x30, tbs + algorithm + _tlv(0x03, b"\x00" + signature))


_scratch_keys: dict[str, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey] = {}


def _scratch_key(spec: KeySpec) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    # Only the algorithm identifier of its signature is kept, so a small key is enough.
    if spec.algorithm not in _scratch_keys:
        _scratch_keys[spec.algorithm] = (
            rsa.generate_private_key(65537, 1024) if spec.is_rsa
            else ec.generate_private_key(ec.SECP256R1()))
    return _scratch_keys[spec.algorithm]


def _algorithm_identifier(spec: KeySpec) -> bytes:
    key = _scratch_key(spec)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "scratch")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, _HASHES[spec.hash])
    return _elements(csr.public_bytes(serialization.Encoding.DER))[1]


def sign_certificate(builder: x509.CertificateBuilder, spec: KeySpec,
                     signer: Signer) -> x509.Certificate:
    """The certificate of `builder` (public key already set) signed by `signer`."""
    draft = builder.sign(_scratch_key(spec), _HASHES[spec.hash])
    parts = _elements(draft.public_bytes(serialization.Encoding.DER))
    tbs, algorithm = parts[0], parts[1]
    return x509.load_der_x509_certificate(_signed(tbs, algorithm, signer(tbs)))


def sign_csr(subject: x509.Name, public_key: PublicKey, spec: KeySpec,
             signer: Signer) -> x509.CertificateSigningRequest:
    """A PKCS#10 request for `public_key`, signed by `signer` (proof of possession)."""
    spki = public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    info = _tlv(0x30, _tlv(0x02, b"\x00") + subject.public_bytes() + spki + b"\xa0\x00")
    csr = x509.load_der_x509_csr(_signed(info, _algorithm_identifier(spec), signer(info)))
    if not csr.is_signature_valid:
        raise TlsError("the token's signature on the certificate request does not verify")
    return csr


# ---- certificate contents ----------------------------------------------------------------

def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


def subject_alt_names(cn: str, extra: Sequence[str] = ()) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for value in (cn, *extra):
        try:
            general: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(value))
        except ValueError:
            general = x509.DNSName(value)
        if general not in names:
            names.append(general)
    return names


def leaf_builder(cn: str, public_key: PublicKey, issuer: x509.Name, days: int,
                 sans: Sequence[str], issuer_key: PublicKey | None) -> x509.CertificateBuilder:
    """A TLS server certificate: CN and SAN, serverAuth, key usage fitting the key type."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = _now()
    is_rsa = isinstance(public_key, rsa.RSAPublicKey)
    builder = (x509.CertificateBuilder()
               .subject_name(subject).issuer_name(issuer).public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature=True, key_encipherment=is_rsa, content_commitment=False,
                   data_encipherment=False, key_agreement=False, key_cert_sign=False,
                   crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                              critical=False)
               .add_extension(x509.SubjectAlternativeName(subject_alt_names(cn, sans)),
                              critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key),
                              critical=False))
    if issuer_key is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key), critical=False)
    return builder


# ---- the local CA ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LocalCa:
    """hsmsim's local TLS CA: a software EC P-256 key in a 0600 file and its self-signed
    certificate, under `$STATE/tls/ca/`. It stands for the user's own PKI."""

    # FIDELITY: CloudHSM has no CA of its own for TLS server certificates (the user's CA signs
    # the CSR made with the engine); this local CA is a convenience of the simulator.

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey = dataclasses.field(repr=False)
    cert_path: Path

    def issue(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        return builder.sign(self.key, hashes.SHA256())


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def load_or_create_ca(state: Path) -> LocalCa:
    """The state directory's local CA, created on first use."""
    ca_dir = state / CA_DIR
    key_path, cert_path = ca_dir / CA_KEY, ca_dir / CA_CERT
    if key_path.exists() and cert_path.exists():
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise TlsError(f"the local CA in {ca_dir} is unreadable ({type(exc).__name__}); "
                           "remove that directory to make a new CA") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or \
                cert.public_key() != key.public_key():
            raise TlsError(f"the local CA key and certificate in {ca_dir} do not match")
        return LocalCa(cert, key, cert_path)
    ca_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(ca_dir.parent, 0o700)
    os.chmod(ca_dir, 0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME,
                                         f"ca-{secrets.token_hex(4)}")])
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, key_encipherment=False, content_commitment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    _write_private(key_path, key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    files.write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)  # public
    return LocalCa(cert, key, cert_path)


def verify_signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> None:
    """Raises TlsError unless `issuer` signed `cert` (signature, names and validity)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise TlsError(f"certificate check failed: {exc or type(exc).__name__}") from None


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
