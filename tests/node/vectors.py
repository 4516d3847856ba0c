"""Loader for the known-answer vectors the node tests use, read in their upstream text
formats from the `cryptography-vectors` package (NIST CAVP .rsp/.txt, RFC 4231 files):
records of `NAME = hex` lines separated by blank lines, with `[section]` headers carried
into each record and a bare `FAIL` line marking an expected failure."""

from __future__ import annotations

from typing import Any

import cryptography_vectors


def load(rel: str, first: str) -> list[dict[str, Any]]:
    """Records of one file; a record starts at a `first = ...` line (case-insensitive)."""
    with cryptography_vectors.open_vector_file(rel, "r") as f:
        text = str(f.read())
    records: list[dict[str, Any]] = []
    context: dict[str, Any] = {}
    record: dict[str, Any] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            if not line:
                record = None
            continue
        if line.startswith("[") and line.endswith("]"):
            k, _, v = line.strip("[]").partition("=")
            context[k.strip().lower()] = v.strip()
            continue
        if line == "FAIL":
            if record is not None:
                record["fail"] = True
            continue
        k, sep, v = line.partition("=")
        if not sep:
            continue
        k, v = k.strip().lower(), v.strip()
        if k == first.lower():
            record = dict(context)
            records.append(record)
        if record is not None:
            record[k] = v
    return records


def hx(record: dict[str, Any], key: str) -> bytes:
    return bytes.fromhex(record.get(key, "") or "")
