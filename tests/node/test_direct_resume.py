"""The node's direct listener runs a call at once in the loop pass that read it and continues it
as a task only when it must wait (node/direct.py `_rest`): results, exceptions and cancellation
must reach the call exactly as they would had it run in a task from the start."""

from __future__ import annotations

import asyncio
from typing import Any

from hsmsim.node.direct import _rest


def _start(coro: Any) -> asyncio.Task[None] | None:
    """What _DirectConnection._request does: one step now, a task only if the call waits."""
    try:
        first = coro.send(None)
    except StopIteration:
        return None
    return asyncio.get_running_loop().create_task(_rest(coro, first))


def test_a_call_that_does_not_wait_finishes_in_the_same_step() -> None:
    seen: list[str] = []

    async def call() -> None:
        seen.append("ran")

    async def main() -> None:
        assert _start(call()) is None
        assert seen == ["ran"]

    asyncio.run(main())


def test_a_call_that_waits_gets_its_results_and_exceptions_in_the_task() -> None:
    seen: list[object] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        f1: asyncio.Future[int] = loop.create_future()
        f2: asyncio.Future[int] = loop.create_future()

        async def call() -> None:
            seen.append(await f1)
            await asyncio.sleep(0)  # a bare yield to the loop
            try:
                await f2
            except KeyError as exc:
                seen.append(f"caught {exc.args[0]}")

        task = _start(call())
        assert task is not None and seen == []
        f1.set_result(7)
        loop.call_later(0.01, f2.set_exception, KeyError("k"))
        await task
        assert seen == [7, "caught k"]

    asyncio.run(main())


def test_cancelling_the_task_cancels_the_call_where_it_waits() -> None:
    seen: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        never: asyncio.Future[None] = loop.create_future()

        async def call() -> None:
            try:
                await never
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise
            finally:
                seen.append("finally")

        task = _start(call())
        assert task is not None
        await asyncio.sleep(0)
        task.cancel()  # what connection_lost does to a call still waiting
        try:
            await task
        except asyncio.CancelledError:
            pass
        assert task.cancelled()
        assert seen == ["cancelled", "finally"]

    asyncio.run(main())
