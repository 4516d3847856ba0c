"""CLI commands for the cluster and its daemon: up, down, status, env, hsm, backup, user, key,
audit. Each parses flags, talks to the daemon over control.sock, and prints a table or JSON."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hsmsim import aio
from hsmsim.cli.output import Progress, add_json_flag, emit, table
from hsmsim.cluster.state import (AZ_RE, MAX_HSMS, StateDir, StateError, discard_new_cluster,
                                  prepare_new_cluster)
from hsmsim.config import environ, state_dir
from hsmsim.control.client import ControlClient
from hsmsim.control.protocol import ControlError
from hsmsim.errors import ConfigError, HsmsimError

DEFAULT_AZS = ("us-east-1a", "us-east-1b", "us-east-1c")
READY_TIMEOUT = 60.0
USERNAME_RE = re.compile(r"^[a-zA-Z0-9_]{1,31}$")


class CliError(HsmsimError):
    """A bad flag value or an impossible request, reported as one message (exit 1)."""


def _state(args: argparse.Namespace) -> StateDir:
    return StateDir(state_dir(getattr(args, "state", None), environ()))


def _client(args: argparse.Namespace, timeout: float = 300.0) -> ControlClient:
    return ControlClient(_state(args).control_sock, timeout=timeout)


def _add_state(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", metavar="DIR",
                   help="the cluster's state directory (default: $HSMSIM_HOME or ./.hsmsim)")


def _password_ok(pw: str, what: str) -> str:
    if not 8 <= len(pw) <= 32:
        raise CliError(f"{what} must be 8 to 32 characters (CloudHSM's password rule)")
    return pw


# -- environment for clients -------------------------------------------------------------------

def client_env(state: StateDir, endpoints: dict[str, str] | None = None,
               base: dict[str, str] | None = None) -> dict[str, str]:
    """The variables a client needs (what `hsmsim env` prints)."""
    from hsmsim.resources import pkcs11_module
    base = environ() if base is None else base
    try:
        module = str(pkcs11_module())
    except FileNotFoundError:
        module = str(Path(__file__).resolve().parents[1] / "_lib" / "libhsmsim-pkcs11.so")
    pw = state.read_secret(state.cu_password)
    kms = (endpoints or {}).get("kms") or _kms_endpoint(state)
    env = {
        "HSMSIM_HOME": str(state.root),
        "HSMSIM_SOCKET": str(state.gateway_sock),
        "HSMSIM_PKCS11_MODULE": module,
        "HSMSIM_PIN": f"crypto_user:{pw}",
        "AWS_ENDPOINT_URL_KMS": kms,
    }
    # the CloudHSMv2 control plane's endpoint (docs/cloudhsmv2.md), known while the daemon runs
    chsm = (endpoints or {}).get("cloudhsm")
    if chsm:
        env["AWS_ENDPOINT_URL_CLOUDHSM_V2"] = chsm
    sunpkcs11 = _sunpkcs11_config(state, module)
    if sunpkcs11 is not None:
        env["HSMSIM_SUNPKCS11_CONFIG"] = str(sunpkcs11)
    for var, path in _tool_files(state, module):
        env[var] = str(path)
    for k, v in (("AWS_ACCESS_KEY_ID", "hsmsimAKIAEXAMPLE"),
                 ("AWS_SECRET_ACCESS_KEY", "hsmsim-secret-not-checked"),
                 ("AWS_DEFAULT_REGION", _kms_region(state))):
        if not base.get(k):
            env[k] = v
    return env


# Java's SunPKCS11 (JDK 17: no `tokenLabel`, so the slot by index). CloudHSM's usage attributes
# default to false, so generated keys get the ones their type can use; secret and private keys
# must be CKA_PRIVATE. The module reads HSMSIM_SOCKET from the JVM's environment.
_SUNPKCS11 = """name = hsmsim
library = {module}
slotListIndex = 0
attributes(generate, CKO_PRIVATE_KEY, *) = {{
  CKA_PRIVATE = true
  CKA_SIGN = true
}}
attributes(generate, CKO_PRIVATE_KEY, CKK_RSA) = {{
  CKA_DECRYPT = true
}}
attributes(generate, CKO_PUBLIC_KEY, *) = {{
  CKA_VERIFY = true
}}
attributes(generate, CKO_PUBLIC_KEY, CKK_RSA) = {{
  CKA_ENCRYPT = true
}}
attributes(generate, CKO_SECRET_KEY, *) = {{
  CKA_PRIVATE = true
  CKA_ENCRYPT = true
  CKA_DECRYPT = true
}}
"""


def _sunpkcs11_config(state: StateDir, module: str) -> Path | None:
    """STATE/sunpkcs11.cfg for `Security.getProvider("SunPKCS11").configure(path)` and keytool's
    `-providerArg`; None if the state directory cannot be written."""
    path = state.root / "sunpkcs11.cfg"
    text = _SUNPKCS11.format(module=module)
    try:
        if not path.is_file() or path.read_text() != text:
            from hsmsim import files
            files.write_private(path, text)  # 0600 whatever the umask
    except OSError:
        return None
    return path


# p11-kit loads a module named by a `.module` file in ~/.config/pkcs11/modules/ (for root:
# /etc/pkcs11/modules/); link this one there. OpenSSH reads a PIN only from a terminal or an
# SSH_ASKPASS program: this one prints $HSMSIM_PIN from its caller's environment, so no secret is
# written to disk. Set SSH_ASKPASS to it per command, never for the whole shell (every ssh
# prompt would be answered with the HSM's PIN).
_TOOL_FILES = (
    ("HSMSIM_P11KIT_MODULE_FILE", "hsmsim.module", 0o644, "module: {module}\n"),
    ("HSMSIM_SSH_ASKPASS", "ssh-askpass", 0o700,
     "#!/bin/sh\n# SSH_ASKPASS for a PKCS#11 PIN prompt: the caller's $HSMSIM_PIN.\n"
     "printf '%s\\n' \"$HSMSIM_PIN\"\n"),
)


def _tool_files(state: StateDir, module: str) -> list[tuple[str, Path]]:
    """STATE/hsmsim.module (p11-kit) and STATE/ssh-askpass (OpenSSH), written when missing or
    changed, with the variables that name them; a file that cannot be written is left out."""
    from hsmsim.files import write_private
    out = []
    for var, name, mode, template in _TOOL_FILES:
        path = state.root / name
        text = template.format(module=module)
        try:
            fresh = path.is_file() and path.read_text() == text
            if not fresh or path.stat().st_mode & 0o777 != mode:
                write_private(path, text, mode)
        except OSError:
            continue
        out.append((var, path))
    return out


def _kms_region(state: StateDir) -> str:
    """The KMS's default Region ([kms] region): the one `hsmsim env` exports."""
    try:
        from hsmsim.config import load_file, resolve_section
        from hsmsim.kms.config import KmsConfig
        return str(resolve_section(KmsConfig, "kms", load_file(state.config_file), environ()).region)
    except Exception:
        return "us-east-1"


