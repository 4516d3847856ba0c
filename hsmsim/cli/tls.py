"""`hsmsim tls init` and `hsmsim tls bench`: the TLS-offload kit's command line (flags, the
password from the environment, output as a table or JSON); the work is in hsmsim.tls."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from hsmsim import config
from hsmsim.cli.output import add_json_flag, emit
from hsmsim.tls.errors import TlsError
from hsmsim.tls.hsmkey import KEY_SPECS

PASSWORD_ENV = "HSMSIM_TLS_PASSWORD"


def register(subparsers: Any) -> None:
    tls = subparsers.add_parser(
        "tls", help="TLS offload: server keys in the HSM, OpenSSL/nginx configuration, benchmark",
        description="TLS offload with the key in the HSM, used through OpenSSL's pkcs11 engine.")
    sub = tls.add_subparsers(dest="tls_command", metavar="SUBCOMMAND", required=True)

    init = sub.add_parser(
        "init", help="make a token key pair, its certificate and ready-to-use server files",
        description="Generates a non-extractable key pair in the cluster through "
        "libhsmsim-pkcs11.so, certifies it (local CA or self-signed through the HSM), and writes "
        "openssl.cnf, an nginx configuration, an s_server script and the certificates. The "
        f"crypto user's password comes from ${PASSWORD_ENV}, else from the state directory "
        "(the default crypto_user's).")
    init.add_argument("--cn", required=True, help="the server's name (certificate CN and SAN)")
    init.add_argument("--key", default="rsa2048", choices=sorted(KEY_SPECS),
                      help="key type (default rsa2048)")
    init.add_argument("--user", default=None,
                      help="crypto user that owns the key (default crypto_user)")
    init.add_argument("--out", type=Path, default=None,
                      help="output directory (default $STATE/tls/<cn>-<label suffix>)")
    init.add_argument("--state", default=None, help="state directory (default $HSMSIM_HOME)")
    init.add_argument("--issuer", default="ca", choices=("ca", "self"),
                      help="ca: signed by hsmsim's local CA ($STATE/tls/ca); "
                      "self: self-signed by the HSM key (default ca)")
    init.add_argument("--days", type=int, default=365, help="certificate lifetime (default 365)")
    init.add_argument("--san", action="append", default=[], metavar="NAME",
                      help="extra DNS name or IP address for the certificate (repeatable)")
    init.add_argument("--port", type=int, default=8443,
                      help="port in the generated nginx and s_server files (default 8443)")
    other = init.add_argument_group(
        "another PKCS#11 module instead of the cluster (e.g. SoftHSM2 directly)")
    other.add_argument("--module", type=Path, default=None, help="PKCS#11 module path")
    other.add_argument("--token", default=None, help="token label (with --module)")
    other.add_argument("--pin-file", type=Path, default=None,
                       help="file holding the user PIN (with --module; keep it 0600)")
    other.add_argument("--module-env", action="append", default=[], metavar="NAME=VALUE",
                       help="environment the module needs in server processes (repeatable)")
    add_json_flag(init)
    init.set_defaults(func=cmd_init)

    bench = sub.add_parser(
        "bench", help="TLS 1.2 ECDHE-RSA-2048 handshakes/s: cluster key vs PEM key vs SoftHSM2",
        description="Measures full TLS 1.2 ECDHE-RSA-AES128-GCM-SHA256 handshakes/s with "
        "`openssl s_time -new` against three `openssl s_server` setups on 127.0.0.1: the key in "
        "the hsmsim cluster through the pkcs11 engine, the key in a PEM file, and SoftHSM2 "
        "directly through the same engine. Uses the cluster of --state when its daemon runs, "
        "else starts a throw-away one.")
    bench.add_argument("--seconds", type=float, default=8.0,
                       help="measuring time per setup (default 8)")
    bench.add_argument("--latency-ms", type=float, nargs="+", default=[], metavar="X",
                       help="also measure the cluster setup with X ms of latency injected on "
                       "every HSM")
    bench.add_argument("--plot", type=Path, default=None, metavar="FILE.png",
                       help="draw handshakes/s against injected latency into a PNG")
    bench.add_argument("--state", default=None,
                       help="use this running cluster (default: a throw-away one)")
    add_json_flag(bench)
    bench.set_defaults(func=cmd_bench)


def _parse_env(items: list[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or not name.isidentifier():
            raise TlsError(f"--module-env {item!r} must look like NAME=VALUE")
        out.append((name, value))
    return out


def cmd_init(args: argparse.Namespace) -> int:
    from hsmsim import resources
    from hsmsim.tls import kit as tlskit
    from hsmsim.tls.hsmkey import key_spec

    environ = config.environ()
    state = config.state_dir(args.state, environ)
    if args.module is not None:
        if args.token is None or args.pin_file is None:
            raise TlsError("--module needs --token and --pin-file")
        if args.user is not None:
            raise TlsError("--user applies to the hsmsim cluster; with --module the PIN file "
                           "says who logs in")
        target = tlskit.module_target(args.module.absolute(), args.token, args.pin_file,
                                      _parse_env(args.module_env))
    else:
        if args.token is not None or args.pin_file is not None or args.module_env:
            raise TlsError("--token, --pin-file and --module-env need --module")
        try:
            module = resources.pkcs11_module()
        except FileNotFoundError as exc:
            raise TlsError(str(exc)) from None
        target = tlskit.cluster_target(state, module, args.user or tlskit.DEFAULT_USER,
                                       environ.get(PASSWORD_ENV))
    cn = tlskit.validate_cn(args.cn)
    out = args.out if args.out is not None else tlskit.default_out_dir(state, cn)
    req = tlskit.KitRequest(cn=cn, spec=key_spec(args.key), issuer=args.issuer, days=args.days,
                            sans=tuple(args.san), out_dir=out, state_dir=state,
                            port=args.port, target=target)
    # The module reads its environment (HSMSIM_SOCKET, SOFTHSM2_CONF...) at C_Initialize, in
    # this process as in the servers that will use the key.
    os.environ.update(dict(target.env))
    made = tlskit.init_kit(req)
    if target.kind == "hsmsim" and not tlskit.wait_replicated(state):
        made = dataclasses.replace(made, warnings=[*made.warnings, (
            "the new key is not yet on every HSM; a server started now may not find it "
            "(see `hsmsim status`)")])
    for w in made.warnings:
        print(f"hsmsim: warning: {w}", file=sys.stderr)
    if args.json:
        emit(made.to_json(), True)
        return 0
    rows = [{"item": "key", "value": f"{made.key} token key pair, label {made.label}, "
             f"id {made.key_id} (non-extractable)"},
            {"item": "uri", "value": made.uri},
            {"item": "pin", "value": f"${tlskit.PIN_ENV}, read from {made.pin_file} by env.sh"},
            {"item": "certificate", "value": f"{made.files['cert']} ({made.issuer})"},
            {"item": "chain", "value": made.files["chain"]},
            {"item": "openssl.cnf", "value": made.files["openssl_cnf"]},
            {"item": "nginx", "value": f"{made.files['nginx_server']} "
             f"(complete config: {made.files['nginx_conf']}, run: {made.files['nginx_sh']})"},
            {"item": "s_server", "value": made.files["s_server"]},
            {"item": "environment", "value": f". {made.files['env']}"}]
    rows += [{"item": "WARNING", "value": w} for w in made.warnings]
    emit(None, False, rows=rows, columns=("item", "value"))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from hsmsim.tls import bench as tlsbench

    if args.seconds <= 0 or args.seconds > 600:
        raise TlsError("--seconds must be between 0 and 600")
    if any(x < 0 or x > 10_000 for x in args.latency_ms):
        raise TlsError("--latency-ms values must be between 0 and 10000")
    environ = config.environ()
    state = config.state_dir(args.state, environ) if args.state else None
    result = tlsbench.run(tlsbench.BenchOptions(
        seconds=args.seconds, latencies_ms=tuple(args.latency_ms), state_dir=state,
        progress=sys.stderr))
    if args.json:
        emit(result.to_json(), True)
    else:
        print(result.markdown())
    if args.plot is not None:
        from hsmsim.tls.plot import plot_latency
        print(plot_latency(result, args.plot), file=sys.stderr)
    return 0
