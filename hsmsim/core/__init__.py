"""hsmsim's crypto core: AES-GCM and RSA on key contexts cached in C (OpenSSL libcrypto,
through cffi), with a typed face that validates every argument before it reaches C.

    from hsmsim.core import AesGcmKey, RsaPrivateKey, RsaPublicKey

Errors: CoreError is the root (an hsmsim.errors.HsmsimError); InvalidTag, InvalidSignature
and DecryptionFailed say only that authentication failed. Bad arguments raise TypeError or
ValueError naming the argument. Importing checks that the compiled core's version equals
hsmsim.__version__ (ImportError otherwise).
"""

from hsmsim.core._errors import (
    CoreError,
    DecryptionFailed,
    InvalidSignature,
    InvalidTag,
    KeyFormatError,
)
from hsmsim.core._ffi import native_version
from hsmsim.core.aesgcm import AesGcmKey
from hsmsim.core.rsa import RsaPrivateKey, RsaPublicKey

__all__ = [
    "AesGcmKey",
    "CoreError",
    "DecryptionFailed",
    "InvalidSignature",
    "InvalidTag",
    "KeyFormatError",
    "RsaPrivateKey",
    "RsaPublicKey",
    "native_version",
]
