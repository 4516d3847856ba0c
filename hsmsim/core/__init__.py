"""hsmsim's crypto core: AES-GCM and RSA on key contexts cached in C (OpenSSL libcrypto,
through cffi), with a typed face that validates every argument before it reaches C.

    from hsmsim.core import AesGcmKey, RsaPrivateKey, RsaPublicKey

Errors: CoreError is the root (an hsmsim.errors.HsmsimError); InvalidTag, InvalidSignature
and DecryptionFailed say only that authentication failed. Bad arguments raise TypeError or
ValueError naming the argument. Importing checks that the compiled core's version equals
hsmsim.__version__ (ImportError otherwise).

Threads: keys may be shared by threads; the GIL is released in every C call. Batches
(AesGcmKey.encrypt_batch/decrypt_batch, RsaPrivateKey.sign_batch_*) make one C call and, when
large enough, split the work over `batch_threads` threads inside C (default 1; raise it
only where the process has CPUs to itself, which node processes usually do not). A process that
runs large batches may call malloc_keep() once at start (process-wide glibc tuning).

Departures worth knowing: RSA keys must be 2048 to 4096 bits (CloudHSM's range); raw
PKCS#1 v1.5 signatures (hash=None) need 1 to k-11 bytes of data, since OpenSSL 3.0 cannot
verify a signature over nothing; PKCS#1 v1.5 decryption reports padding failures as
DecryptionFailed (OpenSSL 3.0 has no implicit rejection). Python bytes given as keys or
key components cannot be wiped; the C copies are.
"""

from hsmsim.core._errors import (
    CoreError,
    DecryptionFailed,
    InvalidSignature,
    InvalidTag,
    KeyFormatError,
)
from hsmsim.core._ffi import malloc_keep, native_version
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
    "malloc_keep",
    "native_version",
]
