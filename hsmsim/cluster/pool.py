"""The cluster's members as one pool of node connections: node calls with a deadline (a silent
node is marked down, a busy one is not), the health filters routing starts from, the
round-robin, per-member locks and the daemon's background tasks."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

from hsmsim.cluster.config import ClusterConfig
from hsmsim.cluster.members import Member
from hsmsim.node.client import NodeBusy, NodeUnavailable
from hsmsim.pkcs11.constants import RV

log = logging.getLogger("hsmsim.cluster")
T = TypeVar("T")


class Pool:
    """The members (HSM id -> Member; the supervisor adds and removes them) and the rules for
    calling them. `config` may be replaced at run time (tests do); every part reads it here."""

    def __init__(self, members: dict[str, Member], config: ClusterConfig) -> None:
        self.members = members
        self.config = config
        self._rr = itertools.count()
        self._bg: set[asyncio.Task[Any]] = set()
        self._member_locks: dict[str, asyncio.Lock] = {}

    # -- tasks and locks -------------------------------------------------------------------------
    def spawn_bg(self, coro: Awaitable[Any], name: str = "") -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._bg.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._bg.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.warning("background %s failed: %s", name or "task", t.exception())
        task.add_done_callback(done)
        return task

    async def cancel_bg(self) -> None:
        for t in list(self._bg):
            t.cancel()
        await asyncio.gather(*self._bg, return_exceptions=True)

    def lock_for(self, hsm_id: str) -> asyncio.Lock:
        return self._member_locks.setdefault(hsm_id, asyncio.Lock())

    @staticmethod
    async def quiet(aw: Awaitable[Any]) -> None:
        try:
            await aw
        except Exception:
            pass

    # -- node calls ------------------------------------------------------------------------------
    async def timed(self, member: Member, aw: Awaitable[T], timeout: float | None = None) -> T:
        """Await a node call; a member that does not answer in time is marked down."""
        member.inflight += 1
        # injected latency is expected, not a failure
        limit = (timeout or self.config.request_timeout_s) + member.latency_ms / 1000.0
        try:
            # asyncio.timeout, not wait_for: wait_for wraps the call in a new task (a task and two
            # extra loop passes per node request)
            async with asyncio.timeout(limit):
                return await aw
        except asyncio.TimeoutError:
            raise self._timed_out(member, limit) from None
        finally:
            member.inflight -= 1

    def liveness_window(self) -> float:
        """How recently a node must have answered something to count as alive (two health
        checks' worth)."""
        return max(2.0, self.config.health_interval_s * 4)

    def _timed_out(self, member: Member, limit: float) -> Exception:
        """The error for a request that got no answer within `limit`. A node that keeps
        answering (health checks, other requests) is busy with slow expected work, not dead:
        NodeBusy (retried like a throttled request), and nothing is marked down. Only a silent
        node is marked down, so load alone never takes every HSM out of the cluster.
        FIDELITY: how CloudHSM's client tells a busy HSM from a failed one is not documented."""
        if member.answering(self.liveness_window()):
            return NodeBusy(RV.FUNCTION_FAILED, f"{member.hsm_id} is busy: no answer within "
                            f"{limit:.1f}s")
        member.mark_down(f"no answer within {limit:.1f}s")
        return NodeUnavailable(f"{member.hsm_id} did not answer in time")

    # -- health filters --------------------------------------------------------------------------
    def usable(self) -> list[Member]:
        return [m for m in self.members.values() if m.usable]

    def routable(self) -> list[Member]:
        return [m for m in self.members.values() if m.routable]

    def rotate(self, members: list[Member]) -> list[Member]:
        if not members:
            return members
        k = next(self._rr) % len(members)
        return members[k:] + members[:k]

    def backoff(self, attempt: int) -> float:
        return float(self.config.retry_base_ms) / 1000.0 * float(2 ** max(0, attempt - 1))

    @property
    def check_availability(self) -> bool:
        return not self.config.disable_key_availability_check
