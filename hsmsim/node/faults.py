"""Fault injection of one node: added latency, request-rate throttling (token bucket) and
pause (requests wait until resumed). Driven by the cluster principal's `set_fault`."""

from __future__ import annotations

import asyncio
import time
from typing import Any


class Faults:
    def __init__(self) -> None:
        self.latency_ms = 0.0
        self.throttle_rps = 0.0
        self._tokens = 0.0
        self._stamp = time.monotonic()
        self._running = asyncio.Event()
        self._running.set()
        # Cut off from the daemon and from the applications' direct connections (the node's
        # direct listener closes them); ends when the daemon authenticates again (heal).
        self.partitioned = False
        # counters, read by tests and the bench: requests delayed by injected latency, and
        # requests refused by the throttle
        self.delayed = 0
        self.throttled = 0

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def settings(self) -> dict[str, Any]:
        return {"latency_ms": self.latency_ms, "throttle_rps": self.throttle_rps,
                "paused": self.paused}

    def set(self, latency_ms: float | None, throttle_rps: float | None,
            paused: bool | None, partitioned: bool | None = None) -> dict[str, Any]:
        if partitioned is not None:
            self.partitioned = partitioned
        if latency_ms is not None:
            self.latency_ms = latency_ms
        if throttle_rps is not None:
            self.throttle_rps = throttle_rps
            self._tokens = max(1.0, throttle_rps)  # burst of one second
            self._stamp = time.monotonic()
        if paused is True:
            self._running.clear()
        elif paused is False:
            self._running.set()
        return self.settings()

    async def gate(self) -> None:
        """Wait while paused, then apply the added latency."""
        if not self._running.is_set():
            await self._running.wait()
        if self.latency_ms > 0:
            self.delayed += 1
            await asyncio.sleep(self.latency_ms / 1000)

    def admit(self) -> bool:
        """False when the request is over the throttle rate (it must be rejected).
        FIDELITY: a real HSM throttles on its internal load; here a token bucket of
        `throttle_rps` (burst: one second's worth) stands for it."""
        if self.throttle_rps <= 0:
            return True
        now = time.monotonic()
        cap = max(1.0, self.throttle_rps)
        self._tokens = min(cap, self._tokens + (now - self._stamp) * self.throttle_rps)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        self.throttled += 1
        return False