def _kms_endpoint(state: StateDir) -> str:
    try:
        from hsmsim.config import load_file, resolve_section
        from hsmsim.kms.config import KmsConfig
        cfg = resolve_section(KmsConfig, "kms", load_file(state.config_file), environ())
        return f"http://{getattr(cfg, 'host', '127.0.0.1')}:{getattr(cfg, 'port', 4599)}"
    except Exception:
        return "http://127.0.0.1:4599"


def _exports(env: dict[str, str]) -> str:
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())


# -- up / down ---------------------------------------------------------------------------------

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
    state = _state(args)
    azs = _azs(args)
    admin_pw = args.admin_password or env.get("HSMSIM_ADMIN_PASSWORD")
    cu_pw = args.cu_password or env.get("HSMSIM_CU_PASSWORD")
    if admin_pw:
        _password_ok(admin_pw, "the admin password")
    if cu_pw:
        _password_ok(cu_pw, "the crypto_user password")
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
            info = _spawn_detached(state, args.config, overrides)
        except BaseException:
            if new is not None:
                discard_new_cluster(state, new.created_root)
            raise
        _print_ready(state, info["cluster_id"], info, new, args)
        return 0
    return _run_foreground(state, args, overrides, new)


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


def _spawn_detached(state: StateDir, config: str | None, overrides: list[str]) -> dict[str, Any]:
    r, w = os.pipe()
    cmd = [sys.executable, "-m", "hsmsim.daemon", "--state", str(state.root),
           "--ready-fd", str(w), "--log-file", str(state.log_file)]
    if config:
        cmd += ["--config", str(Path(config).absolute())]
    for o in overrides:
        cmd += ["--set", o]
    from hsmsim import files
    with files.open_append(state.log_file) as log:  # 0600 whatever the umask
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                pass_fds=(w,), start_new_session=True, close_fds=True)
    os.close(w)
    deadline = time.monotonic() + READY_TIMEOUT
    buf = b""
    import select
    try:
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                proc.kill()
                raise CliError(f"the daemon did not become ready within {READY_TIMEOUT:.0f}s "
                               f"(see {state.log_file})")
            ready, _, _ = select.select([r], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(r, 4096)
                if not chunk:
                    break
                buf += chunk
    finally:
        os.close(r)
    if not buf.strip():
        code = proc.wait(timeout=10)
        raise CliError(f"the daemon exited (status {code}) before it was ready (see "
                       f"{state.log_file})")
    msg = json.loads(buf.splitlines()[0])
    if not msg.get("ok"):
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise CliError(str(msg.get("error", "the daemon failed to start")))
    return dict(msg)


def _run_foreground(state: StateDir, args: argparse.Namespace, overrides: list[str],
                    new: Any) -> int:
    from hsmsim.daemon.main import DaemonOptions, serve, setup_logging
    setup_logging(state.log_file)
    errors: list[str] = []

    def ready(info: dict[str, Any]) -> None:
        _print_ready(state, info["cluster_id"], info, new, args, running=True)

    ov = tuple((o.split("=", 1)[0], o.split("=", 1)[1]) for o in overrides)
    opts = DaemonOptions(state.root, Path(args.config).absolute() if args.config else None, ov)
    try:
        code = aio.run(serve(opts, environ(), ready, errors.append))
    except KeyboardInterrupt:
        code = 0
    except ConfigError as exc:  # e.g. a bad HSMSIM_EVENT_LOOP
        errors.append(str(exc))
        code = 2
    if errors:
        if new is not None:
            discard_new_cluster(state, new.created_root)
        raise CliError(errors[0])
    return code


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
    if new is not None:
        print(f"  admin password : {new.admin_password}   (shown once; stored in "
              f"{state.admin_password})")
    print(_exports(env))
    if running:
        print("hsmsim: running; Ctrl-C or `hsmsim down` stops the cluster")
    state_flag = "" if state.root == Path(".hsmsim").absolute() else f" --state {shlex.quote(str(state.root))}"
    print(f"# in another shell: source .venv/bin/activate && eval \"$(hsmsim env{state_flag})\"",
          flush=True)


def cmd_down(args: argparse.Namespace) -> int:
    state = _state(args)
    client = ControlClient(state.control_sock, timeout=10)
    try:
        client.call("shutdown")
    except ControlError as exc:
        if exc.kind == "unavailable":
            stopped = _stop_orphan_nodes(state)
            extra = f"; stopped {stopped} HSM node(s) left running" if stopped else ""
            print(f"hsmsim: no daemon is running for {state.root}{extra}", file=sys.stderr)
            return 0
        raise
    from hsmsim.daemon.main import read_pid
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if read_pid(state) is None and not state.control_sock.exists():
            break
        time.sleep(0.05)
    else:
        raise CliError("the daemon did not stop within 30s")
    print(f"hsmsim: stopped the cluster in {state.root}")
    return 0


def cmd_reset(args: argparse.Namespace) -> int:
    """Start over: stop the daemon and its nodes, then delete the cluster's state directory
    (keys, users, KMS state, backups, logs). Asks first unless --yes."""
    import shutil
    state = _state(args)
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
    _stop_orphan_nodes(state)
    shutil.rmtree(state.root)
    print(f"hsmsim: deleted the cluster in {state.root}; `hsmsim up` creates a new one")
    return 0


def _stop_orphan_nodes(state: StateDir) -> int:
    """Node processes outlive a crashed daemon (as HSMs outlive their client); `down` without
    a daemon stops them."""
    import signal
    from hsmsim.cluster.members import Member
    try:
        spec = state.load_spec()
    except StateError:
        return 0
    n = 0
    for h in spec.hsms:
        pid = Member(h.hsm_id, h.az, state).running_orphan()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGTERM)
                n += 1
            except ProcessLookupError:
                pass
    return n


