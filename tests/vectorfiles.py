"""Reads known-answer vectors in their upstream text formats from the `cryptography-vectors`
package: NIST CAVP .rsp/.txt files and RFC 4231 files, as records of `NAME = hex` lines. Shared
by the core's and the node's known-answer tests."""

from __future__ import annotations

from typing import Any

import cryptography_vectors


def read_vector_file(rel: str) -> str:
    with cryptography_vectors.open_vector_file(rel, "r") as f:
        return str(f.read())


def load_rsp(rel: str, record_key: str) -> list[dict[str, Any]]:
    """A NIST CAVP .rsp file as records. A record starts at each `record_key = ...` line and
    runs to the next blank line; it carries the section headers (`[k = v]`) and the fields
    seen outside records before it (such as `n` and `e`); a bare `FAIL` line sets `fail`.
    Keys are lower-case."""
    records: list[dict[str, Any]] = []
    context: dict[str, Any] = {}
    record: dict[str, Any] | None = None
    for raw in read_vector_file(rel).splitlines():
        line = raw.strip()
        if not line:
            record = None  # a blank line ends a record; what follows is section context
            continue
        if line.startswith("#"):
            continue
        if line.startswith("["):
            k, _, v = line.strip("[]").partition("=")
            context[k.strip().lower()] = v.strip()
            record = None
            continue
        if line == "FAIL":
            if record is not None:
                record["fail"] = True
            continue
        k, sep, v = line.partition("=")
        if not sep:
            continue
        k, v = k.strip().lower(), v.strip()
        if k == record_key.lower():
            record = dict(context)
            record["fail"] = False
            records.append(record)
        if record is None:
            context[k] = v
        else:
            record[k] = v
    return records


def hx(record: dict[str, Any], key: str) -> bytes:
    """One hex field of a record as bytes (b"" when absent or empty)."""
    return bytes.fromhex(record.get(key, "") or "")
