"""RSA keys loaded once into the C core: PKCS#1 v1.5 and PSS signatures (over a digest the
caller computed), OAEP and PKCS#1 v1.5 encryption, and raw X.509 RSA.

Policy lives here, not in C: key sizes (2048 to 4096 bits), which hashes, digest and
message lengths, salt lengths. Every verify failure is InvalidSignature and every decrypt
failure DecryptionFailed, with no detail. Keys may be shared between threads; the GIL is
released during every C call.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from math import gcd
from types import TracebackType
from typing import Any

from hsmsim.core._args import (
    HASH_NONE,
    as_bytes,
    as_int,
    bytes_seq,
    check_len,
    hash_code,
)
from hsmsim.core._errors import (
    ERR_KEY,
    DecryptionFailed,
    InvalidSignature,
    KeyFormatError,
    raise_for,
)
from hsmsim.core._ffi import INT32_CODE, SIZE_T_CODE, ffi, lib

MIN_BITS, MAX_BITS = 2048, 4096
MAX_BATCH_THREADS = 8
DEFAULT_BATCH_THREADS = 1  # as for AES-GCM: opt in per key
MAX_DER = 64 * 1024

# hsmsim_rsa_padding in hsmsim_core.h
_PKCS1V15, _PSS, _OAEP, _RAW = 1, 2, 3, 4


def _der(der: object) -> bytes:
    der = as_bytes(der, "der")
    if not der:
        raise ValueError("der must not be empty")
    check_len(der, "der", MAX_DER)
    return der


def _int_bytes(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8 or 1, "big")


def _hash_or_none(value: object, name: str) -> tuple[int, int]:
    if value is None:
        return HASH_NONE, 0
    return hash_code(value, name)


class _RsaKey:
    """What both key kinds share: the C context, sizes, lifetime."""

    __slots__ = ("_ctx", "_bits", "_size", "_n", "_e", "_threads")

    _kind = "RSA"

    def __init__(self, ctx: Any, batch_threads: int | None = None) -> None:
        """Takes ownership of a C context (use from_der / from_components)."""
        self._ctx: Any = ffi.gc(ctx, lib.hsmsim_rsa_free)
        if batch_threads is None:
            batch_threads = DEFAULT_BATCH_THREADS
        elif not 1 <= as_int(batch_threads, "batch_threads") <= MAX_BATCH_THREADS:
            self._ctx = None
            raise ValueError(f"batch_threads must be 1 to {MAX_BATCH_THREADS}, got {batch_threads}")
        self._threads = batch_threads
        bits = int(lib.hsmsim_rsa_bits(ctx))
        if not MIN_BITS <= bits <= MAX_BITS:
            self._ctx = None
            raise ValueError(f"key size must be {MIN_BITS} to {MAX_BITS} bits, got {bits}")
        self._bits = bits
        self._size = int(lib.hsmsim_rsa_size(ctx))
        n_buf = ffi.new("uint8_t[]", self._size)
        e_buf = ffi.new("uint8_t[]", self._size)
        n_len = ffi.new("size_t *", self._size)
        e_len = ffi.new("size_t *", self._size)
        status = lib.hsmsim_rsa_public_numbers(ctx, n_buf, n_len, e_buf, e_len)
        if status:
            self._ctx = None
            raise_for(status)
        self._n = int.from_bytes(ffi.buffer(n_buf, n_len[0]), "big")
        self._e = int.from_bytes(ffi.buffer(e_buf, e_len[0]), "big")

    @property
    def batch_threads(self) -> int:
        """How many threads a sign batch may use inside C."""
        return self._threads

    @property
    def key_size(self) -> int:
        """Modulus size in bits."""
        return self._bits

    @property
    def n(self) -> int:
        """The public modulus."""
        return self._n

    @property
    def e(self) -> int:
        """The public exponent."""
        return self._e

    def _live(self) -> Any:
        ctx = self._ctx
        if ctx is None:
            raise ValueError("key is closed")
        return ctx

    def _pss_params(self, hash: object, mgf1_hash: object, salt_len: object) -> tuple[int, int, int, int]:
        code, hlen = hash_code(hash, "hash")
        mgf1, _ = hash_code(mgf1_hash, "mgf1_hash")
        salt = as_int(salt_len, "salt_len")
        em_len = (self._bits - 1 + 7) // 8
        max_salt = em_len - hlen - 2
        if not 0 <= salt <= max_salt:
            raise ValueError(
                f"salt_len must be 0 to {max_salt} for {hash} with a {self._bits}-bit key, got {salt}"
            )
        return code, hlen, mgf1, salt

    def _oaep_params(self, hash: object, mgf1_hash: object, label: object) -> tuple[int, int, int, bytes]:
        code, hlen = hash_code(hash, "hash")
        mgf1, _ = hash_code(mgf1_hash, "mgf1_hash")
        label_b = as_bytes(label, "label")
        check_len(label_b, "label")
        return code, hlen, mgf1, label_b

    def _raw_int(self, data: object) -> bytes:
        data = as_bytes(data, "data")
        if len(data) != self._size:
            raise ValueError(f"data must be {self._size} bytes, got {len(data)}")
        if int.from_bytes(data, "big") >= self._n:
            raise ValueError("data must be an integer below the modulus")
        return data

    def close(self) -> None:
        """Releases the C context (zeroised and freed once no call in flight holds it)."""
        self._ctx = None

    def __enter__(self) -> Any:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        self._ctx = None

    def __repr__(self) -> str:
        state = "closed" if getattr(self, "_ctx", None) is None else "open"
        return f"<{type(self).__name__} {getattr(self, '_bits', 0)} bits {state}>"


class RsaPublicKey(_RsaKey):
    """An RSA public key: verify and encrypt."""

    __slots__ = ()

    @classmethod
    def from_der(cls, der: bytes) -> RsaPublicKey:
        """From SubjectPublicKeyInfo or PKCS#1 RSAPublicKey DER."""
        der = _der(der)
        pp = ffi.new("hsmsim_rsa **")
        status = lib.hsmsim_rsa_public_from_der(der, len(der), pp)
        if status == ERR_KEY:
            raise KeyFormatError("der is not an RSA public key (SubjectPublicKeyInfo or PKCS#1)")
        if status:
            raise_for(status)
        return cls(pp[0])

    @classmethod
    def from_components(cls, n: int, e: int) -> RsaPublicKey:
        n, e = as_int(n, "n"), as_int(e, "e")
        if not MIN_BITS <= n.bit_length() <= MAX_BITS or n % 2 == 0:
            raise ValueError(f"n must be an odd {MIN_BITS} to {MAX_BITS}-bit modulus")
        if not 3 <= e < n or e % 2 == 0:
            raise ValueError("e must be odd, at least 3 and below n")
        nb, eb = _int_bytes(n), _int_bytes(e)
        pp = ffi.new("hsmsim_rsa **")
        status = lib.hsmsim_rsa_public_from_components(nb, len(nb), eb, len(eb), pp)
        if status == ERR_KEY:
            raise KeyFormatError("n and e are not an RSA public key")
        if status:
            raise_for(status)
        return cls(pp[0])

    def public_bytes_der(self) -> bytes:
        """SubjectPublicKeyInfo DER."""
        ctx = self._live()
        cap = 64 + 2 * self._size
        buf = ffi.new("uint8_t[]", cap)
        ln = ffi.new("size_t *", cap)
        status = lib.hsmsim_rsa_public_der(ctx, buf, ln)
        if status:
            raise_for(status)
        return bytes(ffi.buffer(buf, ln[0]))

    def _verify(
        self, padding: int, code: int, mgf1: int, salt: int, signature: object, data: bytes
    ) -> None:
        ctx = self._live()
        sig = as_bytes(signature, "signature")
        check_len(sig, "signature")
        status = lib.hsmsim_rsa_verify(ctx, padding, code, mgf1, salt, sig, len(sig), data, len(data))
        if status:
            raise_for(status)

    def verify_pkcs1v15(self, signature: bytes, data: bytes, hash: str | None) -> None:
        """hash named: data is the digest (DigestInfo expected); None: data is compared with
        the whole PKCS#1 v1.5 type-1 payload. Raises InvalidSignature."""
        code, hlen = _hash_or_none(hash, "hash")
        data = as_bytes(data, "data")
        if hlen and len(data) != hlen:
            raise ValueError(f"data must be the {hlen}-byte {hash} digest, got {len(data)} bytes")
        if not hlen and not 1 <= len(data) <= self._size - 11:
            raise ValueError(f"data must be 1 to {self._size - 11} bytes, got {len(data)}")
        self._verify(_PKCS1V15, code, 0, 0, signature, data)

    def verify_pss(
        self, signature: bytes, digest: bytes, hash: str, mgf1_hash: str, salt_len: int
    ) -> None:
        """PSS over a digest the caller computed. Raises InvalidSignature."""
        code, hlen, mgf1, salt = self._pss_params(hash, mgf1_hash, salt_len)
        digest = as_bytes(digest, "digest")
        if len(digest) != hlen:
            raise ValueError(f"digest must be {hlen} bytes for {hash}, got {len(digest)}")
        self._verify(_PSS, code, mgf1, salt, signature, digest)

    def _encrypt(self, padding: int, code: int, mgf1: int, label: bytes, data: bytes) -> bytes:
        ctx = self._live()
        out = ffi.new("uint8_t[]", self._size)
        ln = ffi.new("size_t *", self._size)
        status = lib.hsmsim_rsa_encrypt(
            ctx, padding, code, mgf1, label, len(label), data, len(data), out, ln
        )
        if status:
            raise_for(status)
        return bytes(ffi.buffer(out, ln[0]))

    def encrypt_oaep(self, data: bytes, hash: str, mgf1_hash: str, label: bytes = b"") -> bytes:
        code, hlen, mgf1, label_b = self._oaep_params(hash, mgf1_hash, label)
        data = as_bytes(data, "data")
        limit = self._size - 2 * hlen - 2
        if len(data) > limit:
            raise ValueError(f"data must be at most {limit} bytes for OAEP with {hash}, got {len(data)}")
        return self._encrypt(_OAEP, code, mgf1, label_b, data)

    def encrypt_pkcs1v15(self, data: bytes) -> bytes:
        data = as_bytes(data, "data")
        limit = self._size - 11
        if len(data) > limit:
            raise ValueError(f"data must be at most {limit} bytes, got {len(data)}")
        return self._encrypt(_PKCS1V15, 0, 0, b"", data)

    def encrypt_raw(self, data: bytes) -> bytes:
        """Raw RSA public operation (CKM_RSA_X_509): data is a modulus-sized integer below n."""
        return self._encrypt(_RAW, 0, 0, b"", self._raw_int(data))