def cmd_env(args: argparse.Namespace) -> int:
    state = _state(args)
    state.load_spec()
    endpoints: dict[str, str] = {}
    try:
        endpoints = ControlClient(state.control_sock, timeout=3).call("status").get("endpoints", {})
    except ControlError:
        pass
    env = client_env(state, endpoints)
    if args.json:
        print(json.dumps(env, indent=2))
    else:
        print(_exports(env))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    st = _client(args).call("status")
    if args.json:
        emit(st, True)
        return 0
    conv = " (converging)" if st["converging"] else ""
    print(f"cluster {st['cluster_id']}  state {st['state']}{conv}  token objects "
          f"{st['objects']}  daemon pid {st['daemon_pid']}")
    kms = (st.get("endpoints") or {}).get("kms")
    print(f"KMS endpoint {kms}" if kms else "KMS endpoint: not running (see the warnings)")
    for w in st.get("warnings") or ():
        print(f"warning: {w}")
    table(_hsm_rows(st))
    return 0


def _faults(h: dict[str, Any]) -> str:
    """The faults injected into one HSM, as `hsmsim hsm` would set them."""
    out = [h["condition"]] if h["condition"] in ("paused", "partitioned", "killed") else []
    if h.get("latency_ms"):
        out.append(f"latency {h['latency_ms']} ms")
    if h.get("throttle_rps"):
        out.append(f"throttle {h['throttle_rps']} rps")
    return ", ".join(out) or "-"


