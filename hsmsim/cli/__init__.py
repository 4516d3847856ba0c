"""The `hsmsim` command line: one argparse tree assembled from per-area command modules.

Each module in COMMAND_MODULES has `register(subparsers)`, adding its sub-commands with a
`func(args) -> int` default. Errors derived from HsmsimError become one clear message on
stderr and exit code 1; bad flags exit 2 (argparse)."""

from __future__ import annotations

import argparse
import os
import sys

from hsmsim import __version__
from hsmsim.cli import audit, cluster, config, hsm, logs, node, pkcs11, tls, users
from hsmsim.errors import HsmsimError

COMMAND_MODULES = (
    cluster,  # up, down, reset, env, status
    hsm,  # hsm, backup
    users,  # user, key
    audit,  # audit
    node,  # node serve
    pkcs11,  # module-path
    tls,  # tls init, tls bench
    config,  # config
    logs,  # logs
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
    for mod in COMMAND_MODULES:
        mod.register(sub)
    _mark_parsers(parser)
    return parser


def _mark_parsers(parser: argparse.ArgumentParser) -> None:
    """Each (sub)command's parser records itself, so that a bad flag is reported with the usage
    of the command it was given to, not the top level's."""
    parser.set_defaults(_parser=parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in set(action.choices.values()):
                _mark_parsers(child)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # exits 2 with the usage of the sub-command that got the bad flag
        args._parser.error(f"unrecognized arguments: {' '.join(extra)}")
    func = getattr(args, "func", None)
    if func is None:
        args._parser.print_help()
        return 0
    try:
        return int(func(args) or 0)
    except HsmsimError as exc:
        print(f"hsmsim: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`hsmsim status | head -1`): stop quietly, as shell tools do.
        # stdout is pointed at /dev/null so that the interpreter's final flush fails silently.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
