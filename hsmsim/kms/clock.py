"""The KMS clock: wall time plus an offset that tests may move forward (persisted), so that
scheduled deletions and automatic rotations can be observed without waiting days.

FIDELITY: real KMS has no such control; ours is `POST /_hsmsim/clock` (config
kms.clock_control, on by default on the loopback endpoint)."""

from __future__ import annotations

import time


class Clock:
    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset

    def now(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("the KMS clock only moves forward")
        self.offset += seconds
