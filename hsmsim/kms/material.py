"""Key-material backends behind one small interface.

* `Fleet` stands for KMS's own multi-tenant HSM fleet (keys with Origin AWS_KMS): material comes
  from a CSPRNG, is stored only sealed (AES-GCM in the cluster under a domain key: an AES-256
  non-extractable token key owned by the KMS's fleet crypto user) and is unsealed into memory
  on first use. Crypto then runs in the daemon: AES-GCM and RSA in the C core
  (`hsmsim.core`), EC and HMAC in pyca/cryptography.
* `ClusterKeys` runs the crypto of custom-key-store keys (Origin AWS_CLOUDHSM) inside the
  cluster through `ClusterClient`, logged in as the store's kmsuser.

Cluster failures come out as `ClusterFailure` carrying the PKCS#11 return value; the
operations layer turns them into KMS errors."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from hsmsim import files
from hsmsim.cluster.api import ClusterClient, Login
from hsmsim.core import AesGcmKey, InvalidSignature as CoreInvalidSignature, RsaPrivateKey, RsaPublicKey
from hsmsim.core import CoreError
from hsmsim.kms import model
from hsmsim.pkcs11.constants import RV, Attribute, KeyType, Mechanism, ObjectClass, UserType
from hsmsim.pkcs11.errors import Pkcs11Error
from hsmsim.pkcs11.params import GcmParams, MechanismSpec

log = logging.getLogger("hsmsim.kms")

FLEET_USER = "kmsfleet"
DOMAIN_KEY_LABEL = "hsmsim-kms-domain-key"
GCM_IV = 12
_AUTH_FAILED = (RV.ENCRYPTED_DATA_INVALID, RV.ENCRYPTED_DATA_LEN_RANGE, RV.DATA_INVALID,
                RV.DATA_LEN_RANGE, RV.SIGNATURE_INVALID)

_EC_CURVES: dict[str, ec.EllipticCurve] = {
    "ECC_NIST_P256": ec.SECP256R1(), "ECC_NIST_P384": ec.SECP384R1(),
    "ECC_NIST_P521": ec.SECP521R1(), "ECC_SECG_P256K1": ec.SECP256K1(),
}
_RSA_BITS = {"RSA_2048": 2048, "RSA_3072": 3072, "RSA_4096": 4096}
_HMAC_LEN = {"HMAC_224": 28, "HMAC_256": 32, "HMAC_384": 48, "HMAC_512": 64}
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1, "sha224": hashes.SHA224, "sha256": hashes.SHA256,
    "sha384": hashes.SHA384, "sha512": hashes.SHA512}


class MaterialError(Exception):
    """Base of backend failures (never carries key material)."""


class ClusterFailure(MaterialError):
    """A cluster call failed with PKCS#11 return value `rv` (logged by name, never with data)."""

    def __init__(self, rv: int, what: str) -> None:
        super().__init__(what)
        self.rv = rv
        try:
            name = RV(rv).name
        except ValueError:
            name = hex(rv)
        log.warning("KMS cluster call failed: %s (CKR_%s)", what, name)


class BadCiphertext(MaterialError):
    """Authentication failed on decrypt."""


class BadSignature(MaterialError):
    """A signature did not verify."""


def secret_key_template(label: str) -> dict[int, Any]:
    """A persistent, non-extractable AES-256 key (what KMS makes in a custom key store)."""
    return {
        Attribute.CLASS: int(ObjectClass.SECRET_KEY), Attribute.KEY_TYPE: int(KeyType.AES),
        Attribute.VALUE_LEN: 32, Attribute.TOKEN: True, Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
        Attribute.ENCRYPT: True, Attribute.DECRYPT: True, Attribute.LABEL: label,
    }


def _gcm(aad: bytes, iv: bytes = bytes(GCM_IV)) -> MechanismSpec:
    return MechanismSpec(int(Mechanism.AES_GCM), GcmParams(iv=iv, aad=aad, tag_bits=128))


def new_material_id() -> bytes:
    return secrets.token_bytes(32)


@dataclass(frozen=True)
class NewMaterial:
    secret: bytes  # raw AES/HMAC key or PKCS#8 DER; sealed right away by the caller
    public: bytes  # SPKI DER for asymmetric keys


