"""The node's fast path: AES-GCM and RSA on key contexts cached in the C core (hsmsim.core),
one context per handle, loaded by unmasking and dropped when the object changes or dies.

Mechanism semantics (which hash, which padding, IV generation) live here; key material
arrives only through the `loader` callbacks the keystore gives (masked blob -> bytes)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Awaitable, Callable
from typing import Any, Union

from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from hsmsim.core import (AesGcmKey, DecryptionFailed, InvalidSignature, InvalidTag,
                         RsaPrivateKey, RsaPublicKey)
from hsmsim.pkcs11.constants import RV, Mechanism as M
from hsmsim.pkcs11.errors import Pkcs11Error
from hsmsim.pkcs11.mechanisms import (HASH_OF_MECHANISM, HASH_OF_MGF, HASH_OF_RSA_PKCS,
                                      HASH_OF_RSA_PSS)
from hsmsim.pkcs11.params import GcmParams, OaepParams, PssParams

GCM_MECHS = frozenset({M.AES_GCM, M.CLOUDHSM_AES_GCM})
RSA_SIGN_MECHS = frozenset({M.RSA_PKCS, M.RSA_X_509, M.RSA_PKCS_PSS, *HASH_OF_RSA_PKCS,
                            *HASH_OF_RSA_PSS})
RSA_CRYPT_MECHS = frozenset({M.RSA_PKCS, M.RSA_PKCS_OAEP, M.RSA_X_509})
GCM_IV_LEN = 12
RSA_BATCH_THREADS = 2  # a batch of two or more RSA signatures splits over this many C threads
INLINE_LIMIT = 64 * 1024  # AES-GCM below this runs on the event loop (faster than a thread hop)



class EcSigner:
    """An EC private key cached for ECDSA on a digest (pyca/cryptography), as the C core does
    for RSA: loaded only by unmasking (PKCS#8 from the masked blob), never from an attribute.
    SoftHSM2 would re-read the token object and rebuild the key on every signature.
    pyca keeps the key in OpenSSL memory, freed (not explicitly zeroised) when dropped."""

    INLINE_BITS = 256  # P-256 signs in ~50 us: cheaper inline than a thread hop

    def __init__(self, der: bytes) -> None:
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.serialization import load_der_private_key
        key = load_der_private_key(der, None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TypeError("not an EC private key")
        self._key: Any = key
        self.size = (key.curve.key_size + 7) // 8
        self.inline = key.curve.key_size <= self.INLINE_BITS

    def sign(self, digest: bytes) -> bytes | None:
        """Raw r||s over `digest` as CKM_ECDSA computes it (OpenSSL truncates a longer input to
        the order), or None for an input length that is no hash (left to SoftHSM2)."""
        algorithm = _PREHASHED.get(len(digest))
        if algorithm is None or self._key is None:
            return None
        r, s = decode_dss_signature(self._key.sign(digest, algorithm))
        return r.to_bytes(self.size, "big") + s.to_bytes(self.size, "big")

    def close(self) -> None:
        self._key = None


def _prehashed() -> dict[int, Any]:
    """ECDSA over a ready digest, by digest length (built once: ECDSA runs on the hot path)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
    algorithms: tuple[hashes.HashAlgorithm, ...] = (
        hashes.SHA1(), hashes.SHA224(), hashes.SHA256(), hashes.SHA384(), hashes.SHA512())
    return {h.digest_size: ec.ECDSA(Prehashed(h)) for h in algorithms}


_PREHASHED = _prehashed()

Ctx = Union[AesGcmKey, RsaPrivateKey, RsaPublicKey, EcSigner]
Loader = Callable[[], Awaitable[Ctx]]


def hash_name(mech: int) -> str:
    name = HASH_OF_MECHANISM.get(mech)
    if name is None:
        raise Pkcs11Error(RV.MECHANISM_PARAM_INVALID, "unsupported hash in mechanism parameter")
    return name


def mgf_name(mgf: int) -> str:
    name = HASH_OF_MGF.get(mgf)
    if name is None:
        raise Pkcs11Error(RV.MECHANISM_PARAM_INVALID, "unsupported MGF in mechanism parameter")
    return name


def _gcm_param(param: object, encrypting: bool) -> tuple[bytes, bytes, int]:
    if not isinstance(param, GcmParams):
        raise Pkcs11Error(RV.MECHANISM_PARAM_INVALID, "AES-GCM needs GCM parameters")
    if param.tag_bits % 8 or not 32 <= param.tag_bits <= 128:
        raise Pkcs11Error(RV.MECHANISM_PARAM_INVALID, "GCM tag must be 32..128 bits, whole bytes")
    if encrypting and param.iv_chosen:
        # The IV the daemon generated at C_EncryptInit (and already handed to the application
        # in pIv): the cluster's side of the HSM chose it, so the node encrypts with it.
        iv = param.iv
        if len(iv) != GCM_IV_LEN:
            raise Pkcs11Error(RV.MECHANISM_PARAM_INVALID, "a chosen GCM IV is 12 bytes")
    elif encrypting:
        # FIDELITY: as CloudHSM, the HSM generates the 12-byte IV for encryption and returns
        # it; a caller-supplied IV is ignored.
        iv = os.urandom(GCM_IV_LEN)
    else:
        iv = param.iv
        if not 1 <= len(iv) <= 128:
            raise Pkcs11Error(RV.MECHANISM_PARAM_INVALID, "GCM IV must be 1..128 bytes")
    return iv, param.aad, param.tag_bits // 8


def gcm_encrypt(key: AesGcmKey, param: object, data: bytes) -> tuple[bytes, bytes]:
    iv, aad, tag_len = _gcm_param(param, True)
    return key.encrypt(iv, data, aad, tag_len), iv


def gcm_decrypt(key: AesGcmKey, param: object, data: bytes) -> bytes:
    iv, aad, tag_len = _gcm_param(param, False)
    if len(data) < tag_len:
        raise Pkcs11Error(RV.ENCRYPTED_DATA_LEN_RANGE, "ciphertext shorter than the GCM tag")
    try:
        return key.decrypt(iv, data, aad, tag_len)
    except InvalidTag:
        raise Pkcs11Error(RV.ENCRYPTED_DATA_INVALID, "AES-GCM authentication failed") from None


def _pss(param: object, expected_hash: str | None) -> tuple[str, str, int]:
    if not isinstance(param, PssParams):
        raise Pkcs11Error(RV.MECHANISM_PARAM_INVALID, "PSS needs CK_RSA_PKCS_PSS_PARAMS")
    h = hash_name(param.hash_alg)
    if expected_hash is not None and h != expected_hash:
        raise Pkcs11Error(RV.MECHANISM_PARAM_INVALID, "PSS hash does not match the mechanism")
    return h, mgf_name(param.mgf), param.salt_len


def _pad_raw(key: RsaPrivateKey | RsaPublicKey, data: bytes) -> bytes:
    size = key.key_size // 8
    if len(data) > size:
        raise Pkcs11Error(RV.DATA_LEN_RANGE, "input longer than the modulus")
    return data.rjust(size, b"\x00")


def rsa_sign(key: RsaPrivateKey, mech: int, param: object, data: bytes) -> bytes:
    try:
        if mech == M.RSA_PKCS:
            return key.sign_pkcs1v15(data, None)
        if mech in HASH_OF_RSA_PKCS:
            h = HASH_OF_RSA_PKCS[mech]
            return key.sign_pkcs1v15(hashlib.new(h, data).digest(), h)
        if mech == M.RSA_PKCS_PSS:
            h, mgf, salt = _pss(param, None)
            return key.sign_pss(data, h, mgf, salt)
        if mech in HASH_OF_RSA_PSS:
            h, mgf, salt = _pss(param, HASH_OF_RSA_PSS[mech])
            return key.sign_pss(hashlib.new(h, data).digest(), h, mgf, salt)
        if mech == M.RSA_X_509:
            return key.sign_raw(_pad_raw(key, data))
    except ValueError:
        raise Pkcs11Error(RV.DATA_LEN_RANGE, "input length is wrong for this mechanism") from None
    raise Pkcs11Error(RV.MECHANISM_INVALID, f"mechanism 0x{mech:x} cannot sign with RSA")


def rsa_verify(key: RsaPublicKey, mech: int, param: object, data: bytes, sig: bytes) -> None:
    if len(sig) != key.key_size // 8:
        raise Pkcs11Error(RV.SIGNATURE_LEN_RANGE, "signature length differs from the modulus")
    try:
        if mech == M.RSA_PKCS:
            key.verify_pkcs1v15(sig, data, None)
        elif mech in HASH_OF_RSA_PKCS:
            h = HASH_OF_RSA_PKCS[mech]
            key.verify_pkcs1v15(sig, hashlib.new(h, data).digest(), h)
        elif mech == M.RSA_PKCS_PSS:
            h, mgf, salt = _pss(param, None)
            key.verify_pss(sig, data, h, mgf, salt)
        elif mech in HASH_OF_RSA_PSS:
            h, mgf, salt = _pss(param, HASH_OF_RSA_PSS[mech])
            key.verify_pss(sig, hashlib.new(h, data).digest(), h, mgf, salt)
        elif mech == M.RSA_X_509:
            if key.encrypt_raw(sig) != _pad_raw(key, data):
                raise InvalidSignature()
        else:
            raise Pkcs11Error(RV.MECHANISM_INVALID, f"mechanism 0x{mech:x} cannot verify with RSA")
    except InvalidSignature:
        raise Pkcs11Error(RV.SIGNATURE_INVALID, "signature is invalid") from None
    except ValueError:
        raise Pkcs11Error(RV.SIGNATURE_INVALID, "signature is invalid") from None


def _oaep(param: object) -> tuple[str, str, bytes]:
    if not isinstance(param, OaepParams):
        raise Pkcs11Error(RV.MECHANISM_PARAM_INVALID, "OAEP needs CK_RSA_PKCS_OAEP_PARAMS")
    return hash_name(param.hash_alg), mgf_name(param.mgf), param.label


def rsa_encrypt(key: RsaPublicKey, mech: int, param: object, data: bytes) -> bytes:
    try:
        if mech == M.RSA_PKCS_OAEP:
            h, mgf, label = _oaep(param)
            return key.encrypt_oaep(data, h, mgf, label)
        if mech == M.RSA_PKCS:
            return key.encrypt_pkcs1v15(data)
        if mech == M.RSA_X_509:
            return key.encrypt_raw(_pad_raw(key, data))
    except ValueError:
        raise Pkcs11Error(RV.DATA_LEN_RANGE, "input too long for this key and padding") from None
    raise Pkcs11Error(RV.MECHANISM_INVALID, f"mechanism 0x{mech:x} cannot encrypt with RSA")


def rsa_decrypt(key: RsaPrivateKey, mech: int, param: object, data: bytes) -> bytes:
    if len(data) != key.key_size // 8:
        raise Pkcs11Error(RV.ENCRYPTED_DATA_LEN_RANGE, "ciphertext length differs from the modulus")
    try:
        if mech == M.RSA_PKCS_OAEP:
            h, mgf, label = _oaep(param)
            return key.decrypt_oaep(data, h, mgf, label)
        if mech == M.RSA_PKCS:
            return key.decrypt_pkcs1v15(data)
        if mech == M.RSA_X_509:
            return key.decrypt_raw(data)
    except (DecryptionFailed, ValueError):
        raise Pkcs11Error(RV.ENCRYPTED_DATA_INVALID, "decryption failed") from None
    raise Pkcs11Error(RV.MECHANISM_INVALID, f"mechanism 0x{mech:x} cannot decrypt with RSA")


class ContextCache:
    """C-core contexts per handle. `get` loads once even under concurrent requests."""

    def __init__(self) -> None:
        self._ctx: dict[int, Ctx] = {}
        self._loading: dict[int, Any] = {}
        self._generation: dict[int, int] = {}

    async def get(self, handle: int, loader: Loader) -> Ctx:
        ctx = self._ctx.get(handle)
        if ctx is not None:
            return ctx
        fut = self._loading.get(handle)
        if fut is not None:
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._loading[handle] = fut
        generation = self._generation.get(handle, 0)
        try:
            ctx = await loader()
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved
            raise
        finally:
            self._loading.pop(handle, None)
        if not fut.done():
            fut.set_result(ctx)
        if self._generation.get(handle, 0) == generation:  # not dropped while loading
            self._ctx[handle] = ctx
        return ctx

    def drop(self, handle: int) -> None:
        self._generation[handle] = self._generation.get(handle, 0) + 1
        ctx = self._ctx.pop(handle, None)
        if ctx is not None:
            ctx.close()

    def clear(self) -> None:
        for h in list(self._ctx):
            self.drop(h)
        self._generation.clear()


class SignBatcher:
    """Coalesces RSA PKCS#1 v1.5 signatures on one key that arrive in the same event-loop pass
    into one C-core batch, run on the loop thread: C releases the GIL and splits a batch of
    two or more over the key's batch threads. A thread-pool hop per signature cost more CPU
    (about 115 us) than the loop ever waits: the node's other requests queue in the socket
    for at most one batch, and the cluster's other HSMs, separate processes, keep the other
    cores busy."""

    MAX_BATCH = 16  # 16 RSA-2048 signatures keep the loop for about 6 ms (2 threads)

    def __init__(self, key: RsaPrivateKey) -> None:
        self.key = key
        self._queue: dict[str | None, list[tuple[bytes, asyncio.Future[bytes]]]] = {}
        self._scheduled = False

    def sign(self, data: bytes, hash: str | None) -> "asyncio.Future[bytes]":
        """A future for the signature, resolved at the end of this loop pass."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes] = loop.create_future()
        self._queue.setdefault(hash, []).append((data, fut))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self._scheduled = False
        queue, self._queue = self._queue, {}
        for hash, items in queue.items():
            for i in range(0, len(items), self.MAX_BATCH):
                self._run(hash, items[i:i + self.MAX_BATCH])

    def _run(self, hash: str | None, batch: list[tuple[bytes, asyncio.Future[bytes]]]) -> None:
        try:
            if len(batch) == 1:
                sigs = [self.key.sign_pkcs1v15(batch[0][0], hash)]
            else:
                sigs = self.key.sign_batch_pkcs1v15([d for d, _ in batch], hash)
        except Exception:
            # One bad input fails the whole batch: redo one by one for precise errors.
            for d, fut in batch:
                if fut.done():
                    continue
                try:
                    fut.set_result(self.key.sign_pkcs1v15(d, hash))
                except ValueError:
                    fut.set_exception(Pkcs11Error(RV.DATA_LEN_RANGE,
                                                  "input length is wrong for this mechanism"))
                except Exception as exc:
                    fut.set_exception(exc)
            return
        for (_, fut), sig in zip(batch, sigs):
            if not fut.done():
                fut.set_result(sig)


def pkcs1_batchable(mech: int, data: bytes) -> tuple[bytes, str | None] | None:
    """(input, hash) for a signature the batcher can take, else None."""
    if mech in HASH_OF_RSA_PKCS:
        h = HASH_OF_RSA_PKCS[mech]
        return hashlib.new(h, data).digest(), h
    if mech == M.RSA_PKCS:
        return data, None
    return None
