"""The node's audit log: `audit.jsonl`, one JSON object per management event with a gap-free
sequence number per node (from 0), as CloudHSM's per-HSM audit stream.

Callers pass only names, handles and roles: never key material, passwords or data."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from hsmsim.node.values import AuditRecord

FORBIDDEN_FIELDS = frozenset({"password", "pin", "value", "material", "key", "secret", "data"})


class AuditLog:
    def __init__(self, path: Path, hsm_id: str) -> None:
        self._path = path
        self._hsm_id = hsm_id
        self._lock = threading.Lock()
        self._next = 0
        if path.exists():
            # Recover the sequence from the last complete line; drop a torn tail.
            data = path.read_bytes()
            good = data if data.endswith(b"\n") else data[: data.rfind(b"\n") + 1]
            if len(good) != len(data):
                with path.open("r+b") as f:
                    f.truncate(len(good))
            lines = good.splitlines()
            if lines:
                self._next = int(json.loads(lines[-1])["seq"]) + 1
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

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
            os.write(self._fd, (json.dumps(line, separators=(",", ":"), default=str)
                                + "\n").encode())
            self._next = seq + 1
        return seq

    def read(self, since_seq: int = 0, limit: int = 1000) -> list[AuditRecord]:
        out: list[AuditRecord] = []
        with self._lock, self._path.open("rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    break
                d = json.loads(raw)
                if d["seq"] < since_seq:
                    continue
                seq, t, ev = d.pop("seq"), d.pop("time_us"), d.pop("event")
                d.pop("hsm_id", None)
                out.append(AuditRecord(seq, t, ev, d))
                if len(out) >= limit:
                    break
        return out

    def close(self) -> None:
        os.close(self._fd)