def generate(key_spec: str) -> NewMaterial:
    """Fresh key material for an AWS_KMS-origin key of `key_spec`, from the OS CSPRNG."""
    if key_spec == model.SYMMETRIC:
        return NewMaterial(secrets.token_bytes(32), b"")
    if key_spec in _HMAC_LEN:
        return NewMaterial(secrets.token_bytes(_HMAC_LEN[key_spec]), b"")
    priv: Any
    if key_spec in _RSA_BITS:
        priv = rsa.generate_private_key(65537, _RSA_BITS[key_spec])
    elif key_spec in _EC_CURVES:
        priv = ec.generate_private_key(_EC_CURVES[key_spec])
    else:
        raise ValueError(key_spec)
    return NewMaterial(
        priv.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                           serialization.NoEncryption()),
        priv.public_key().public_bytes(serialization.Encoding.DER,
                                       serialization.PublicFormat.SubjectPublicKeyInfo))


class LiveKey:
    """Unsealed material of one backing key, ready for crypto. Only the fleet creates these."""

    def __init__(self, key_spec: str, secret: bytes) -> None:
        self.key_spec = key_spec
        self._gcm: AesGcmKey | None = None
        self._rsa: RsaPrivateKey | None = None
        self._ec: ec.EllipticCurvePrivateKey | None = None
        self._mac = bytearray()
        if key_spec == model.SYMMETRIC:
            self._gcm = AesGcmKey(secret)
        elif key_spec in _HMAC_LEN:
            self._mac = bytearray(secret)
        elif key_spec in _RSA_BITS:
            self._rsa = RsaPrivateKey.from_der(secret)
        else:
            loaded = serialization.load_der_private_key(secret, None)
            assert isinstance(loaded, ec.EllipticCurvePrivateKey)
            self._ec = loaded

    # symmetric
    def encrypt(self, iv: bytes, data: bytes, aad: bytes) -> bytes:
        assert self._gcm is not None
        return self._gcm.encrypt(iv, data, aad)

    def decrypt(self, iv: bytes, data: bytes, aad: bytes) -> bytes:
        assert self._gcm is not None
        try:
            return self._gcm.decrypt(iv, data, aad)
        except CoreError:
            raise BadCiphertext() from None

    # HMAC
    def mac(self, hash_name: str, message: bytes) -> bytes:
        return hmac.new(bytes(self._mac), message, hash_name).digest()

    # asymmetric
    def sign(self, algorithm: str, digest: bytes, hash_name: str) -> bytes:
        if self._rsa is not None:
            if "_PSS_" in algorithm:
                return self._rsa.sign_pss(digest, hash_name, hash_name, len(digest))
            return self._rsa.sign_pkcs1v15(digest, hash_name)
        assert self._ec is not None
        return self._ec.sign(digest, ec.ECDSA(Prehashed(_HASHES[hash_name]())))

    def rsa_decrypt(self, hash_name: str, data: bytes) -> bytes:
        assert self._rsa is not None
        try:
            return self._rsa.decrypt_oaep(data, hash_name, hash_name, b"")
        except CoreError:
            raise BadCiphertext() from None

    def close(self) -> None:
        if self._gcm is not None:
            self._gcm.close()
        if self._rsa is not None:
            self._rsa.close()
        for i in range(len(self._mac)):  # best effort: Python may hold other copies
            self._mac[i] = 0


def verify_signature(key_spec: str, public_der: bytes, algorithm: str, digest: bytes,
                     hash_name: str, signature: bytes) -> None:
    """Checks a signature with the public key; BadSignature on mismatch."""
    try:
        if key_spec in _RSA_BITS:
            pub = RsaPublicKey.from_der(public_der)
            try:
                if "_PSS_" in algorithm:
                    pub.verify_pss(signature, digest, hash_name, hash_name, len(digest))
                else:
                    pub.verify_pkcs1v15(signature, digest, hash_name)
            finally:
                pub.close()
            return
        pk = serialization.load_der_public_key(public_der)
        assert isinstance(pk, ec.EllipticCurvePublicKey)
        pk.verify(signature, digest, ec.ECDSA(Prehashed(_HASHES[hash_name]())))
    except (CoreError, CoreInvalidSignature, ValueError):
        raise BadSignature() from None
    except Exception as exc:  # pyca's InvalidSignature
        if type(exc).__name__ == "InvalidSignature":
            raise BadSignature() from None
        raise


def rsa_encrypt(public_der: bytes, hash_name: str, data: bytes) -> bytes:
    pub = RsaPublicKey.from_der(public_der)
    try:
        return pub.encrypt_oaep(data, hash_name, hash_name, b"")
    finally:
        pub.close()


