"""Suite-wide guard: no child process a test starts can read from the terminal.

A test that runs under a terminal (a developer's shell, ``script``, tmux) must behave as it does
in CI, which has none. Programs such as libp11 open ``/dev/tty`` to prompt for a PIN when one is
missing, and then wait forever. So every child started through :mod:`subprocess` (directly, via
asyncio, or from hsmsim's own test fixtures) gets, unless the caller chose otherwise, stdin from
``/dev/null`` and a new session, which has no controlling terminal.
"""

from __future__ import annotations

import subprocess
from typing import Any

_original_init = subprocess.Popen.__init__


def _init_without_terminal(self: subprocess.Popen[Any], args: Any, *rest: Any, **kwargs: Any) -> None:
    if not rest:  # positional bufsize/executable/stdin... are never used in this code base
        if kwargs.get("stdin") is None and "input" not in kwargs:
            kwargs["stdin"] = subprocess.DEVNULL
        if "preexec_fn" not in kwargs and "process_group" not in kwargs:
            kwargs.setdefault("start_new_session", True)
    _original_init(self, args, *rest, **kwargs)


def pytest_configure() -> None:
    subprocess.Popen.__init__ = _init_without_terminal  # type: ignore[method-assign]


def pytest_unconfigure() -> None:
    subprocess.Popen.__init__ = _original_init  # type: ignore[method-assign]
