"""CLI commands for the cluster's HSMs and backups: `hsm` (list, add, remove, faults) and
`backup` (create, list, restore)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

from hsmsim.cli.common import CliError, add_state, client_of, hsm_rows, resolve_hsm
from hsmsim.cli.output import Progress, add_json_flag, emit
from hsmsim.cluster.state import AZ_RE

_HSM_HELP = "an HSM id (hsm-...) or its availability zone (us-east-1a)"


def cmd_hsm(args: argparse.Namespace) -> int:
    client = client_of(args, timeout=3600)
    op = args.hsm_cmd
    if op == "list":
        st = client.call("status")
        emit(st["hsms"], args.json, rows=hsm_rows(st))
        return 0
    if getattr(args, "hsm_id", None) is not None:
        args.hsm_id = resolve_hsm(client.call("status")["hsms"], args.hsm_id)
    if op == "add":
        if not AZ_RE.match(args.az):
            raise CliError(f"--az {args.az!r} is not an availability zone name like us-east-1a")
        with Progress(1, f"adding an HSM in {args.az}") as bar:
            r = client.call("hsm.add", progress=bar.report, az=args.az)
    elif op == "latency":
        if args.ms < 0:
            raise CliError("--ms must be 0 or more")
        r = client.call("hsm.latency", hsm_id=args.hsm_id, ms=args.ms)
    elif op == "throttle":
        if args.rps < 0:
            raise CliError("--rps must be 0 (off) or more")
        r = client.call("hsm.throttle", hsm_id=args.hsm_id, rps=args.rps)
    else:
        r = client.call(f"hsm.{op}", hsm_id=args.hsm_id)
    emit(r if args.json else [r], args.json)
    return 0


# -- backups -------------------------------------------------------------------------------------

def cmd_backup(args: argparse.Namespace) -> int:
    client = client_of(args, timeout=3600)
    if args.backup_cmd == "list":
        rows = client.call("backup.list")
        emit(rows, args.json, columns=["backup_id", "state", "created", "objects", "users",
                                       "reason"])
        return 0
    with Progress(1, args.backup_cmd) as bar:
        if args.backup_cmd == "create":
            r = client.call("backup.create", progress=bar.report)
        else:
            target = Path(args.target).absolute()
            r = client.call("backup.restore", progress=bar.report, backup_id=args.backup_id,
                            target=str(target))
    if args.json:
        emit(r, True)
    elif args.backup_cmd == "create":
        print(f"backup {r['backup_id']}: {r['objects']} objects, {r['users']} users")
    else:
        print(f"restored {args.backup_id} into {r['state_dir']} as cluster {r['cluster_id']}; "
              f"start it with `hsmsim up --state {shlex.quote(r['state_dir'])}`")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("hsm", help="add or remove HSMs; inject faults")
    hs = p.add_subparsers(dest="hsm_cmd", metavar="ACTION", required=True)
    hs.add_parser("list", help="the cluster's HSMs: id, AZ, state, faults, keys")
    q = hs.add_parser("add", help="clone a new HSM into the cluster")
    q.add_argument("--az", required=True, help="availability zone, e.g. us-east-1d")
    for name, helptext in (("remove", "delete an HSM"), ("kill", "SIGKILL an HSM's node process"),
                           ("start", "start an HSM that was killed"),
                           ("pause", "freeze an HSM (SIGSTOP)"), ("resume", "unfreeze an HSM"),
                           ("partition", "cut the daemon off from an HSM"),
                           ("heal", "end a partition")):
        q = hs.add_parser(name, help=helptext)
        q.add_argument("hsm_id", metavar="HSM", help=_HSM_HELP)
    q = hs.add_parser("latency", help="add latency to every request of an HSM")
    q.add_argument("hsm_id", metavar="HSM", help=_HSM_HELP)
    q.add_argument("--ms", type=int, required=True, help="milliseconds (0 = off)")
    q = hs.add_parser("throttle", help="limit an HSM's request rate (CloudHSM busy errors)")
    q.add_argument("hsm_id", metavar="HSM", help=_HSM_HELP)
    q.add_argument("--rps", type=int, required=True, help="requests per second (0 = off)")
    for q in hs.choices.values():
        add_state(q)
        add_json_flag(q)
    p.set_defaults(func=cmd_hsm)

    p = sub.add_parser("backup", help="create, list and restore cluster backups")
    bs = p.add_subparsers(dest="backup_cmd", metavar="ACTION", required=True)
    bs.add_parser("create", help="take a consistent backup now")
    bs.add_parser("list", help="list backups")
    q = bs.add_parser("restore", help="restore a backup into a new cluster directory")
    q.add_argument("backup_id", metavar="BACKUP_ID")
    q.add_argument("--target", required=True, metavar="DIR", help="new state directory")
    for q in bs.choices.values():
        add_state(q)
        add_json_flag(q)
    p.set_defaults(func=cmd_backup)
