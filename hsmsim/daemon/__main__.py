"""`python -m hsmsim.daemon --state DIR [--config FILE] [--ready-fd N] [--set KEY=VALUE]`: the
detached daemon process that `hsmsim up --detach` starts. It reports readiness (or the reason
it could not start) as one JSON line on --ready-fd."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from hsmsim import aio
from hsmsim.config import environ
from hsmsim.daemon.launch import EXTRA_SERVICES
from hsmsim.daemon.main import DaemonOptions, serve, setup_logging
from hsmsim.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hsmsim.daemon")
    p.add_argument("--state", required=True)
    p.add_argument("--config")
    p.add_argument("--ready-fd", type=int)
    p.add_argument("--log-file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a [cluster] setting, e.g. disable_key_availability_check=true")
    args = p.parse_args(argv)
    overrides = []
    for item in args.set:
        k, _, v = item.partition("=")
        overrides.append((k, v))
    state = Path(args.state).absolute()
    setup_logging(Path(args.log_file) if args.log_file else None)
    ready_fd = args.ready_fd

    def report(obj: dict[str, object]) -> None:
        nonlocal ready_fd
        if ready_fd is None:
            return
        try:
            os.write(ready_fd, (json.dumps(obj) + "\n").encode())
            os.close(ready_fd)
        except OSError:
            pass
        ready_fd = None

    opts = DaemonOptions(state, Path(args.config).absolute() if args.config else None,
                         tuple(overrides), extra_services=EXTRA_SERVICES)
    try:
        return aio.run(serve(opts, environ(),
                             lambda info: report({"ok": True, **info}),
                             lambda err: report({"ok": False, "error": err})))
    except ConfigError as exc:  # e.g. a bad HSMSIM_EVENT_LOOP
        report({"ok": False, "error": str(exc)})
        return 2


if __name__ == "__main__":
    sys.exit(main())
