"""What the CLI's cluster commands share: the error they report, the state directory and
control client a command works on, password and HSM-name checks, and the HSM rows of
`status` and `hsm list`."""

from __future__ import annotations

import argparse
from typing import Any

from hsmsim.cluster.state import StateDir
from hsmsim.config import environ, state_dir
from hsmsim.control.client import ControlClient
from hsmsim.errors import HsmsimError


class CliError(HsmsimError):
    """A bad flag value or an impossible request, reported as one message (exit 1)."""


def state_of(args: argparse.Namespace) -> StateDir:
    return StateDir(state_dir(getattr(args, "state", None), environ()))


def client_of(args: argparse.Namespace, timeout: float = 300.0) -> ControlClient:
    return ControlClient(state_of(args).control_sock, timeout=timeout)


def add_state(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", metavar="DIR",
                   help="the cluster's state directory (default: $HSMSIM_HOME or ./.hsmsim)")


def password_ok(pw: str, what: str) -> str:
    if not 8 <= len(pw) <= 32:
        raise CliError(f"{what} must be 8 to 32 characters (CloudHSM's password rule)")
    return pw


def faults(h: dict[str, Any]) -> str:
    """The faults injected into one HSM, as `hsmsim hsm` would set them."""
    out = [h["condition"]] if h["condition"] in ("paused", "partitioned", "killed") else []
    if h.get("latency_ms"):
        out.append(f"latency {h['latency_ms']} ms")
    if h.get("throttle_rps"):
        out.append(f"throttle {h['throttle_rps']} rps")
    return ", ".join(out) or "-"


def hsm_rows(st: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"hsm": h["hsm_id"], "az": h["az"], "state": h["state"],
             "condition": h["condition"], "faults": faults(h), "keys": h["keys"],
             "sync_lag": h["sync_lag"], "pid": h["pid"], "last_error": h["last_error"]}
            for h in st["hsms"]]


def resolve_hsm(hsms: list[dict[str, Any]], ref: str) -> str:
    """An HSM named by its id or by its availability zone (`us-east-1a`), as people name them.
    An AZ that holds several HSMs is ambiguous and the error lists their ids."""
    if any(h["hsm_id"] == ref for h in hsms):
        return ref
    in_az = [h["hsm_id"] for h in hsms if h["az"] == ref]
    if len(in_az) == 1:
        return str(in_az[0])
    if in_az:
        raise CliError(f"{ref} holds {len(in_az)} HSMs ({', '.join(in_az)}): name one by its id")
    known = ", ".join(f"{h['hsm_id']} ({h['az']})" for h in hsms)
    raise CliError(f"no HSM {ref!r} in this cluster; it has {known}")
