"""AES-GCM on a key loaded once into the C core: single messages, caller buffers and batches.

Thread safety: an AesGcmKey may be used from several threads at once (the C context keeps
a pool of per-operation cipher contexts). The GIL is released during every C call.
`close()` drops this object's reference to the C context; the context is zeroised and
freed as soon as no call in flight still holds it.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Sequence
from functools import lru_cache
from itertools import accumulate
from types import TracebackType
from typing import Any

from hsmsim.core._args import MAX_INPUT, as_bytes, as_int, bytes_seq, check_len, out_buffer
from hsmsim.core._errors import ERR_TAG, InvalidTag, raise_for
from hsmsim.core._ffi import INT32_CODE, SIZE_T_CODE, ffi, lib

KEY_SIZES = (16, 24, 32)
IV_MIN, IV_MAX = 1, 128
TAG_MIN, TAG_MAX = 4, 16
_TAG_LENS = frozenset(range(TAG_MIN, TAG_MAX + 1))
# Batches are split over worker threads in C once they hold this much work (bytes, with a
# message counting _MSG_COST bytes); the default number of threads follows the CPU count.
_MSG_COST = 512
_WORK_PER_THREAD = 256 * 1024
# From this average message size on, batch inputs go to C as pointers, not one packed copy.
_POINTERS_FROM = 4096
MAX_BATCH_THREADS = 8
# One thread by default: node processes share the machine's CPUs, and measured under load
# a second thread inside C slowed batches down as often as it sped them up. Opt in per key.
DEFAULT_BATCH_THREADS = 1

_encrypt = lib.hsmsim_gcm_encrypt
_from_buffer = ffi.from_buffer
_buffer = ffi.buffer
_alloc = ffi.new_allocator(should_clear_after_alloc=False)  # C overwrites every byte it returns
_decrypt = lib.hsmsim_gcm_decrypt


def _check_iv(iv: object) -> bytes:
    iv = as_bytes(iv, "iv")
    if not IV_MIN <= len(iv) <= IV_MAX:
        raise ValueError(f"iv must be {IV_MIN} to {IV_MAX} bytes, got {len(iv)}")
    return iv


def _check_tag_len(tag_len: object) -> int:
    if type(tag_len) is not int:
        raise TypeError(f"tag_len must be an int, not {type(tag_len).__name__}")
    if tag_len not in _TAG_LENS:
        raise ValueError(f"tag_len must be {TAG_MIN} to {TAG_MAX}, got {tag_len}")
    return tag_len


def _check_data(data: object, name: str = "data") -> bytes:
    data = as_bytes(data, name)
    check_len(data, name)
    return data


class AesGcmKey:
    """An AES-128/192/256 key for GCM, expanded once in the C core and reused.

    encrypt returns ciphertext || tag; decrypt takes the same layout. Any authentication
    failure raises InvalidTag and nothing else about it."""

    __slots__ = ("_ctx", "_key_size", "_threads", "_pool")

    def __init__(self, key: bytes, *, batch_threads: int | None = None) -> None:
        """batch_threads: how many threads a large batch may use inside C (default 1: every
        batch runs on the calling thread)."""
        self._ctx: Any = None
        key = as_bytes(key, "key")
        if len(key) not in KEY_SIZES:
            raise ValueError("key must be 16, 24 or 32 bytes")
        if batch_threads is None:
            batch_threads = DEFAULT_BATCH_THREADS
        elif not 1 <= as_int(batch_threads, "batch_threads") <= MAX_BATCH_THREADS:
            raise ValueError(f"batch_threads must be 1 to {MAX_BATCH_THREADS}, got {batch_threads}")
        self._threads = batch_threads
        self._pool: list[Any] = []
        pp = ffi.new("hsmsim_gcm **")
        status = lib.hsmsim_gcm_new(key, len(key), pp)
        if status:
            raise_for(status)
        self._key_size = len(key)
        self._ctx = ffi.gc(pp[0], lib.hsmsim_gcm_free)

    @property
    def batch_threads(self) -> int:
        """How many threads a large batch may use inside C."""
        return self._threads

    @property
    def key_size(self) -> int:
        """Key length in bytes (16, 24 or 32)."""
        return self._key_size

    def _live(self) -> Any:
        ctx = self._ctx
        if ctx is None:
            raise ValueError("key is closed")
        return ctx

    # ---- single messages -------------------------------------------------------------------

    def encrypt(self, iv: bytes, data: bytes, aad: bytes = b"", tag_len: int = 16) -> bytes:
        """ciphertext || tag (tag_len bytes)."""
        ctx = self._ctx
        if not (
            type(iv) is bytes and type(data) is bytes and type(aad) is bytes
            and type(tag_len) is int and ctx is not None and 0 < len(iv) <= IV_MAX
            and len(data) <= MAX_INPUT and len(aad) <= MAX_INPUT and tag_len in _TAG_LENS
        ):
            ctx, iv, data, aad, tag_len = self._slow_args(iv, data, aad, tag_len)
        size = len(data) + tag_len
        out = _alloc("uint8_t[]", size)
        status = _encrypt(ctx, iv, len(iv), aad, len(aad), data, len(data), out, size, tag_len)
        if status:
            raise_for(status)
        return _buffer(out, size)[:]  # type: ignore[no-any-return]

    def decrypt(self, iv: bytes, data: bytes, aad: bytes = b"", tag_len: int = 16) -> bytes:
        """The plaintext of ciphertext || tag; InvalidTag if it does not authenticate."""
        ctx = self._ctx
        if not (
            type(iv) is bytes and type(data) is bytes and type(aad) is bytes
            and type(tag_len) is int and ctx is not None and 0 < len(iv) <= IV_MAX
            and len(data) <= MAX_INPUT and len(aad) <= MAX_INPUT and tag_len in _TAG_LENS
        ):
            ctx, iv, data, aad, tag_len = self._slow_args(iv, data, aad, tag_len)
        size = len(data) - tag_len
        if size < 0:
            raise ValueError(f"data must be at least tag_len ({tag_len}) bytes, got {len(data)}")
        out = _alloc("uint8_t[]", size or 1)
        status = _decrypt(ctx, iv, len(iv), aad, len(aad), data, len(data), out, size, tag_len)
        if status:
            raise_for(status)
        return _buffer(out, size)[:]  # type: ignore[no-any-return]

    def encrypt_into(
        self,
        iv: bytes,
        data: bytes,
        out: bytearray | memoryview,
        aad: bytes = b"",
        tag_len: int = 16,
    ) -> int:
        """Writes ciphertext || tag at the start of `out`; returns the bytes written."""
        # Hot path: the common argument types checked inline; anything else takes the
        # general path, which normalises bytes-like inputs or raises the precise error.
        ctx = self._ctx
        if (
            type(iv) is bytes and type(data) is bytes and type(aad) is bytes
            and type(out) is bytearray and type(tag_len) is int and ctx is not None
        ):
            n = len(data)
            size = n + tag_len
            if (
                0 < len(iv) <= IV_MAX and n <= MAX_INPUT and len(aad) <= MAX_INPUT
                and tag_len in _TAG_LENS and len(out) >= size
            ):
                status = _encrypt(ctx, iv, len(iv), aad, len(aad), data, n, _from_buffer(out),
                                  size, tag_len)
                if status:
                    raise_for(status)
                return size
        ctx, iv, data, aad, tag_len = self._slow_args(iv, data, aad, tag_len)
        size = len(data) + tag_len
        status = _encrypt(ctx, iv, len(iv), aad, len(aad), data, len(data),
                          out_buffer(out, size), size, tag_len)
        if status:
            raise_for(status)
        return size

    def decrypt_into(
        self,
        iv: bytes,
        data: bytes,
        out: bytearray | memoryview,
        aad: bytes = b"",
        tag_len: int = 16,
    ) -> int:
        """Writes the plaintext at the start of `out`; returns its length. On InvalidTag the
        bytes of `out` that would have held plaintext are zeroed."""
        ctx = self._ctx
        if (
            type(iv) is bytes and type(data) is bytes and type(aad) is bytes
            and type(out) is bytearray and type(tag_len) is int and ctx is not None
        ):
            n = len(data)
            size = n - tag_len
            if (
                0 < len(iv) <= IV_MAX and n <= MAX_INPUT and len(aad) <= MAX_INPUT
                and tag_len in _TAG_LENS and 0 <= size <= len(out)
            ):
                status = _decrypt(ctx, iv, len(iv), aad, len(aad), data, n, _from_buffer(out),
                                  size, tag_len)
                if status:
                    raise_for(status)
                return size
        ctx, iv, data, aad, tag_len = self._slow_args(iv, data, aad, tag_len)
        size = len(data) - tag_len
        if size < 0:
            raise ValueError(f"data must be at least tag_len ({tag_len}) bytes, got {len(data)}")
        status = _decrypt(ctx, iv, len(iv), aad, len(aad), data, len(data),
                          out_buffer(out, size), size, tag_len)
        if status:
            raise_for(status)
        return size

    def _slow_args(
        self, iv: object, data: object, aad: object, tag_len: object
    ) -> tuple[Any, bytes, bytes, bytes, int]:
        return (
            self._live(), _check_iv(iv), _check_data(data), _check_data(aad, "aad"),
            _check_tag_len(tag_len),
        )

    # ---- batches ---------------------------------------------------------------------------

    def _batch_args(
        self, ivs: object, datas: object, aads: object, tag_len: object
    ) -> tuple[int, list[bytes], array[int], list[bytes], array[int], list[bytes] | None,
               array[int] | None, int]:
        tag_len = _check_tag_len(tag_len)
        iv_list = bytes_seq(ivs, "ivs")
        data_list = bytes_seq(datas, "datas")
        n = len(data_list)
        if len(iv_list) != n:
            raise ValueError(f"ivs must have one iv per message: {len(iv_list)} for {n}")
        iv_lens = array(SIZE_T_CODE, map(len, iv_list))
        if n and (min(iv_lens) < IV_MIN or max(iv_lens) > IV_MAX):
            i = next(i for i, v in enumerate(iv_lens) if not IV_MIN <= v <= IV_MAX)
            raise ValueError(f"ivs[{i}] must be {IV_MIN} to {IV_MAX} bytes, got {iv_lens[i]}")
        in_lens = array(SIZE_T_CODE, map(len, data_list))
        if sum(in_lens) > MAX_INPUT:
            raise ValueError(f"datas must total at most {MAX_INPUT} bytes")
        aad_list: list[bytes] | None = None
        aad_lens: array[int] | None = None
        if aads is not None:
            aad_list = bytes_seq(aads, "aads")
            if len(aad_list) != n:
                raise ValueError(f"aads must have one aad per message: {len(aad_list)} for {n}")
            aad_lens = array(SIZE_T_CODE, map(len, aad_list))
            if sum(aad_lens) > MAX_INPUT:
                raise ValueError(f"aads must total at most {MAX_INPUT} bytes")
        return n, iv_list, iv_lens, data_list, in_lens, aad_list, aad_lens, tag_len

    def _batch(
        self, fn: Any, ivs: object, datas: object, aads: object, tag_len: object, enc: bool
    ) -> tuple[list[bytes], list[int]]:
        ctx = self._live()
        n, iv_list, iv_lens, data_list, in_lens, aad_list, aad_lens, tag = self._batch_args(
            ivs, datas, aads, tag_len
        )
        if not n:
            return [], []
        if not enc and min(in_lens) < tag:
            i = next(i for i, v in enumerate(in_lens) if v < tag)
            raise ValueError(f"datas[{i}] must be at least tag_len ({tag}) bytes")
        # The batch goes to C in chunks of about _WORK_PER_THREAD per thread, so that the
        # packed inputs and the output scratch stay in cache; one C call per chunk.
        total_in = sum(in_lens)
        per_chunk = max(1, _WORK_PER_THREAD * self._threads * n // (total_in + n * _MSG_COST))
        uniform = in_lens.count(in_lens[0]) == n
        parts: list[bytes] = []
        status: list[int] = []
        for a in range(0, n, per_chunk):
            b = min(n, a + per_chunk)
            got, st = self._chunk(
                fn, ctx, enc, tag, uniform, iv_list[a:b], iv_lens[a:b], data_list[a:b],
                in_lens[a:b], None if aad_list is None else aad_list[a:b],
                None if aad_lens is None else aad_lens[a:b],
            )
            parts += got
            status += st
        return parts, status

    def _chunk(
        self, fn: Any, ctx: Any, enc: bool, tag: int, uniform: bool, iv_list: list[bytes],
        iv_lens: array[int], data_list: list[bytes], in_lens: array[int],
        aad_list: list[bytes] | None, aad_lens: array[int] | None,
    ) -> tuple[list[bytes], array[int]]:
        n = len(data_list)
        delta = tag if enc else -tag
        if uniform:
            out_lens: list[int] | int = in_lens[0] + delta
            total = n * (in_lens[0] + delta)
        else:
            out_lens = [v + delta for v in in_lens]
            total = sum(out_lens)
        work = total + n * _MSG_COST
        threads = min(self._threads, max(1, work // _WORK_PER_THREAD))
        status = array(INT32_CODE, bytes(4 * n))
        if total >= _POINTERS_FROM * n:
            # Large messages: pass one pointer per message rather than copying them together.
            views = [_from_buffer("uint8_t[]", d) for d in data_list]
            packed, pointers = ffi.NULL, ffi.new("uint8_t *[]", views)
        else:
            packed, pointers = b"".join(data_list), ffi.NULL
        out = self._scratch(total)
        try:
            rc = fn(
                ctx, n,
                b"".join(iv_list), _from_buffer("size_t[]", iv_lens),
                ffi.NULL if aad_list is None else b"".join(aad_list),
                ffi.NULL if aad_lens is None else _from_buffer("size_t[]", aad_lens),
                packed, pointers, _from_buffer("size_t[]", in_lens),
                out, total, tag, _from_buffer("int32_t[]", status), threads,
            )
            if rc:
                raise_for(rc)
            parts = _split(ffi.buffer(out, total), out_lens, n)
        finally:
            if not enc:
                lib.hsmsim_wipe(out, total)  # no plaintext left in the scratch buffer
            self._pool.append(out)
        return parts, status

    def _scratch(self, size: int) -> Any:
        """An output buffer of at least `size` bytes from this key's pool (reused, so that a
        batch does not fault in fresh pages; each concurrent batch gets its own)."""
        try:
            buf = self._pool.pop()
        except IndexError:
            buf = None
        if buf is None or len(buf) < size:
            buf = ffi.new("uint8_t[]", max(size, 4096, 0 if buf is None else 2 * len(buf)))
        return buf

    def encrypt_batch(
        self,
        ivs: Sequence[bytes],
        datas: Sequence[bytes],
        aads: Sequence[bytes] | None = None,
        tag_len: int = 16,
    ) -> list[bytes]:
        """Encrypts message i under ivs[i] with aads[i]; one C call for the whole batch."""
        parts, status = self._batch(lib.hsmsim_gcm_encrypt_batch, ivs, datas, aads, tag_len, True)
        if any(status):
            raise_for(next(s for s in status if s))
        return parts

    def decrypt_batch(
        self,
        ivs: Sequence[bytes],
        datas: Sequence[bytes],
        aads: Sequence[bytes] | None = None,
        tag_len: int = 16,
    ) -> list[bytes | None]:
        """Decrypts message i; None in place of each message whose tag failed."""
        plain, status = self._batch(lib.hsmsim_gcm_decrypt_batch, ivs, datas, aads, tag_len, False)
        parts: list[bytes | None] = list(plain)
        if any(status):
            for i, s in enumerate(status):
                if s == ERR_TAG:
                    parts[i] = None
                elif s:
                    raise_for(s)
        return parts

    # ---- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        """Releases the C context (zeroised and freed once no call in flight holds it)."""
        self._ctx = None
        self._pool.clear()

    def __enter__(self) -> AesGcmKey:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        self._ctx = None

    def __repr__(self) -> str:
        state = "closed" if self._ctx is None else "open"
        return f"<AesGcmKey AES-{getattr(self, '_key_size', 0) * 8}-GCM {state}>"


@lru_cache(maxsize=32)
def _unpacker(count: int, size: int) -> struct.Struct:
    return struct.Struct(f"{size}s" * count)


def _split(blob: Any, lens: list[int] | int, n: int) -> list[bytes]:
    """Cuts a buffer into n consecutive bytes objects: all `lens` long (an int), or of the
    given lengths (a list)."""
    if isinstance(lens, int):
        if lens == 0:
            return [b""] * n
        if n <= 4096:  # one cached struct format cuts them all in C
            return list(_unpacker(n, lens).unpack_from(blob))
        return [blob[i : i + lens] for i in range(0, n * lens, lens)]
    ends = list(accumulate(lens))
    return [blob[e - k : e] for e, k in zip(ends, lens)]


__all__ = ["AesGcmKey", "InvalidTag"]
