"""TLS server key pairs in a PKCS#11 token, through any module (libhsmsim-pkcs11.so or SoftHSM2
directly): generation as non-extractable token keys, reading the public key back, and signing
with the private key. A PKCS#11 client like any other, built on python-pkcs11."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from hsmsim.tls.errors import TlsError

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

# DigestInfo prefixes (RFC 8017 section 9.2, note 1) for CKM_RSA_PKCS over a local digest.
_DIGEST_INFO = {
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}


@dataclasses.dataclass(frozen=True)
class KeySpec:
    """One `--key` choice: algorithm, size or curve, and the hash its certificates use."""

    name: str
    algorithm: str  # "rsa" | "ec"
    bits: int
    curve: str | None
    hash: str

    @property
    def is_rsa(self) -> bool:
        return self.algorithm == "rsa"


KEY_SPECS: dict[str, KeySpec] = {
    "rsa2048": KeySpec("rsa2048", "rsa", 2048, None, "sha256"),
    "rsa3072": KeySpec("rsa3072", "rsa", 3072, None, "sha256"),
    "rsa4096": KeySpec("rsa4096", "rsa", 4096, None, "sha256"),
    "ec-p256": KeySpec("ec-p256", "ec", 256, "secp256r1", "sha256"),
    "ec-p384": KeySpec("ec-p384", "ec", 384, "secp384r1", "sha384"),
}

_CURVES: dict[str, ec.EllipticCurve] = {"secp256r1": ec.SECP256R1(), "secp384r1": ec.SECP384R1()}


def key_spec(name: str) -> KeySpec:
    try:
        return KEY_SPECS[name]
    except KeyError:
        raise TlsError(f"--key must be one of {', '.join(KEY_SPECS)}, not {name!r}") from None


@dataclasses.dataclass(frozen=True)
class TokenRef:
    """Where keys go: a PKCS#11 module, a token label and the PIN to log in with.
    The PIN is a secret: it is kept out of repr() and never printed."""

    module: Path
    token: str
    pin: str = dataclasses.field(repr=False)


def _pkcs11_error(step: str, exc: BaseException) -> TlsError:
    # python-pkcs11 exception class names are the CKR_* names in CamelCase (PinIncorrect...).
    return TlsError(f"{step} failed: {type(exc).__name__}{': ' + str(exc) if str(exc) else ''}")


class TokenSession:
    """One logged-in read-write session on a token; use `open_session`."""

    def __init__(self, session: Any) -> None:
        self._session = session
        # Keys made in this session, by id: used by handle rather than found again, since a
        # search right after creation may reach an HSM the key has not been copied to yet.
        self._made: dict[bytes, Any] = {}
        self._made_public: dict[bytes, Any] = {}

    def generate(self, spec: KeySpec, label: str, key_id: bytes) -> PublicKey:
        """Makes a token key pair: the private key sensitive, non-extractable, able to sign
        (and, for RSA, to decrypt, as TLS 1.2 RSA key exchange needs); returns its public key."""
        import pkcs11
        from pkcs11 import Attribute, KeyType
        from pkcs11.util.ec import encode_named_curve_parameters

        private = {Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
                   Attribute.EXTRACTABLE: False, Attribute.SIGN: True,
                   Attribute.DECRYPT: spec.is_rsa, Attribute.UNWRAP: False,
                   Attribute.DERIVE: False}
        public = {Attribute.TOKEN: True, Attribute.VERIFY: True, Attribute.ENCRYPT: spec.is_rsa,
                  Attribute.WRAP: False}
        try:
            if spec.is_rsa:
                pub, _priv = self._session.generate_keypair(
                    KeyType.RSA, spec.bits, id=key_id, label=label, store=True,
                    public_template=public, private_template=private)
            else:
                assert spec.curve is not None
                params = self._session.create_domain_parameters(
                    KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(spec.curve)},
                    local=True)
                pub, _priv = params.generate_keypair(
                    id=key_id, label=label, store=True,
                    public_template=public, private_template=private)
        except pkcs11.PKCS11Error as exc:
            raise _pkcs11_error(f"generating the {spec.name} key pair", exc) from None
        self._made[key_id] = _priv
        self._made_public[key_id] = pub
        return _public_key(pub, spec)

    def destroy(self, key_id: bytes) -> None:
        """Deletes a key pair made in this session (rolling back a failed `tls init`)."""
        import pkcs11

        for table in (self._made, self._made_public):
            obj = table.pop(key_id, None)
            if obj is not None:
                try:
                    obj.destroy()
                except pkcs11.PKCS11Error:
                    pass

    def _private(self, key_id: bytes) -> Any:
        import pkcs11
        from pkcs11 import ObjectClass

        if key_id in self._made:
            return self._made[key_id]
        try:
            return self._session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=key_id)
        except pkcs11.NoSuchKey:
            raise TlsError(f"no private key with id {key_id.hex()} on the token") from None
        except pkcs11.MultipleObjectsReturned:
            raise TlsError(f"several private keys have id {key_id.hex()}") from None
        except pkcs11.PKCS11Error as exc:
            raise _pkcs11_error("finding the private key", exc) from None

    def public_key(self, key_id: bytes, spec: KeySpec) -> PublicKey:
        import pkcs11
        from pkcs11 import ObjectClass

        try:
            pub = self._session.get_key(object_class=ObjectClass.PUBLIC_KEY, id=key_id)
        except pkcs11.PKCS11Error as exc:
            raise _pkcs11_error("reading the public key", exc) from None
        return _public_key(pub, spec)

    def private_attributes(self, key_id: bytes) -> dict[str, bool]:
        """The protection flags of the private key, as the token reports them."""
        from pkcs11 import Attribute

        key = self._private(key_id)
        names = {"token": Attribute.TOKEN, "sensitive": Attribute.SENSITIVE,
                 "extractable": Attribute.EXTRACTABLE, "private": Attribute.PRIVATE}
        return {name: bool(key[attr]) for name, attr in names.items()}

    def sign(self, key_id: bytes, spec: KeySpec, data: bytes) -> bytes:
        """The X.509 signature of `data` (RSA PKCS#1 v1.5 or DER-encoded ECDSA) with `spec.hash`.
        The digest is computed here and only the raw mechanism (CKM_RSA_PKCS / CKM_ECDSA) runs in
        the token: the one mechanism of each family every module has, as the engine also uses."""
        import pkcs11
        from pkcs11 import Mechanism
        from pkcs11.util.ec import encode_ecdsa_signature

        key = self._private(key_id)
        digest = hashlib.new(spec.hash, data).digest()
        try:
            if spec.is_rsa:
                return bytes(key.sign(_DIGEST_INFO[spec.hash] + digest,
                                      mechanism=Mechanism.RSA_PKCS))
            raw = bytes(key.sign(digest, mechanism=Mechanism.ECDSA))
        except pkcs11.PKCS11Error as exc:
            raise _pkcs11_error("signing with the token key", exc) from None
        return bytes(encode_ecdsa_signature(raw))


def _public_key(pub: Any, spec: KeySpec) -> PublicKey:
    from pkcs11 import Attribute
    from asn1crypto.core import OctetString  # type: ignore[import-untyped, unused-ignore]

    if spec.is_rsa:
        n = int.from_bytes(bytes(pub[Attribute.MODULUS]), "big")
        e = int.from_bytes(bytes(pub[Attribute.PUBLIC_EXPONENT]), "big")
        return rsa.RSAPublicNumbers(e, n).public_key()
    assert spec.curve is not None
    point = bytes(pub[Attribute.EC_POINT])
    if len(point) != 1 + 2 * ((spec.bits + 7) // 8):  # not a bare uncompressed point:
        point = bytes(OctetString.load(point).native)  # DER OCTET STRING, as the spec says
    return ec.EllipticCurvePublicKey.from_encoded_point(_CURVES[spec.curve], point)


def read_only_sessions_refused(ref: TokenRef) -> bool:
    """True when the token refuses a read-only session with CKR_FUNCTION_FAILED, as CloudHSM's
    library does. libp11 (the OpenSSL pkcs11 engine) opens read-only sessions and then waits
    forever, so servers using the engine hang at start against such a token."""
    import pkcs11

    try:
        lib = pkcs11.lib(str(ref.module))
        session = lib.get_token(token_label=ref.token).open(rw=False)
    except pkcs11.FunctionFailed:
        return True
    except (pkcs11.PKCS11Error, RuntimeError, OSError):
        return False
    session.close()
    return False


@contextmanager
def open_session(ref: TokenRef) -> Iterator[TokenSession]:
    """Loads the module, finds the token by label and logs in as the user (PIN `ref.pin`)."""
    import pkcs11

    if not ref.module.is_file():
        raise TlsError(f"PKCS#11 module {ref.module} does not exist")
    try:
        lib = pkcs11.lib(str(ref.module))
    except (RuntimeError, OSError, pkcs11.PKCS11Error) as exc:
        raise _pkcs11_error(f"loading PKCS#11 module {ref.module}", exc) from None
    try:
        token = lib.get_token(token_label=ref.token)
    except pkcs11.NoSuchToken:
        raise TlsError(f"no token labelled {ref.token!r} in {ref.module.name}") from None
    except pkcs11.PKCS11Error as exc:
        raise _pkcs11_error(f"finding token {ref.token!r}", exc) from None
    try:
        session = token.open(user_pin=ref.pin, rw=True)
    except pkcs11.PKCS11Error as exc:
        raise _pkcs11_error(f"logging in to token {ref.token!r}", exc) from None
    try:
        yield TokenSession(session)
    finally:
        try:
            session.close()
        except pkcs11.PKCS11Error:
            pass
