"""The node's audit log: `audit.jsonl`, one JSON object per management event with a gap-free
sequence number per node (from 0), as CloudHSM's per-HSM audit stream.

Callers pass only names, handles and roles: never key material, passwords or data.

Each record is one newline-terminated JSON line, appended all-or-nothing (a short or failed
write is cut off again), and the sequence advances only once the line is written. At open, a
torn or unreadable tail (a crash mid-write, NUL blocks after a power cut) is cut off, so the
sequence stays gap-free. A full disk does not lose a record of something that was done: a
small reserve file beside the log is given up to write it; without space even then, the record
fails with CKR_DEVICE_MEMORY."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from hsmsim import files
from hsmsim.node.values import AuditRecord
from hsmsim.pkcs11.constants import RV
from hsmsim.pkcs11.errors import Pkcs11Error

FORBIDDEN_FIELDS = frozenset({"password", "pin", "value", "material", "key", "secret", "data"})
RESERVE_BYTES = 64 * 1024


def _good_prefix(data: bytes) -> tuple[int, int | None]:
    """Length of the log up to its last complete, readable record, and that record's sequence
    number. What follows it is a torn tail. (An unreadable line before it, left by an older
    version, is kept: later records must not be lost to repair it.)"""
    good, last, pos = 0, None, 0
    for line in data.splitlines(keepends=True):
        pos += len(line)
        if not line.endswith(b"\n"):
            break
        try:
            seq = json.loads(line)["seq"]
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(seq, int) and not isinstance(seq, bool):
            good, last = pos, seq
    return good, last


def read_file(path: Path, since_seq: int = 0, limit: int = 1000) -> list[AuditRecord]:
    """The records of an audit log file from `since_seq` on, at most `limit`, read without
    changing the file (`hsmsim audit` reads a stopped HSM's log this way). A torn last line
    (a write in progress, or a crash the node repairs at its next start) is not a record."""
    out: list[AuditRecord] = []
    with path.open("rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                d = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(d, dict) or d.get("seq", -1) < since_seq:
                continue
            seq, t, ev = d.pop("seq"), d.pop("time_us"), d.pop("event")
            d.pop("hsm_id", None)
            out.append(AuditRecord(seq, t, ev, d))
            if len(out) >= limit:
                break
    return out


class AuditLog:
    def __init__(self, path: Path, hsm_id: str) -> None:
        self._path = path
        self._hsm_id = hsm_id
        self._lock = threading.Lock()
        self._next = 0
        self._fd = files.open_fd(path, os.O_RDWR | os.O_APPEND)
        data = os.pread(self._fd, os.fstat(self._fd).st_size, 0)
        good, last = _good_prefix(data)
        if good != len(data):
            # A torn tail: cut it off (records after it cannot exist: this log is only
            # appended to after this repair).
            os.ftruncate(self._fd, good)
            os.fsync(self._fd)
            self.repaired_bytes = len(data) - good
        else:
            self.repaired_bytes = 0
        self._size = good
        if last is not None:
            self._next = last + 1
        self._reserve = path.with_name(path.name + ".reserve")
        self._make_reserve()

    @property
    def next_seq(self) -> int:
        return self._next

    def record(self, event: str, **fields: Any) -> int:
        bad = FORBIDDEN_FIELDS & set(fields)
        if bad:
            raise ValueError(f"audit records may not carry {sorted(bad)}")
        with self._lock:
            seq = self._next
            line = {"seq": seq, "time_us": time.time_ns() // 1000, "hsm_id": self._hsm_id,
                    "event": event, **fields}
            data = (json.dumps(line, separators=(",", ":"), default=str) + "\n").encode()
            try:
                self._size = files.append_all(self._fd, data, self._size)
            except OSError as exc:
                if not files.is_no_space(exc) or not self._give_up_reserve():
                    raise self._failure(exc) from None
                try:
                    self._size = files.append_all(self._fd, data, self._size)
                except OSError as again:
                    raise self._failure(again) from None
            self._next = seq + 1
        return seq

    def _failure(self, exc: OSError) -> Exception:
        if files.is_no_space(exc, self._path.parent):
            return Pkcs11Error(RV.DEVICE_MEMORY, "the HSM's audit log has no space left "
                               "(its disk is full)")
        return exc

    def _make_reserve(self) -> None:
        """Keep RESERVE_BYTES allocated beside the log (when there is room for them)."""
        try:
            fd = files.open_fd(self._reserve, os.O_WRONLY)
        except OSError:
            return
        try:
            if os.fstat(fd).st_size < RESERVE_BYTES:
                os.posix_fallocate(fd, 0, RESERVE_BYTES)
        except OSError:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)

    def _give_up_reserve(self) -> bool:
        try:
            if self._reserve.stat().st_size == 0:
                return False
            self._reserve.unlink()
            return True
        except OSError:
            return False

    def read(self, since_seq: int = 0, limit: int = 1000) -> list[AuditRecord]:
        with self._lock:
            return read_file(self._path, since_seq, limit)

    def close(self) -> None:
        os.close(self._fd)
