"""The subset of CBOR (RFC 8949) that Smithy RPC v2 CBOR uses: definite and indefinite maps,
arrays and strings, integers, floats, booleans, null, and tag 1 (epoch-seconds timestamps).
Decoding is bounded (depth, lengths) and raises CborError, never another exception, on any
input; encoding writes timestamps (`datetime`) as tag 1 with a float, as botocore expects."""

from __future__ import annotations

import datetime as _dt
import math
import struct
from typing import Any

from hsmsim import awsmodel

MAX_DEPTH = awsmodel.MAX_DEPTH  # one limit for JSON and CBOR bodies


class CborError(ValueError):
    """The bytes are not a CBOR data item this codec reads."""


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise CborError("truncated CBOR")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def byte(self) -> int:
        return self.take(1)[0]

    def argument(self, info: int) -> int | None:
        """The argument of a head; None for the indefinite-length marker (31)."""
        if info < 24:
            return info
        if info == 24:
            return self.byte()
        if info == 25:
            return int(struct.unpack(">H", self.take(2))[0])
        if info == 26:
            return int(struct.unpack(">I", self.take(4))[0])
        if info == 27:
            return int(struct.unpack(">Q", self.take(8))[0])
        if info == 31:
            return None
        raise CborError("reserved additional information")

    def item(self, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise CborError(f"CBOR nests deeper than {MAX_DEPTH} levels")
        head = self.byte()
        major, info = head >> 5, head & 31
        if major == 7:
            return self._simple(info)
        arg = self.argument(info)
        if major == 0:
            return _need(arg)
        if major == 1:
            return -1 - _need(arg)
        if major in (2, 3):
            if arg is None:
                chunks = []
                while self.data[self.pos:self.pos + 1] != b"\xff":
                    chunk = self.item(depth + 1)
                    if not isinstance(chunk, (bytes, str)) or isinstance(chunk, str) != (major == 3):
                        raise CborError("bad chunk in an indefinite-length string")
                    chunks.append(chunk.encode() if isinstance(chunk, str) else chunk)
                self.take(1)
                raw = b"".join(chunks)
            else:
                raw = self.take(arg)
            if major == 2:
                return raw
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                raise CborError("text string is not UTF-8") from None
        if major == 4:
            out: list[Any] = []
            if arg is None:
                while self.data[self.pos:self.pos + 1] != b"\xff":
                    out.append(self.item(depth + 1))
                self.take(1)
            else:
                if arg > len(self.data):
                    raise CborError("truncated CBOR")
                out = [self.item(depth + 1) for _ in range(arg)]
            return out
        if major == 5:
            m: dict[Any, Any] = {}
            n = 0
            while arg is None or n < arg:
                if arg is None and self.data[self.pos:self.pos + 1] == b"\xff":
                    self.take(1)
                    break
                if arg is not None and arg > len(self.data):
                    raise CborError("truncated CBOR")
                k = self.item(depth + 1)
                if not isinstance(k, str):
                    raise CborError("map keys must be text strings")
                m[k] = self.item(depth + 1)
                n += 1
            return m
        # major 6: a tag; tag 1 is an epoch-seconds timestamp, others pass their content
        tag = _need(arg)
        value = self.item(depth + 1)
        if tag == 1:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise CborError("tag 1 needs a number")
            return float(value)
        return value

    def _simple(self, info: int) -> Any:
        if info == 20:
            return False
        if info == 21:
            return True
        if info in (22, 23):
            return None
        if info == 25:
            return float(struct.unpack(">e", self.take(2))[0])
        if info == 26:
            return float(struct.unpack(">f", self.take(4))[0])
        if info == 27:
            return float(struct.unpack(">d", self.take(8))[0])
        raise CborError("unsupported simple value")


def _need(arg: int | None) -> int:
    if arg is None:
        raise CborError("indefinite length where a number is needed")
    return arg


def loads(data: bytes) -> Any:
    """One CBOR data item that fills `data`."""
    r = _Reader(data)
    try:
        value = r.item()
    except RecursionError:
        raise CborError("CBOR nests too deep") from None
    if r.pos != len(data):
        raise CborError("trailing bytes after the CBOR data item")
    return value


def _head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes([major << 5 | n])
    if n < 1 << 8:
        return bytes([major << 5 | 24, n])
    if n < 1 << 16:
        return bytes([major << 5 | 25]) + struct.pack(">H", n)
    if n < 1 << 32:
        return bytes([major << 5 | 26]) + struct.pack(">I", n)
    return bytes([major << 5 | 27]) + struct.pack(">Q", n)


def dumps(value: Any) -> bytes:
    """CBOR for JSON-like values; `datetime` as tag 1 (epoch seconds, float); None members
    of a dict are left out."""
    out = bytearray()
    _dump(out, value)
    return bytes(out)


def _dump(out: bytearray, v: Any) -> None:
    if v is None:
        out.append(0xF6)
    elif v is True:
        out.append(0xF5)
    elif v is False:
        out.append(0xF4)
    elif isinstance(v, int):
        out += _head(0, v) if v >= 0 else _head(1, -1 - v)
    elif isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError("no NaN or infinite numbers in a response")
        out.append(0xFB)
        out += struct.pack(">d", v)
    elif isinstance(v, _dt.datetime):
        out.append(0xC1)
        _dump(out, v.timestamp())
    elif isinstance(v, str):
        raw = v.encode()
        out += _head(3, len(raw)) + raw
    elif isinstance(v, (bytes, bytearray)):
        out += _head(2, len(v)) + bytes(v)
    elif isinstance(v, (list, tuple)):
        out += _head(4, len(v))
        for item in v:
            _dump(out, item)
    elif isinstance(v, dict):
        items = [(k, x) for k, x in v.items() if x is not None]
        out += _head(5, len(items))
        for k, x in items:
            _dump(out, str(k))
            _dump(out, x)
    else:
        raise TypeError(f"cannot encode {type(v).__name__} as CBOR")
