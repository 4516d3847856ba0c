"""The event-loop choice for the daemon and the nodes (hsmsim.aio)."""

from __future__ import annotations

import asyncio

import pytest

from hsmsim import aio
from hsmsim.errors import ConfigError


def test_default_is_uvloop_when_installed() -> None:
    uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed on this platform")
    assert aio.loop_factory({}) is uvloop.new_event_loop
    assert aio.loop_factory({aio.ENV: "UVLOOP"}) is uvloop.new_event_loop


def test_asyncio_opts_out() -> None:
    assert aio.loop_factory({aio.ENV: "asyncio"}) is None


def test_unknown_choice_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="HSMSIM_EVENT_LOOP must be one of uvloop, asyncio, got 'tokio'"):
        aio.loop_factory({aio.ENV: "tokio"})


def test_run_returns_the_coroutine_result(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> str:
        await asyncio.sleep(0)
        return type(asyncio.get_running_loop()).__module__

    monkeypatch.setenv(aio.ENV, "asyncio")
    assert aio.run(main()).startswith("asyncio")
    monkeypatch.delenv(aio.ENV)
    if aio.loop_factory() is not None:
        assert aio.run(main()).startswith("uvloop")


def test_a_bad_choice_closes_the_coroutine_unstarted(monkeypatch: pytest.MonkeyPatch) -> None:
    """No "coroutine was never awaited" warning when the daemon cannot start its loop."""
    started = []

    async def main() -> None:
        started.append(True)

    monkeypatch.setenv(aio.ENV, "tokio")
    coro = main()
    with pytest.raises(ConfigError):
        aio.run(coro)
    assert coro.cr_frame is None, "the coroutine was left open"
    assert started == []
