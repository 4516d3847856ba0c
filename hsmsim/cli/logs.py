"""`hsmsim logs`: the daemon's log, or one HSM's node log, read from the state directory (no
daemon needed), optionally followed as it grows (`-f`)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from hsmsim.cluster.state import StateDir
from hsmsim.config import environ, state_dir
from hsmsim.errors import HsmsimError

FOLLOW_POLL_S = 0.2


class LogsError(HsmsimError):
    """No log file yet."""


def log_path(state: StateDir, hsm: str | None, az: str | None) -> Path:
    """daemon.log, or nodes/<hsm>/node.log of the HSM named by id or AZ."""
    if hsm is None and az is None:
        return state.log_file
    from hsmsim.cli.common import resolve_hsm
    hsms = [{"hsm_id": h.hsm_id, "az": h.az} for h in state.load_spec().hsms]
    return state.node_dir(resolve_hsm(hsms, hsm or az or "")) / "node.log"


def _run(args: argparse.Namespace) -> int:
    state = StateDir(state_dir(args.state, environ()))
    path = log_path(state, args.hsm, args.az)
    if not path.exists():
        raise LogsError(f"{path} does not exist yet (has the cluster been started?)")
    out = sys.stdout.buffer
    with path.open("rb") as f:
        lines = f.readlines()
        out.writelines(lines[-args.lines:] if args.lines else lines)
        out.flush()
        while args.follow:
            chunk = f.read()
            if chunk:
                out.write(chunk)
                out.flush()
            else:
                time.sleep(FOLLOW_POLL_S)
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("logs", help="show the daemon's or one HSM's log (-f to follow)",
                       description="Prints daemon.log, or with --hsm/--az the node log of one "
                       "HSM, from the state directory; works when no daemon runs.")
    p.add_argument("--state", metavar="DIR",
                   help="the cluster's state directory (default: $HSMSIM_HOME or ./.hsmsim)")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--hsm", metavar="HSM_ID", help="one HSM's node log")
    who.add_argument("--az", metavar="AZ", help="the node log of the HSM in this AZ")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing as the log grows")
    p.add_argument("-n", "--lines", type=int, default=0, metavar="N",
                   help="only the last N lines (default: all)")
    p.set_defaults(func=_run)
