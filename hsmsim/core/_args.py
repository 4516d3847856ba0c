"""Argument checks for the crypto core's Python face: every value is checked here, with a
TypeError or ValueError naming the argument, before anything reaches C."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hsmsim.core._ffi import ffi

MAX_INPUT = 64 * 1024 * 1024
"""Largest single message, AAD, label or batch total the core accepts (64 MiB)."""

MAX_BATCH = 1 << 20
"""Most messages in one batch call."""

# The crypto core's hashes by name. The names are those of hsmsim.pkcs11.mechanisms.HASHES, the
# one table that maps mechanisms to hashes (core is the lowest layer and cannot import it; this
# adds only the C codes; tests/gateway/test_tables.py checks the two agree).
HASHES: dict[str, tuple[int, int]] = {
    # name: (hsmsim_hash code in hsmsim_core.h, digest size in bytes)
    "sha1": (1, 20),
    "sha224": (2, 28),
    "sha256": (3, 32),
    "sha384": (4, 48),
    "sha512": (5, 64),
}
HASH_NONE = 0

_BYTES_LIKE = (bytes, bytearray, memoryview)


def as_bytes(value: object, name: str) -> bytes:
    """`value` as bytes (bytearray and memoryview are copied); TypeError naming `name`."""
    if type(value) is bytes:
        return value
    if isinstance(value, _BYTES_LIKE):
        return bytes(value)
    raise TypeError(f"{name} must be bytes, not {type(value).__name__}")


def check_len(data: bytes, name: str, limit: int = MAX_INPUT) -> None:
    if len(data) > limit:
        raise ValueError(f"{name} must be at most {limit} bytes, got {len(data)}")


def as_int(value: object, name: str) -> int:
    if type(value) is not int:
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    return value


def out_buffer(out: object, need: int) -> Any:
    """A writable caller buffer (bytearray or writable memoryview) of at least `need` bytes,
    as a cffi pointer into it."""
    if type(out) is bytearray:
        if len(out) < need:
            raise ValueError(f"out must be at least {need} bytes, got {len(out)}")
        return ffi.from_buffer(out)
    if isinstance(out, memoryview):
        if out.readonly:
            raise TypeError("out must be a writable buffer, not a read-only memoryview")
        if not out.c_contiguous:
            raise ValueError("out must be a contiguous buffer")
        if out.nbytes < need:
            raise ValueError(f"out must be at least {need} bytes, got {out.nbytes}")
        return ffi.from_buffer(out)
    if isinstance(out, bytearray):
        return out_buffer(memoryview(out), need)
    raise TypeError(f"out must be a bytearray or writable memoryview, not {type(out).__name__}")


def hash_code(value: object, name: str) -> tuple[int, int]:
    """(hsmsim_hash code, digest size) for a hash name."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    try:
        return HASHES[value]
    except KeyError:
        raise ValueError(f"{name} must be one of {', '.join(HASHES)}, got {value!r}") from None


def bytes_seq(values: object, name: str) -> list[bytes]:
    """A sequence of bytes-like values as a list of bytes; TypeError naming `name[i]`."""
    if isinstance(values, (str, *_BYTES_LIKE)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence of bytes, not {type(values).__name__}")
    items = list(values)
    if len(items) > MAX_BATCH:
        raise ValueError(f"{name} must hold at most {MAX_BATCH} items, got {len(items)}")
    if set(map(type, items)) <= {bytes}:
        return items
    return [as_bytes(v, f"{name}[{i}]") for i, v in enumerate(items)]
