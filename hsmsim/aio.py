"""Runs the daemon's and the nodes' event loops: uvloop when it is installed (a dependency on
Linux), the standard asyncio loop otherwise or when `HSMSIM_EVENT_LOOP=asyncio` asks for it.

uvloop cuts the per-message cost of every hop (module to gateway, daemon to node) by about a
fifth; nothing in hsmsim depends on which loop runs."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from hsmsim.errors import ConfigError

T = TypeVar("T")

ENV = "HSMSIM_EVENT_LOOP"
CHOICES = ("uvloop", "asyncio")


def loop_factory(environ: dict[str, str] | None = None) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory for the configured loop; None means the standard asyncio loop.
    Raises ConfigError for an unknown choice, and when uvloop is asked for but missing."""
    env = os.environ if environ is None else environ
    choice = env.get(ENV, "").strip().lower()
    if choice not in ("", *CHOICES):
        raise ConfigError(f"{ENV} must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError(f"{ENV}=uvloop but uvloop is not installed") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run on the configured event loop."""
    try:
        factory = loop_factory()
    except ConfigError:
        main.close()  # never started: no "coroutine was never awaited" warning
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
