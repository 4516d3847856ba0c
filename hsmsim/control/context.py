"""What the control operations work on (ControlContext), the argument checks they share and
logging in as the admin or a crypto user for one operation."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hsmsim.cluster.api import Login
from hsmsim.cluster.cluster import Cluster
from hsmsim.cluster.state import StateDir
from hsmsim.cluster.supervisor import Supervisor
from hsmsim.control.protocol import ControlError
from hsmsim.control.server import Progress
from hsmsim.pkcs11.constants import UserType

_ROLES = {"admin": UserType.SO, "crypto-user": UserType.USER}


@dataclass(frozen=True)
class ControlContext:
    """The daemon's parts the control operations use, handed to every operation."""

    cluster: Cluster
    supervisor: Supervisor
    state: StateDir
    # The daemon's own dict, filled in as its services start (after the control socket).
    endpoints: Mapping[str, str]
    settings_rows: Sequence[Mapping[str, Any]]
    warnings: Callable[[], list[str]]
    stop: Callable[[], None]


# One control operation: the context, the request's arguments, a progress callback.
Op = Callable[[ControlContext, dict[str, Any], Progress], Awaitable[Any]]


def arg_str(args: dict[str, Any], name: str, default: str | None = None) -> str:
    v = args.get(name, default)
    if not isinstance(v, str) or not v:
        raise ControlError(f"`{name}` is required", "arguments")
    return v


def arg_int(args: dict[str, Any], name: str, lo: int, hi: int) -> int:
    v = args.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ControlError(f"`{name}` must be an integer between {lo} and {hi}", "arguments")
    return v


async def login_as(ctx: ControlContext, args: dict[str, Any], default_role: str) -> Login:
    role = args.get("role_login", default_role)
    if role not in _ROLES:
        raise ControlError(f"unknown role {role!r} (admin or crypto-user)", "arguments")
    user = arg_str(args, "login_user", "admin" if role == "admin" else "crypto_user")
    pw = args.get("login_password")
    if not isinstance(pw, str) or not pw:
        secret = ctx.state.admin_password if user == "admin" else (
            ctx.state.cu_password if user == "crypto_user" else None)
        if secret is None:
            raise ControlError(f"a password is needed to log in as {user!r}", "arguments")
        pw = ctx.state.read_secret(secret)
    return await ctx.cluster.login(_ROLES[role], user, pw)


async def with_login(ctx: ControlContext, args: dict[str, Any], role: str,
                     fn: Callable[[Login], Awaitable[Any]]) -> Any:
    login = await login_as(ctx, args, role)
    try:
        return await fn(login)
    finally:
        await ctx.cluster.logout(login)
