"""`hsmsim audit`: the HSMs' audit logs (through the daemon, or from disk when none runs) or
the KMS audit trail, once or followed."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from hsmsim.cli.common import add_state, client_of, resolve_hsm, state_of
from hsmsim.cli.output import add_json_flag
from hsmsim.cluster.state import StateDir
from hsmsim.control.client import ControlClient


def cmd_audit(args: argparse.Namespace) -> int:
    try:
        return _audit(args)
    except BrokenPipeError:  # `hsmsim audit | head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0


def _audit(args: argparse.Namespace) -> int:
    if args.kms:
        path = state_of(args).kms / "audit.jsonl"
        since = 0
        while True:
            lines: list[str] = []
            if path.exists():
                lines = path.read_text().splitlines()
            for line in lines[since:]:
                print(line if args.json else _fmt_kms(line), flush=True)
            since = len(lines)
            if not args.follow:
                return 0
            time.sleep(0.5)
    client = client_of(args)
    read = _audit_reader(client, state_of(args), args.hsm)
    marks: dict[str, int] = {}
    while True:
        recs = read(marks)
        for r in recs:
            marks[r["hsm_id"]] = max(marks.get(r["hsm_id"], 0), int(r["seq"]) + 1)
            if args.json:
                print(json.dumps(r, sort_keys=True), flush=True)
            else:
                t = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(r["time_us"] / 1e6))
                extra = " ".join(f"{k}={v}" for k, v in r.items()
                                 if k not in ("hsm_id", "seq", "time_us", "event"))
                print(f"{t} {r['hsm_id']} #{r['seq']} {r['event']} {extra}".rstrip(), flush=True)
        if not args.follow:
            return 0
        time.sleep(0.5)


def _audit_reader(client: ControlClient, state: StateDir,
                  only: str | None) -> Callable[[dict[str, int]], list[dict[str, Any]]]:
    """Reads audit records through the daemon, or, when no daemon runs, from each HSM's
    audit.jsonl in the state directory (read-only: a node repairs its log itself). `only` names
    one HSM by id or AZ."""
    if only is not None:
        only = resolve_hsm([{"hsm_id": h.hsm_id, "az": h.az} for h in state.load_spec().hsms], only)
    if client.alive():
        def through_daemon(marks: dict[str, int]) -> list[dict[str, Any]]:
            kw: dict[str, Any] = {"since": marks}
            if only:
                kw["hsm_id"] = only
            return list(client.call("audit.read", **kw))
        return through_daemon
    from hsmsim.node.audit import read_file
    hsms = [h.hsm_id for h in state.load_spec().hsms]
    print(f"hsmsim: no daemon is running for {state.root}: reading the HSMs' audit logs from "
          "disk", file=sys.stderr)

    def from_disk(marks: dict[str, int]) -> list[dict[str, Any]]:
        out = []
        for hid in ([only] if only else hsms):
            path = state.node_dir(hid) / "audit.jsonl"
            if path.exists():
                out += [{"hsm_id": hid, "seq": r.seq, "time_us": r.time_us, "event": r.event,
                         **r.fields} for r in read_file(path, marks.get(hid, 0), 100_000)]
        out.sort(key=lambda r: (r["time_us"], r["hsm_id"], r["seq"]))
        return out
    return from_disk


def _fmt_kms(line: str) -> str:
    try:
        r = json.loads(line)
    except ValueError:
        return line
    return " ".join(f"{k}={v}" for k, v in r.items()) if isinstance(r, dict) else line


def register(sub: Any) -> None:
    p = sub.add_parser("audit", help="per-HSM audit logs (or the KMS audit trail)")
    add_state(p)
    p.add_argument("--hsm", metavar="HSM", help="only this HSM (id or AZ)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new records")
    p.add_argument("--kms", action="store_true", help="show the KMS audit trail instead")
    add_json_flag(p)
    p.set_defaults(func=cmd_audit)