def _seal_aad(key_id: str, material_id: str) -> bytes:
    return f"hsmsim-kms-material-v1:{key_id}:{material_id}".encode()


class Fleet:
    """The AWS_KMS-origin backend. It logs in lazily on first use: at first start it creates the
    fleet crypto user (through the CO `admin`, whose password the cluster keeps in
    `secrets/admin.password`; its own password goes to `kms/fleet.secret`, 0600) and the domain
    key.

    FIDELITY: AWS KMS's own fleet is separate HSMs; here it is a crypto user `kmsfleet` in the
    simulated cluster (not `kmsuser`, which belongs to the customer's custom key store and
    whose deletion, lockout or password must not break AWS_KMS keys). Unsealed material is
    cached in the daemon's memory, so AWS_KMS keys already used keep working while the cluster
    is down."""

    def __init__(self, cluster: ClusterClient, state_dir: Path) -> None:
        self._cluster = cluster
        self._state_dir = state_dir
        self._login: Login | None = None
        self._domain_key: int | None = None
        self._live: dict[str, LiveKey] = {}
        self._lock = asyncio.Lock()  # one first login / domain key creation at a time

    async def _ensure(self) -> tuple[Login, int]:
        if self._login is not None and self._domain_key is not None:
            return self._login, self._domain_key
        async with self._lock:
            if self._login is not None and self._domain_key is not None:
                return self._login, self._domain_key
            return await self._open()

    async def _open(self) -> tuple[Login, int]:
        secret_file = self._state_dir / "kms" / "fleet.secret"
        try:
            if not secret_file.exists():
                password = secrets.token_urlsafe(18)[:24]
                files.atomic_write(secret_file, password.encode())
            password = secret_file.read_text().strip()
            try:
                login = await self._cluster.login(UserType.USER, FLEET_USER, password)
            except Pkcs11Error:
                admin_pw = (self._state_dir / "secrets" / "admin.password").read_text().strip()
                try:
                    admin = await self._cluster.login(UserType.SO, "admin", admin_pw)
                except Pkcs11Error as exc:
                    log.error("KMS fleet: the crypto user %s is missing and the admin login that would "
                              "create it failed (CKR_%s); is secrets/admin.password current?",
                              FLEET_USER, exc.rv.name)
                    raise
                try:
                    await self._cluster.create_user(admin, FLEET_USER, "crypto-user", password)
                finally:
                    await self._cluster.logout(admin)
                login = await self._cluster.login(UserType.USER, FLEET_USER, password)
            found = await self._cluster.find_objects(
                login, {Attribute.LABEL: DOMAIN_KEY_LABEL, Attribute.CLASS: int(ObjectClass.SECRET_KEY)}, 0)
            if found:
                handle = min(found)  # the first one made, should there ever be more
            else:
                handle = await self._cluster.generate_key(
                    login, MechanismSpec(int(Mechanism.AES_KEY_GEN)), secret_key_template(DOMAIN_KEY_LABEL), 0)
        except Pkcs11Error as exc:
            raise ClusterFailure(int(exc.rv), "KMS fleet login / domain key") from None
        except OSError as exc:
            raise ClusterFailure(int(RV.GENERAL_ERROR), f"KMS fleet credentials unreadable ({exc.strerror})") from None
        self._login, self._domain_key = login, handle
        return login, handle

    async def any_login(self) -> Login:
        """The fleet's own login (used to read the cluster's user list)."""
        login, _ = await self._ensure()
        return login

    async def seal_secret(self, context: str, secret: bytes) -> bytes:
        """A small secret (a kmsuser password) sealed under the domain key for `context`."""
        return await self.seal("secret", context, secret)

    async def unseal_secret(self, context: str, sealed: bytes) -> bytes:
        login, dk = await self._ensure()
        n = sealed[0]
        try:
            return await self._cluster.decrypt(login, dk, _gcm(_seal_aad("secret", context), sealed[1:1 + n]),
                                               sealed[1 + n:])
        except Pkcs11Error as exc:
            self._login = None
            raise ClusterFailure(int(exc.rv), "unseal secret") from None

    def cached(self, material_id: str) -> LiveKey | None:
        return self._live.get(material_id)

    async def seal(self, key_id: str, material_id: str, secret: bytes) -> bytes:
        login, dk = await self._ensure()
        try:
            res = await self._cluster.encrypt(login, dk, _gcm(_seal_aad(key_id, material_id)), secret)
        except Pkcs11Error as exc:
            self._login = None
            raise ClusterFailure(int(exc.rv), "seal") from None
        iv = res.iv or b""
        return bytes((len(iv),)) + iv + res.data

    async def live(self, key_spec: str, m: model.MaterialRecord) -> LiveKey:
        """The unsealed key of one material record (cached)."""
        cached = self._live.get(m.material_id)
        if cached is not None:
            return cached
        login, dk = await self._ensure()
        n = m.sealed[0]
        iv, body = m.sealed[1:1 + n], m.sealed[1 + n:]
        try:
            secret = await self._cluster.decrypt(login, dk, _gcm(_seal_aad(m.key_id, m.material_id), iv), body)
        except Pkcs11Error as exc:
            self._login = None  # log in again next time (the cluster may have restarted)
            raise ClusterFailure(int(exc.rv), "unseal") from None
        key = LiveKey(key_spec, secret)
        self._live[m.material_id] = key
        return key

    def forget(self, material_ids: list[str]) -> None:
        for mid in material_ids:
            key = self._live.pop(mid, None)
            if key is not None:
                key.close()

    async def close(self) -> None:
        for key in self._live.values():
            key.close()
        self._live.clear()
        if self._login is not None:
            try:
                await self._cluster.logout(self._login)
            except Exception:
                pass
            self._login = None


