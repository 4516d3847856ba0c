"""What the cluster must remember across a daemon crash: the cluster-wide handle counter
(monotonic, never reused) and deletion tombstones of objects and users. Both are fsynced
before the cluster acts on them."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from hsmsim import files
from hsmsim.cluster.state import StateError

HANDLE_BLOCK = 4096  # handles reserved on disk ahead of use
FIRST_HANDLE = 0x10000  # room below for nothing in particular; keeps handles visibly cluster-made


class HandleAllocator:
    """Cluster-wide object handles. The file records a reservation: every handle below it may
    have been handed out, so after a crash counting restarts at the reservation."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        reserved = FIRST_HANDLE
        if path.exists():
            try:
                reserved = int(json.loads(path.read_text())["reserved"])
            except (ValueError, KeyError, TypeError, OSError):
                raise StateError(f"{path} is corrupt; handles could be reused, so the daemon "
                                 "will not start (restore the state directory)") from None
        self._next = reserved
        self._reserved = reserved

    def bump_past(self, handle: int) -> None:
        """Never hand out `handle` or anything below it (handles found on nodes at start)."""
        with self._lock:
            if handle >= self._next:
                self._next = handle + 1
                if self._next > self._reserved:
                    self._reserve(self._next)

    def allocate(self, n: int = 1) -> list[int]:
        with self._lock:
            first = self._next
            self._next += n
            if self._next > self._reserved:
                self._reserve(self._next)
            return list(range(first, first + n))

    def _reserve(self, at_least: int) -> None:
        self._reserved = at_least + HANDLE_BLOCK
        files.atomic_write(self.path, json.dumps({"reserved": self._reserved}).encode(), mode=0o600)


class Journal:
    """Append-only JSON lines: {"t": "tomb", "h": handle} | {"t": "user_tomb", "u": name} |
    {"t": "user_live", "u": name}. Each append is fsynced."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tombstones: set[int] = set()
        self.user_tombstones: set[str] = set()
        files.make_dir(path.parent)
        if path.exists():
            raw = path.read_bytes()
            if raw and not raw.endswith(b"\n"):
                # A record torn by a crash mid-append was never acted on: drop it.
                raw = raw[:raw.rfind(b"\n") + 1]
                with path.open("r+b") as f:
                    f.truncate(len(raw))
                    os.fsync(f.fileno())
            for n, line in enumerate(raw.decode("utf-8", "replace").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    self._apply(json.loads(line))
                except (ValueError, KeyError, TypeError):
                    raise StateError(f"{path} line {n} is corrupt; deleted keys could come "
                                     "back, so the daemon will not start (restore the state "
                                     "directory)") from None
        self._fd = files.open_fd(path, os.O_WRONLY | os.O_APPEND)
        self._size = os.fstat(self._fd).st_size
        self._lock = threading.Lock()

    def _apply(self, rec: dict[str, object]) -> None:
        t = rec["t"]
        if t == "tomb":
            self.tombstones.add(int(rec["h"]))  # type: ignore[call-overload]
        elif t == "user_tomb":
            self.user_tombstones.add(str(rec["u"]))
        elif t == "user_live":
            self.user_tombstones.discard(str(rec["u"]))
        else:
            raise ValueError(t)

    def append(self, *records: dict[str, object]) -> None:
        if not records:
            return
        data = b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in records)
        with self._lock:
            # Whole records or nothing (a full disk must not leave a torn line that the next
            # append would join).
            self._size = files.append_all(self._fd, data, self._size)
            os.fsync(self._fd)
            for r in records:
                self._apply(r)

    def tombstone(self, *handles: int) -> None:
        self.append(*({"t": "tomb", "h": h} for h in handles))

    def close(self) -> None:
        os.close(self._fd)
