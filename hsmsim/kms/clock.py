"""The KMS clock: wall time plus an offset that tests may move forward (persisted), so that
scheduled deletions and automatic rotations can be observed without waiting days.

FIDELITY: real KMS has no such control; ours is `POST /_hsmsim/clock` (config
kms.clock_control, on by default on the loopback endpoint; SigV4-authenticated like every
other call). A move is a finite number of seconds, at least 0 and at most MAX_OFFSET in total,
so every date the KMS stores or answers stays a finite epoch time."""

from __future__ import annotations

import math
import time

# At most about 100 years ahead of wall time, in total: far enough for any deletion window or
# rotation period (at most 2560 days), near enough for every date to stay representable.
MAX_OFFSET = 100 * 365.25 * 86400.0


class ClockError(ValueError):
    """A move the clock refuses; the message says why (never echoes more than the number)."""


def check_advance(value: object, offset: float) -> float:
    """`value` as a move of the clock from `offset`: a finite number of seconds, not negative,
    keeping the total offset within MAX_OFFSET. ClockError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ClockError("advance_seconds must be a number of seconds")
    try:
        seconds = float(value)
    except OverflowError:  # an int too large for a float
        raise ClockError(f"advance_seconds must be at most {MAX_OFFSET:.0f}") from None
    if not math.isfinite(seconds):
        raise ClockError("advance_seconds must be a finite number")
    if seconds < 0:
        raise ClockError("the KMS clock only moves forward (advance_seconds must be at least 0)")
    if offset + seconds > MAX_OFFSET:
        raise ClockError(f"advance_seconds: the KMS clock may move at most {MAX_OFFSET:.0f} seconds ahead in total "
                         f"({max(0.0, MAX_OFFSET - offset):.0f} left)")
    return seconds


def stored_offset(text: str | None) -> float:
    """The offset saved in the store; a value an earlier version let through (NaN, infinite,
    negative or beyond MAX_OFFSET) reads as 0 so that a damaged store serves again."""
    if not text:
        return 0.0
    try:
        value = float(text)
    except ValueError:
        return 0.0
    if not math.isfinite(value) or not 0 <= value <= MAX_OFFSET:
        return 0.0
    return value


class Clock:
    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset

    def now(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: object) -> None:
        self.offset += check_advance(seconds, self.offset)
