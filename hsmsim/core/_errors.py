"""Maps the C core's status codes to exceptions: one table, one function, used by every call."""

from __future__ import annotations

from typing import NoReturn

from hsmsim.errors import HsmsimError

# Mirrors `hsmsim_status` in native/core/hsmsim_core.h (tests/core/test_build.py checks it).
OK = 0
ERR_ARG = 1
ERR_NOMEM = 2
ERR_KEY = 3
ERR_TAG = 4
ERR_SIGNATURE = 5
ERR_DECRYPT = 6
ERR_BUFFER = 7
ERR_CRYPTO = 8


class CoreError(HsmsimError):
    """Root of the crypto core's errors."""


class InvalidTag(CoreError):
    """AES-GCM authentication failed. Deliberately says nothing more."""


class InvalidSignature(CoreError):
    """A signature did not verify. Deliberately says nothing more."""


class DecryptionFailed(CoreError):
    """RSA decryption failed (padding, label or range). Deliberately says nothing more."""


class KeyFormatError(CoreError, ValueError):
    """Key bytes are not a key of the expected kind and encoding."""


_STATUS: dict[int, tuple[type[Exception], str]] = {
    ERR_ARG: (CoreError, "the crypto core rejected an argument the Python face let through"),
    ERR_NOMEM: (MemoryError, "the crypto core ran out of memory"),
    ERR_KEY: (KeyFormatError, "key bytes are not an RSA key in a supported DER encoding"),
    ERR_TAG: (InvalidTag, "authentication failed"),
    ERR_SIGNATURE: (InvalidSignature, "signature verification failed"),
    ERR_DECRYPT: (DecryptionFailed, "decryption failed"),
    ERR_BUFFER: (CoreError, "output buffer too small for the crypto core"),
    ERR_CRYPTO: (CoreError, "libcrypto operation failed"),
}


def exception_for(status: int) -> Exception:
    """The exception for a non-zero status (an unknown code becomes a CoreError naming it)."""
    cls, message = _STATUS.get(status, (CoreError, f"unknown crypto core status {status}"))
    return cls(message)


def raise_for(status: int) -> NoReturn:
    """Raises the exception for a non-zero status; callers test `if status:` first."""
    raise exception_for(status)