def _hsm_rows(st: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"hsm": h["hsm_id"], "az": h["az"], "state": h["state"],
             "condition": h["condition"], "faults": _faults(h), "keys": h["keys"],
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


# -- hsm -----------------------------------------------------------------------------------------

def cmd_hsm(args: argparse.Namespace) -> int:
    client = _client(args, timeout=3600)
    op = args.hsm_cmd
    if op == "list":
        st = client.call("status")
        emit(st["hsms"], args.json, rows=_hsm_rows(st))
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
    client = _client(args, timeout=3600)
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


# -- users and keys ------------------------------------------------------------------------------

def _login_args(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if getattr(args, "login_user", None):
        out["login_user"] = args.login_user
    pw = getattr(args, "login_password", None)
    if pw:
        out["login_password"] = pw
    return out


def cmd_user(args: argparse.Namespace) -> int:
    client = _client(args)
    op = args.user_cmd
    if op == "list":
        rows = client.call("user.list")
        emit(rows, args.json, columns=["username", "role", "locked", "cluster-coverage"])
        return 0
    if not USERNAME_RE.match(args.username):
        raise CliError("--username must be 1 to 31 letters, digits or underscores")
    la = _login_args(args)
    if op in ("create", "change-password") and not args.password:
        args.password = _prompt_password(args.username)
    if op == "create":
        if args.role not in ("admin", "crypto-user"):
            raise CliError("--role must be admin or crypto-user")
        r = client.call("user.create", username=args.username, role=args.role,
                        password=_password_ok(args.password, "--password"), **la)
    elif op == "delete":
        r = client.call("user.delete", username=args.username, **la)
    elif op == "change-password":
        r = client.call("user.change_password", username=args.username,
                        password=_password_ok(args.password, "--password"), **la)
    else:
        r = client.call("user.unlock", username=args.username, **la)
    emit(r if args.json else [r], args.json)
    return 0


def _prompt_password(username: str) -> str:
    """Ask on the terminal (as cloudhsm-cli does) instead of taking it from argv."""
    if not sys.stdin.isatty():
        raise CliError("--password is required when not on a terminal")
    import getpass
    pw = getpass.getpass(f"password for {username}: ")
    if getpass.getpass("again: ") != pw:
        raise CliError("the passwords do not match")
    return pw


def cmd_key(args: argparse.Namespace) -> int:
    client = _client(args)
    la = _login_args(args)
    if args.key_cmd == "list":
        if args.user and args.user != "crypto_user" and not args.login_password:
            # Without that user's password: the admin lists what the user sees.
            rows = client.call("key.list", as_user=args.user)
        else:
            if args.user:
                la["login_user"] = args.user
            rows = client.call("key.list", **la)
        emit(rows, args.json, columns=["key_reference", "class", "key_type", "label", "coverage",
                                       "uri"])
        return 0
    handle = _key_ref(client, args.handle, la)
    if args.key_cmd == "delete":
        r = client.call("key.delete", handle=handle, **la)
    else:
        r = client.call(f"key.{args.key_cmd}", handle=handle, username=args.username, **la)
    emit(r if args.json else [r], args.json)
    return 0


def _key_ref(client: ControlClient, text: str, la: dict[str, Any]) -> int:
    """A key named as `key list` shows it: its reference (0x...), its label, or its PKCS#11
    URI (RFC 7512: the object, id, type and token it gives must all match). A name that fits
    several keys (a key pair shares its label) is refused with each candidate's URI."""
    if re.fullmatch(r"(0x[0-9a-fA-F]+|[0-9]+)", text):
        return _handle(text)
    from hsmsim.tls.errors import TlsError
    from hsmsim.tls.uri import Pkcs11Uri
    rows = client.call("key.list", **la)
    if text.startswith("pkcs11:"):
        try:
            want = Pkcs11Uri.parse(text)
        except TlsError as exc:
            raise CliError(f"{text!r} is not a PKCS#11 URI: {exc}") from None

        def fits(row: dict[str, Any]) -> bool:
            have = Pkcs11Uri.parse(row["uri"])
            return all(getattr(want, a) is None or getattr(want, a) == getattr(have, a)
                       for a in ("token", "object", "id", "type"))
        found = [r for r in rows if fits(r)]
    else:
        found = [r for r in rows if r["label"] == text]
    if len(found) == 1:
        return int(found[0]["handle"])
    if not found:
        raise CliError(f"no key {text!r} among the {len(rows)} keys this user can see "
                       "(`hsmsim key list` shows them)")
    raise CliError(f"{text!r} names {len(found)} keys; name one by its URI or reference: "
                   + ", ".join(f"{r['key_reference']} {r['uri']}" for r in found))


def _handle(text: str) -> int:
    try:
        h = int(text, 0)
    except ValueError:
        raise CliError(f"key reference {text!r} is not a number (e.g. 0x0000000000010003)") from None
    if h <= 0:
        raise CliError("key reference must be positive")
    return h


# -- audit ---------------------------------------------------------------------------------------

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
        path = _state(args).kms / "audit.jsonl"
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
    client = _client(args)
    read = _audit_reader(client, _state(args), args.hsm)
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


# -- registration --------------------------------------------------------------------------------

_HSM_HELP = "an HSM id (hsm-...) or its availability zone (us-east-1a)"
_KEY_HELP = "the key's reference (0x...), label or PKCS#11 URI, as `hsmsim key list` shows them"


def register(sub: Any) -> None:
    p = sub.add_parser("up", help="create (first run) or reopen the cluster and start its daemon",
                       description="Start the cluster's daemon: on the first run it creates the "
                       "cluster (masking key, admin and crypto_user, CA certificate); later runs "
                       "reopen it with the same users and keys.")
    _add_state(p)
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
    _add_state(p)
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("reset", help="stop the cluster and delete its state (start over)",
                       description="Stops the daemon and its HSM nodes, then deletes the state "
                       "directory: every key, user, backup, log and the KMS state.")
    _add_state(p)
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    p.set_defaults(func=cmd_reset)

    p = sub.add_parser("env", help="print export lines for PKCS#11 and KMS clients",
                       description="Use as: eval \"$(hsmsim env)\"")
    _add_state(p)
    add_json_flag(p)
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("status", help="cluster state and each HSM's state, keys and sync lag")
    _add_state(p)
    add_json_flag(p)
    p.set_defaults(func=cmd_status)

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
        _add_state(q)
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
        _add_state(q)
        add_json_flag(q)
    p.set_defaults(func=cmd_backup)

    p = sub.add_parser("user", help="manage HSM users (CloudHSM CLI `user` verbs)")
    us = p.add_subparsers(dest="user_cmd", metavar="ACTION", required=True)
    us.add_parser("list", help="users and their cluster coverage")
    q = us.add_parser("create", help="create a user (as admin)")
    q.add_argument("--username", required=True)
    q.add_argument("--role", required=True, choices=("admin", "crypto-user"))
    q.add_argument("--password", help="the new user's password (prompted when omitted)")
    q = us.add_parser("delete", help="delete a user (as admin)")
    q.add_argument("--username", required=True)
    q = us.add_parser("change-password", help="set a user's password (as admin)")
    q.add_argument("--username", required=True)
    q.add_argument("--password", help="the new password (prompted when omitted)")
    q = us.add_parser("unlock", help="unlock a locked-out user (as admin)")
    q.add_argument("--username", required=True)
    for name, q in us.choices.items():
        _add_state(q)
        add_json_flag(q)
        if name != "list":
            q.add_argument("--login-user", help="log in as this admin (default: admin)")
            q.add_argument("--login-password", help="its password (default: the stored one)")
    p.set_defaults(func=cmd_user)

    p = sub.add_parser("key", help="list, share, unshare and delete keys (as a crypto user)")
    ks = p.add_subparsers(dest="key_cmd", metavar="ACTION", required=True)
    q = ks.add_parser("list", help="keys visible to a crypto user, with PKCS#11 URIs")
    q.add_argument("--user", help="the keys this crypto user sees (default: crypto_user); "
                   "listed by the admin unless --login-password is given")
    for name in ("share", "unshare"):
        q = ks.add_parser(name, help=f"{name} a key with a crypto user")
        q.add_argument("handle", metavar="KEY", help=_KEY_HELP)
        q.add_argument("--username", required=True)
    q = ks.add_parser("delete", help="delete a key")
    q.add_argument("handle", metavar="KEY", help=_KEY_HELP)
    for q in ks.choices.values():
        _add_state(q)
        add_json_flag(q)
        q.add_argument("--login-user", help="log in as this crypto user (default: crypto_user)")
        q.add_argument("--login-password", help="its password (default: the stored one)")
    p.set_defaults(func=cmd_key)

    p = sub.add_parser("audit", help="per-HSM audit logs (or the KMS audit trail)")
    _add_state(p)
    p.add_argument("--hsm", metavar="HSM", help="only this HSM (id or AZ)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new records")
    p.add_argument("--kms", action="store_true", help="show the KMS audit trail instead")
    add_json_flag(p)
    p.set_defaults(func=cmd_audit)


_ = StateError
