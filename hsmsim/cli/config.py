"""`hsmsim config`: every setting of every section with the value the running daemon uses (or,
with no daemon, the value the next `hsmsim up` would use) and where it came from (default,
config file or HSMSIM_* environment), as a table or JSON. A setting whose file value differs
from the running one is flagged: the daemon reads its file only at start."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from hsmsim.cli.output import add_json_flag, emit
from hsmsim.config import CONFIG_FILE, environ, load_file, set_in_file, state_dir
from hsmsim.errors import ConfigError
from hsmsim.control.client import ControlClient
from hsmsim.control.protocol import ControlError
from hsmsim.daemon.settings import SECTION_CLASSES as SECTIONS
from hsmsim.daemon.settings import settings

__all__ = ["SECTIONS", "settings", "running_differences"]


def running_settings(control_sock: Path) -> list[dict[str, Any]] | None:
    """The rows the running daemon resolved at its start, or None when no daemon runs."""
    try:
        st = ControlClient(control_sock, timeout=3).call("status")
    except ControlError:
        return None
    rows = st.get("settings")
    return rows if isinstance(rows, list) else None


def running_differences(now: list[dict[str, Any]],
                        running: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of `now` (file + this environment) whose value differs from the running daemon's,
    each with `running` set to the daemon's value."""
    run = {(r["section"], r["setting"]): r["value"] for r in running}
    return [{**r, "running": run[(r["section"], r["setting"])]} for r in now
            if (r["section"], r["setting"]) in run and run[(r["section"], r["setting"])] != r["value"]]


def _run(args: argparse.Namespace) -> int:
    env = environ()
    root = state_dir(args.state, env)
    path = Path(args.config) if args.config else root / CONFIG_FILE
    rows = settings(load_file(path), env)
    running = running_settings(root / "control.sock")
    if running is not None:
        stale = {(d["section"], d["setting"]): d for d in running_differences(rows, running)}
        by_key = {(r["section"], r["setting"]): r for r in running}
        for r in rows:
            key = (r["section"], r["setting"])
            r["file_value"] = r["value"]
            r["value"] = by_key[key]["value"] if key in by_key else r["value"]
            r["note"] = (f"{path.name}/environment now say {stale[key]['value']!r}: not "
                         "applied until `hsmsim down && hsmsim up`") if key in stale else ""
    emit(rows, args.json, columns=("section", "setting", "value", "source", "env")
         + (("note",) if running is not None else ()))
    return 0


def _set(args: argparse.Namespace) -> int:
    env = environ()
    root = state_dir(args.state, env)
    path = Path(args.config) if args.config else root / CONFIG_FILE
    section, _, name = args.name.partition(".")
    classes = dict(SECTIONS)
    if section not in classes or not name:
        raise ConfigError(f"{args.name!r} is not SECTION.NAME with a section among "
                          f"{', '.join(classes)} (e.g. gateway.quirk_ro_session_fails)")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    value = set_in_file(path, classes[section], section, name, args.value)
    print(f"hsmsim: [{section}] {name} = {value!r} in {path}")
    env_name = f"HSMSIM_{section}_{name}".upper()
    if env_name in env:
        print(f"hsmsim: note: {env_name} in this environment overrides the file", file=sys.stderr)
    if running_settings(root / "control.sock") is not None:
        print("hsmsim: note: the running daemon applies it after `hsmsim down && hsmsim up`",
              file=sys.stderr)
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("config", help="show every setting, its value and where it came from",
                       description="Settings are resolved from built-in defaults, then the config "
                       "file (STATE/hsmsim.toml or --config), then HSMSIM_<SECTION>_<NAME> "
                       "environment variables, then command-line flags. With a daemon running, "
                       "`value` is what it runs with, and settings edited since its start are "
                       "flagged.")
    p.add_argument("--state", metavar="DIR",
                   help="the cluster's state directory (default: $HSMSIM_HOME or ./.hsmsim)")
    p.add_argument("--config", metavar="FILE", help="config file (default: STATE/hsmsim.toml)")
    add_json_flag(p)
    p.set_defaults(func=_run)
    cs = p.add_subparsers(dest="config_cmd", metavar="ACTION")
    q = cs.add_parser("set", help="write one setting into the config file (comments are kept)",
                      description="Sets SECTION.NAME = VALUE in STATE/hsmsim.toml (or --config), "
                      "checked as the daemon checks it; the daemon reads it at its next start.")
    q.add_argument("name", metavar="SECTION.NAME", help="e.g. gateway.quirk_ro_session_fails")
    q.add_argument("value", metavar="VALUE", help="e.g. false, 4599, a,b for a list")
    q.add_argument("--state", metavar="DIR", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    q.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    q.set_defaults(func=_set)