@functools.lru_cache(maxsize=4096)
def cluster_material(arn: str, handle: int) -> bytes:
    """The 32-byte material id of a custom-key-store key's backing key."""
    return hashlib.sha256(f"{arn}#{handle}".encode()).digest()


class ClusterKeys:
    """Crypto of AWS_CLOUDHSM keys, inside the cluster, as the store's logged-in kmsuser. A
    login KMS holds in another cluster than the first (a store on a cluster CreateCluster made)
    is bound to that cluster (`bind`): calls with it go there."""

    def __init__(self, cluster: ClusterClient) -> None:
        self._cluster = cluster
        # id(login) -> (login, its cluster); the login is kept so its id stays its own
        self._bound: dict[int, tuple[Login, ClusterClient]] = {}

    def bind(self, login: Login, cluster: ClusterClient) -> None:
        self._bound[id(login)] = (login, cluster)

    def unbind(self, login: Login) -> None:
        found = self._bound.get(id(login))
        if found is not None and found[0] is login:
            del self._bound[id(login)]

    def cluster_of(self, login: Login | None) -> ClusterClient:
        found = self._bound.get(id(login)) if login is not None else None
        return found[1] if found is not None and found[0] is login else self._cluster

    async def create(self, login: Login, arn: str) -> int:
        try:
            return await self.cluster_of(login).generate_key(
                login, MechanismSpec(int(Mechanism.AES_KEY_GEN)), secret_key_template(arn), 0)
        except Pkcs11Error as exc:
            raise ClusterFailure(int(exc.rv), "create") from None

    async def encrypt(self, login: Login, handle: int, data: bytes, aad: bytes) -> tuple[bytes, bytes]:
        try:
            res = await self.cluster_of(login).encrypt(login, handle, _gcm(aad), data)
        except Pkcs11Error as exc:
            raise ClusterFailure(int(exc.rv), "encrypt") from None
        if res.iv is None or len(res.iv) != GCM_IV:
            raise ClusterFailure(0x5, "cluster returned no GCM IV")
        return res.iv, res.data

    async def decrypt(self, login: Login, handle: int, iv: bytes, data: bytes, aad: bytes) -> bytes:
        try:
            return await self.cluster_of(login).decrypt(login, handle, _gcm(aad, iv), data)
        except Pkcs11Error as exc:
            if exc.rv in _AUTH_FAILED:
                raise BadCiphertext() from None
            raise ClusterFailure(int(exc.rv), "decrypt") from None

    async def destroy(self, login: Login, handle: int) -> None:
        try:
            await self.cluster_of(login).destroy_object(login, handle)
        except Pkcs11Error as exc:
            raise ClusterFailure(int(exc.rv), "destroy") from None

    async def random(self, login: Login | None, n: int) -> bytes:
        try:
            return await self.cluster_of(login).generate_random(login, n)
        except Pkcs11Error as exc:
            raise ClusterFailure(int(exc.rv), "random") from None


def digest(hash_name: str, message: bytes) -> bytes:
    return hashlib.new(hash_name, message).digest()

