"""CLI commands for HSM users and keys, as CloudHSM CLI's `user` and `key` verbs: list,
create, delete, change-password, unlock; list, share, unshare, delete (a key named by its
reference, label or PKCS#11 URI)."""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from hsmsim.cli.common import CliError, add_state, client_of, password_ok
from hsmsim.cli.output import add_json_flag, emit
from hsmsim.control.client import ControlClient

USERNAME_RE = re.compile(r"^[a-zA-Z0-9_]{1,31}$")
_KEY_HELP = "the key's reference (0x...), label or PKCS#11 URI, as `hsmsim key list` shows them"


def _login_args(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if getattr(args, "login_user", None):
        out["login_user"] = args.login_user
    pw = getattr(args, "login_password", None)
    if pw:
        out["login_password"] = pw
    return out


def cmd_user(args: argparse.Namespace) -> int:
    client = client_of(args)
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
                        password=password_ok(args.password, "--password"), **la)
    elif op == "delete":
        r = client.call("user.delete", username=args.username, **la)
    elif op == "change-password":
        r = client.call("user.change_password", username=args.username,
                        password=password_ok(args.password, "--password"), **la)
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
    client = client_of(args)
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


def register(sub: Any) -> None:
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
        add_state(q)
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
        add_state(q)
        add_json_flag(q)
        q.add_argument("--login-user", help="log in as this crypto user (default: crypto_user)")
        q.add_argument("--login-password", help="its password (default: the stored one)")
    p.set_defaults(func=cmd_key)