class RsaPrivateKey(_RsaKey):
    """An RSA private key: sign and decrypt. `public_key()` gives the matching public key."""

    __slots__ = ()

    @classmethod
    def from_der(cls, der: bytes, *, batch_threads: int | None = None) -> RsaPrivateKey:
        """From PKCS#8 PrivateKeyInfo or PKCS#1 RSAPrivateKey DER (unencrypted).
        batch_threads: how many threads sign_batch_* may use inside C (default 1)."""
        der = _der(der)
        pp = ffi.new("hsmsim_rsa **")
        status = lib.hsmsim_rsa_private_from_der(der, len(der), pp)
        if status == ERR_KEY:
            raise KeyFormatError("der is not an RSA private key (PKCS#8 or PKCS#1)")
        if status:
            raise_for(status)
        return cls(pp[0], batch_threads)

    @classmethod
    def from_components(
        cls, n: int, e: int, d: int, p: int, q: int, dp: int, dq: int, qinv: int, *,
        batch_threads: int | None = None,
    ) -> RsaPrivateKey:
        """From the CRT components; they must be consistent (checked here, cheaply)."""
        values = {"n": n, "e": e, "d": d, "p": p, "q": q, "dp": dp, "dq": dq, "qinv": qinv}
        for name, v in values.items():
            if as_int(v, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if not MIN_BITS <= n.bit_length() <= MAX_BITS:
            raise ValueError(f"n must be a {MIN_BITS} to {MAX_BITS}-bit modulus, got {n.bit_length()} bits")
        if p * q != n or p < 3 or q < 3:
            raise ValueError("p and q must be the factors of n")
        if not 3 <= e < n or e % 2 == 0:
            raise ValueError("e must be odd, at least 3 and below n")
        lam = (p - 1) * (q - 1) // gcd(p - 1, q - 1)
        if d >= n or (e * d) % lam != 1:
            raise ValueError("d must be the private exponent for e")
        if dp != d % (p - 1) or dq != d % (q - 1):
            raise ValueError("dp and dq must be d mod (p-1) and d mod (q-1)")
        if (qinv * q) % p != 1 or qinv >= p:
            raise ValueError("qinv must be q^-1 mod p")
        parts = [_int_bytes(v) for v in (n, e, d, p, q, dp, dq, qinv)]
        args: list[Any] = []
        for b in parts:
            args += [b, len(b)]
        pp = ffi.new("hsmsim_rsa **")
        status = lib.hsmsim_rsa_private_from_components(*args, pp)
        if status == ERR_KEY:
            raise KeyFormatError("the components are not an RSA private key")
        if status:
            raise_for(status)
        return cls(pp[0], batch_threads)

    def public_key(self) -> RsaPublicKey:
        pp = ffi.new("hsmsim_rsa **")
        status = lib.hsmsim_rsa_public_of(self._live(), pp)
        if status:
            raise_for(status)
        return RsaPublicKey(pp[0])

    # ---- signatures ------------------------------------------------------------------------

    def _check_pkcs1_len(self, n: int, hlen: int, hash: object, name: str) -> None:
        if hlen:
            if n != hlen:
                raise ValueError(f"{name} must be the {hlen}-byte {hash} digest, got {n} bytes")
        elif not 1 <= n <= self._size - 11:
            # Empty data is refused: OpenSSL 3.0 cannot verify a signature over nothing.
            raise ValueError(f"{name} must be 1 to {self._size - 11} bytes, got {n}")

    def _sign(self, padding: int, code: int, mgf1: int, salt: int, data: bytes) -> bytes:
        ctx = self._live()
        sig = ffi.new("uint8_t[]", self._size)
        ln = ffi.new("size_t *", self._size)
        status = lib.hsmsim_rsa_sign(ctx, padding, code, mgf1, salt, data, len(data), sig, ln)
        if status:
            raise_for(status)
        return bytes(ffi.buffer(sig, ln[0]))

    def sign_pkcs1v15(self, data: bytes, hash: str | None) -> bytes:
        """hash named: data is the digest and a DigestInfo is added; None: data is signed as
        given with type-1 padding only (CKM_RSA_PKCS)."""
        code, hlen = _hash_or_none(hash, "hash")
        data = as_bytes(data, "data")
        self._check_pkcs1_len(len(data), hlen, hash, "data")
        return self._sign(_PKCS1V15, code, 0, 0, data)

    def sign_pss(self, digest: bytes, hash: str, mgf1_hash: str, salt_len: int) -> bytes:
        code, hlen, mgf1, salt = self._pss_params(hash, mgf1_hash, salt_len)
        digest = as_bytes(digest, "digest")
        if len(digest) != hlen:
            raise ValueError(f"digest must be {hlen} bytes for {hash}, got {len(digest)}")
        return self._sign(_PSS, code, mgf1, salt, digest)

    def sign_raw(self, data: bytes) -> bytes:
        """Raw RSA private operation (CKM_RSA_X_509): data is a modulus-sized integer below n."""
        return self._sign(_RAW, 0, 0, 0, self._raw_int(data))

    def _sign_batch(
        self, padding: int, code: int, mgf1: int, salt: int, items: list[bytes]
    ) -> list[bytes]:
        ctx = self._live()
        n = len(items)
        if not n:
            return []
        k = self._size
        sig = ffi.new("uint8_t[]", n * k)
        status = array(INT32_CODE, bytes(4 * n))
        lens = array(SIZE_T_CODE, map(len, items))
        rc = lib.hsmsim_rsa_sign_batch(
            ctx, padding, code, mgf1, salt, n, b"".join(items),
            ffi.from_buffer("size_t[]", lens), sig, n * k, ffi.from_buffer("int32_t[]", status),
            min(self._threads, n),
        )
        if rc:
            raise_for(rc)
        if any(status):
            raise_for(next(s for s in status if s))
        blob = bytes(ffi.buffer(sig, n * k))
        return [blob[i : i + k] for i in range(0, n * k, k)]

    def sign_batch_pkcs1v15(self, digests: Sequence[bytes], hash: str | None) -> list[bytes]:
        """sign_pkcs1v15 over each item, in one C call."""
        code, hlen = _hash_or_none(hash, "hash")
        items = bytes_seq(digests, "digests")
        for i, d in enumerate(items):
            self._check_pkcs1_len(len(d), hlen, hash, f"digests[{i}]")
        return self._sign_batch(_PKCS1V15, code, 0, 0, items)

    def sign_batch_pss(
        self, digests: Sequence[bytes], hash: str, mgf1_hash: str, salt_len: int
    ) -> list[bytes]:
        """sign_pss over each digest, in one C call."""
        code, hlen, mgf1, salt = self._pss_params(hash, mgf1_hash, salt_len)
        items = bytes_seq(digests, "digests")
        for i, d in enumerate(items):
            if len(d) != hlen:
                raise ValueError(f"digests[{i}] must be {hlen} bytes for {hash}, got {len(d)}")
        return self._sign_batch(_PSS, code, mgf1, salt, items)

    # ---- decryption ------------------------------------------------------------------------

    def _decrypt(self, padding: int, code: int, mgf1: int, label: bytes, data: object) -> bytes:
        ctx = self._live()
        data = as_bytes(data, "data")
        if len(data) != self._size:
            raise ValueError(f"data must be {self._size} bytes (the modulus size), got {len(data)}")
        out = ffi.new("uint8_t[]", self._size)
        ln = ffi.new("size_t *", self._size)
        status = lib.hsmsim_rsa_decrypt(
            ctx, padding, code, mgf1, label, len(label), data, len(data), out, ln
        )
        if status:
            raise_for(status)
        result = bytes(ffi.buffer(out, ln[0]))
        lib.hsmsim_wipe(out, self._size)
        return result

    def decrypt_oaep(self, data: bytes, hash: str, mgf1_hash: str, label: bytes = b"") -> bytes:
        """Raises DecryptionFailed, with no detail, on any padding or label mismatch."""
        code, _, mgf1, label_b = self._oaep_params(hash, mgf1_hash, label)
        return self._decrypt(_OAEP, code, mgf1, label_b, data)

    def decrypt_pkcs1v15(self, data: bytes) -> bytes:
        """Raises DecryptionFailed, with no detail, on any padding failure. (OpenSSL 3.0
        reports the failure; it does not use implicit rejection.)"""
        return self._decrypt(_PKCS1V15, 0, 0, b"", data)

    def decrypt_raw(self, data: bytes) -> bytes:
        """Raw RSA private operation (CKM_RSA_X_509); returns a modulus-sized block."""
        return self._decrypt(_RAW, 0, 0, b"", self._raw_int(data))


__all__ = ["DecryptionFailed", "InvalidSignature", "RsaPrivateKey", "RsaPublicKey"]
