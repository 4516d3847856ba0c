"""The `hsmsim` command line: one argparse tree assembled from per-area command modules.

Each module in COMMAND_MODULES has `register(subparsers)`, adding its sub-commands with a
`func(args) -> int` default. Errors derived from HsmsimError become one clear message on
stderr and exit code 1; bad flags exit 2 (argparse)."""

from __future__ import annotations

import argparse
import importlib
import sys

from hsmsim import __version__
from hsmsim.errors import HsmsimError

COMMAND_MODULES = (
    "hsmsim.cli.cluster",  # up, down, status, env, hsm, backup, user, key, audit
    "hsmsim.cli.node",  # node serve
    "hsmsim.cli.pkcs11",  # module-path
    "hsmsim.cli.tls",  # tls init, tls bench
    "hsmsim.cli.config",  # config
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hsmsim",
        description="A local simulator of an AWS CloudHSM cluster: HSM nodes with SoftHSM2 "
        "tokens, a PKCS#11 library (libhsmsim-pkcs11.so) and a KMS endpoint with custom key stores.",
        epilog="Start with `hsmsim up`, then `eval \"$(hsmsim env)\"` in the client's shell.",
    )
    parser.add_argument("--version", action="version", version=f"hsmsim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue  # that area is not built yet
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0
    try:
        return int(func(args) or 0)
    except HsmsimError as exc:
        print(f"hsmsim: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
