"""The cffi seam: loads the compiled core (hsmsim.core._native) and checks its version.

Everything typed `Any` in hsmsim.core comes from here; no other module imports _native."""

from __future__ import annotations

from array import array
from typing import Any

import hsmsim

try:
    from hsmsim.core._native import ffi as _ffi, lib as _lib
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "hsmsim.core: the compiled extension hsmsim.core._native is missing or cannot load "
        f"({exc}); build it with `make venv` or `pip install --no-build-isolation -e .`"
    ) from exc

ffi: Any = _ffi
lib: Any = _lib


def native_version() -> str:
    """The version string compiled into the C core."""
    return str(ffi.string(lib.hsmsim_version()).decode("ascii"))


def libcrypto_version() -> str:
    """The OpenSSL libcrypto the core runs on."""
    return str(ffi.string(lib.hsmsim_libcrypto_version()).decode("ascii", "replace"))


def malloc_keep(keep_bytes: int = 256 * 1024 * 1024) -> bool:
    """Process-wide, opt-in glibc malloc tuning for processes that run large batches: keep up
    to keep_bytes of freed heap rather than returning it to the kernel, so that dropping one
    batch's results does not make the next batch fault its pages in again. True if applied
    (glibc only)."""
    if type(keep_bytes) is not int:
        raise TypeError(f"keep_bytes must be an int, not {type(keep_bytes).__name__}")
    if not 0 <= keep_bytes <= 2**31 - 1:
        raise ValueError(f"keep_bytes must be 0 to {2**31 - 1}, got {keep_bytes}")
    return bool(lib.hsmsim_malloc_keep(keep_bytes))


if native_version() != hsmsim.__version__:
    raise ImportError(
        f"hsmsim.core: the compiled core is version {native_version()!r} but the hsmsim "
        f"package is {hsmsim.__version__!r}; rebuild it (`make venv`, or "
        "`pip install --no-build-isolation -e .`)"
    )

# array.array typecodes matching size_t and int32_t, for passing length/status vectors.
SIZE_T_CODE = next(c for c in "LQI" if array(c).itemsize == ffi.sizeof("size_t"))
INT32_CODE = next(c for c in "ilh" if array(c).itemsize == 4)
