"""CLI commands for the cluster and its daemon: up, down, reset, env and status. `up` creates
or reopens the cluster and starts the daemon (hsmsim.daemon.launch) in the foreground or
detached, then prints the banner; the other commands talk to it over control.sock."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from hsmsim.cli.common import (CliError, add_state, client_of, hsm_rows, password_ok,
                               state_of)
from hsmsim.cli.env import client_env, cmd_env, exports
from hsmsim.cli.output import add_json_flag, emit, table
from hsmsim.cluster.state import (AZ_RE, MAX_HSMS, StateDir, discard_new_cluster,
                                  prepare_new_cluster)
from hsmsim.config import environ
from hsmsim.control.client import ControlClient
from hsmsim.control.protocol import ControlError

__all__ = ["client_env", "register"]


def _azs(args: argparse.Namespace) -> list[str]:
    if args.az and args.azs is not None:
        raise CliError("use either --azs N or --az NAME, not both")
    if args.az:
        for az in args.az:
            if not AZ_RE.match(az):
                raise CliError(f"--az {az!r} is not an availability zone name like us-east-1a")
        if len(set(args.az)) != len(args.az):
            raise CliError("--az names must be distinct (use --hsms-per-az for several HSMs per AZ)")
        azs = list(args.az)
    else:
        n = 3 if args.azs is None else args.azs
        if not 1 <= n <= 6:
            raise CliError("--azs must be between 1 and 6 (us-east-1 has 6 availability zones)")
        azs = [f"us-east-1{chr(ord('a') + i)}" for i in range(n)]
    if not 1 <= args.hsms_per_az <= MAX_HSMS:
        raise CliError(f"--hsms-per-az must be between 1 and {MAX_HSMS}")
    if len(azs) * args.hsms_per_az > MAX_HSMS:
        raise CliError(f"a cluster holds at most {MAX_HSMS} HSMs")
    return azs


def _check_softhsm() -> None:
    from hsmsim.resources import softhsm_library
    override = environ().get("HSMSIM_SOFTHSM2_LIBRARY")
    if override is not None:
        if not Path(override).is_file():
            raise CliError(f"SoftHSM2 library {override} (HSMSIM_SOFTHSM2_LIBRARY) does not "
                           "exist; install the Debian package softhsm2")
        return
    try:
        softhsm_library()
    except FileNotFoundError as exc:
        raise CliError(f"{exc}; install it with `apt-get install softhsm2` (or `make deps`)") from None


def cmd_up(args: argparse.Namespace) -> int:
    env = environ()
    state = state_of(args)
    azs = _azs(args)
    admin_pw = args.admin_password or env.get("HSMSIM_ADMIN_PASSWORD")
    cu_pw = args.cu_password or env.get("HSMSIM_CU_PASSWORD")
    if admin_pw:
        password_ok(admin_pw, "the admin password")
    if cu_pw:
        password_ok(cu_pw, "the crypto_user password")
    if args.config and not Path(args.config).is_file():
        raise CliError(f"--config {args.config}: no such file")
    _check_softhsm()
    client = ControlClient(state.control_sock, timeout=5)
    if state.exists():
        state.load_spec()  # corrupt state is reported before anything starts
        if (args.az or args.azs is not None or args.hsms_per_az != 1 or args.admin_password
                or args.cu_password):
            print(f"hsmsim: note: {state.root} already holds a cluster; topology and password "
                  "flags apply only to a new cluster (use `hsmsim hsm add|remove`)",
                  file=sys.stderr)
        if client.alive():
            st = client.call("status")
            print(f"hsmsim: the daemon for {state.root} is already running "
                  f"(pid {st['daemon_pid']})", file=sys.stderr)
            _warn_stale_settings(state, args, st)
            _print_ready(state, st["cluster_id"], {**st.get("endpoints", {}),
                                                   "warnings": st["warnings"]}, None, args)
            return 0
        new = None
    else:
        try:
            new = prepare_new_cluster(state, azs, args.hsms_per_az, admin_pw, cu_pw)
        except OSError as exc:
            discard_new_cluster(state, created_root=not any(state.root.iterdir())
                                if state.root.is_dir() else False)
            raise CliError(f"cannot create the cluster in {state.root}: "
                           f"{exc.strerror or exc}") from None
    overrides = []
    if args.disable_key_availability_check:
        overrides.append("disable_key_availability_check=true")
    if args.detach:
        try:
            from hsmsim.daemon.launch import spawn_detached  # (the daemon's imports: only for up)
            info = spawn_detached(state, args.config, overrides)
        except BaseException:
            if new is not None:
                discard_new_cluster(state, new.created_root)
            raise
        _print_ready(state, info["cluster_id"], info, new, args)
        return 0
    return _run_foreground(state, args, overrides, new)


def _run_foreground(state: StateDir, args: argparse.Namespace, overrides: list[str],
                    new: Any) -> int:
    from hsmsim.daemon.launch import run_foreground

    def ready(info: dict[str, Any]) -> None:
        _print_ready(state, info["cluster_id"], info, new, args, running=True)

    code, errors = run_foreground(state, args.config, overrides, environ(), ready)
    if errors:
        if new is not None:
            discard_new_cluster(state, new.created_root)
        raise CliError(errors[0])
    return code


def _warn_stale_settings(state: StateDir, args: argparse.Namespace, st: dict[str, Any]) -> None:
    """The running daemon read its config at start: say which settings of the file (or this
    shell's HSMSIM_* environment) it does not apply, and how to apply them."""
    from hsmsim.cli.config import running_differences
    from hsmsim.config import load_file
    from hsmsim.daemon.settings import settings
    running = st.get("settings")
    if not isinstance(running, list):
        return
    path = Path(args.config) if args.config else state.config_file
    for d in running_differences(settings(load_file(path), environ()), running):
        print(f"hsmsim: warning: [{d['section']}] {d['setting']} = {d['value']!r} "
              f"({d['source']}) is not applied: the running daemon uses {d['running']!r}; "
              "run `hsmsim down && hsmsim up` to apply it", file=sys.stderr)


def _print_ready(state: StateDir, cluster_id: str, endpoints: dict[str, Any], new: Any,
                 args: argparse.Namespace, running: bool = False) -> None:
    """The banner: the cluster, what clients need, and last what to run in another shell
    (`running`: this process serves in the foreground until Ctrl-C)."""
    env = client_env(state, {k: v for k, v in endpoints.items() if isinstance(v, str)})
    warnings = list(endpoints.get("warnings") or ())
    if getattr(args, "json", False):
        out = {"cluster_id": cluster_id, "state_dir": str(state.root), "env": env,
               "module": env["HSMSIM_PKCS11_MODULE"], "pin": env["HSMSIM_PIN"],
               "kms_endpoint": env["AWS_ENDPOINT_URL_KMS"]}
        if new is not None:
            out["admin_password"] = new.admin_password
        out["warnings"] = warnings
        print(json.dumps(out, indent=2), flush=True)
        return
    spec = state.load_spec()
    for w in warnings:
        print(f"hsmsim: warning: {w}", file=sys.stderr)
    print(f"hsmsim: cluster {cluster_id} is ready with {len(spec.hsms)} HSM(s): "
          + ", ".join(f"{h.hsm_id} ({h.az})" for h in spec.hsms))
    module = env["HSMSIM_PKCS11_MODULE"]
    built = "" if Path(module).is_file() else "   (not built yet: run `make build`)"
    print(f"  PKCS#11 module : {module}{built}")
    print(f"  PIN            : {env['HSMSIM_PIN']}")
    print(f"  KMS endpoint   : {env['AWS_ENDPOINT_URL_KMS']}"
          + ("" if "kms" in endpoints else "   (not running; see warnings)"))
    if "AWS_ENDPOINT_URL_CLOUDHSM_V2" in env:
        print(f"  CloudHSMv2 API : {env['AWS_ENDPOINT_URL_CLOUDHSM_V2']}")
    if new is not None:
        print(f"  admin password : {new.admin_password}   (shown once; stored in "
              f"{state.admin_password})")
    print(exports(env))
    if running:
        print("hsmsim: running; Ctrl-C or `hsmsim down` stops the cluster")
    state_flag = "" if state.root == Path(".hsmsim").absolute() else f" --state {shlex.quote(str(state.root))}"
    print(f"# in another shell: source .venv/bin/activate && eval \"$(hsmsim env{state_flag})\"",
          flush=True)


def cmd_down(args: argparse.Namespace) -> int:
    state = state_of(args)
    client = ControlClient(state.control_sock, timeout=10)
    try:
        client.call("shutdown")
    except ControlError as exc:
        if exc.kind == "unavailable":
            from hsmsim.daemon.launch import stop_orphan_nodes
            stopped = stop_orphan_nodes(state)
            extra = f"; stopped {stopped} HSM node(s) left running" if stopped else ""
            print(f"hsmsim: no daemon is running for {state.root}{extra}", file=sys.stderr)
            return 0
        raise
    from hsmsim.daemon.launch import wait_stopped
    wait_stopped(state, 30)
    print(f"hsmsim: stopped the cluster in {state.root}")
    return 0


def cmd_reset(args: argparse.Namespace) -> int:
    """Start over: stop the daemon and its nodes, then delete the cluster's state directory
    (keys, users, KMS state, backups, logs). Asks first unless --yes."""
    import shutil
    state = state_of(args)
    if not state.root.exists():
        print(f"hsmsim: nothing to reset: {state.root} does not exist", file=sys.stderr)
        return 0
    if not (state.cluster_json.exists() or state.init_marker.exists()):
        raise CliError(f"{state.root} does not look like an hsmsim state directory (no "
                       "cluster.json); not deleting it")
    if not args.yes:
        if not sys.stdin.isatty():
            raise CliError(f"reset deletes every key and user in {state.root}; pass --yes to "
                           "confirm when not at a terminal")
        answer = input(f"Delete the cluster in {state.root}, with all its keys, users and KMS "
                       "state? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("hsmsim: reset cancelled", file=sys.stderr)
            return 1
    down = argparse.Namespace(**{**vars(args), "func": cmd_down})
    cmd_down(down)
    from hsmsim.daemon.launch import stop_orphan_nodes
    stop_orphan_nodes(state)
    shutil.rmtree(state.root)
    print(f"hsmsim: deleted the cluster in {state.root}; `hsmsim up` creates a new one")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    st = client_of(args).call("status")
    if args.json:
        emit(st, True)
        return 0
    conv = " (converging)" if st["converging"] else ""
    print(f"cluster {st['cluster_id']}  state {st['state']}{conv}  token objects "
          f"{st['objects']}  daemon pid {st['daemon_pid']}")
    kms = (st.get("endpoints") or {}).get("kms")
    print(f"KMS endpoint {kms}" if kms else "KMS endpoint: not running (see the warnings)")
    chsm = (st.get("endpoints") or {}).get("cloudhsm")
    if chsm:
        print(f"CloudHSMv2 endpoint {chsm}")
    for w in st.get("warnings") or ():
        print(f"warning: {w}")
    table(hsm_rows(st))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("up", help="create (first run) or reopen the cluster and start its daemon",
                       description="Start the cluster's daemon: on the first run it creates the "
                       "cluster (masking key, admin and crypto_user, CA certificate); later runs "
                       "reopen it with the same users and keys.")
    add_state(p)
    p.add_argument("--azs", type=int, metavar="N", help="number of availability zones (default 3)")
    p.add_argument("--az", action="append", metavar="NAME",
                   help="an availability zone (repeatable), e.g. --az us-east-1a --az us-east-1b")
    p.add_argument("--hsms-per-az", type=int, default=1, metavar="K", help="HSMs per AZ (default 1)")
    p.add_argument("--detach", action="store_true", help="return once the daemon is ready")
    p.add_argument("--config", metavar="FILE", help="config file (default: STATE/hsmsim.toml)")
    p.add_argument("--admin-password", help="password of the admin (CO) on a new cluster "
                   "(default: $HSMSIM_ADMIN_PASSWORD or generated)")
    p.add_argument("--cu-password", help="password of crypto_user on a new cluster "
                   "(default: $HSMSIM_CU_PASSWORD or generated)")
    p.add_argument("--disable-key-availability-check", action="store_true",
                   help="acknowledge token keys held by one HSM (needed for 1-HSM clusters)")
    add_json_flag(p)
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="stop the daemon and its HSM nodes")
    add_state(p)
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("reset", help="stop the cluster and delete its state (start over)",
                       description="Stops the daemon and its HSM nodes, then deletes the state "
                       "directory: every key, user, backup, log and the KMS state.")
    add_state(p)
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    p.set_defaults(func=cmd_reset)

    p = sub.add_parser("env", help="print export lines for PKCS#11 and KMS clients",
                       description="Use as: eval \"$(hsmsim env)\"")
    add_state(p)
    add_json_flag(p)
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("status", help="cluster state and each HSM's state, keys and sync lag")
    add_state(p)
    add_json_flag(p)
    p.set_defaults(func=cmd_status)
