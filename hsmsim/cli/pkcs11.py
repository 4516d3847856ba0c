"""`hsmsim module-path`: where libhsmsim-pkcs11.so is, for PKCS#11 hosts (pkcs11-tool
--module, OpenSSL's MODULE_PATH, python-pkcs11)."""

from __future__ import annotations

import argparse
import sys

from hsmsim.resources import pkcs11_module


def _module_path(args: argparse.Namespace) -> int:
    try:
        path = pkcs11_module()
    except FileNotFoundError as exc:
        print(f"hsmsim: error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = subparsers.add_parser(
        "module-path", help="print the path of the PKCS#11 module (libhsmsim-pkcs11.so)",
        description="Print the absolute path of libhsmsim-pkcs11.so, the PKCS#11 library that "
        "applications load (e.g. pkcs11-tool --module \"$(hsmsim module-path)\").")
    p.set_defaults(func=_module_path)
