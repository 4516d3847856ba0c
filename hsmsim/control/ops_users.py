"""The control operations on users and keys: list, create, delete, change password and unlock
users; list, share, unshare and delete keys (each logs in for the one operation)."""

from __future__ import annotations

import urllib.parse
from typing import Any

from hsmsim.cluster.api import Login
from hsmsim.cluster.state import write_secret
from hsmsim.control.context import ControlContext, Op, arg_int, arg_str, with_login
from hsmsim.control.protocol import ControlError
from hsmsim.control.server import Progress
from hsmsim.pkcs11.constants import Attribute, KeyType, ObjectClass

def key_reference(handle: int) -> str:
    """A key as every command shows it: CloudHSM CLI's key reference, 0x and 16 hex digits."""
    return f"0x{handle:016x}"


def pkcs11_uri(label: str | None, id_: bytes | None, cls: int | None) -> str:
    """RFC 7512 URI of a key in the hsmsim token."""
    parts = ["token=hsm1"]
    if label:
        parts.append("object=" + urllib.parse.quote(label, safe=""))
    if id_:
        parts.append("id=" + "".join(f"%{b:02x}" for b in id_))
    kind = {int(ObjectClass.PRIVATE_KEY): "private", int(ObjectClass.PUBLIC_KEY): "public",
            int(ObjectClass.SECRET_KEY): "secret-key", int(ObjectClass.CERTIFICATE): "cert",
            int(ObjectClass.DATA): "data"}.get(cls if cls is not None else -1)
    if kind:
        parts.append("type=" + kind)
    return "pkcs11:" + ";".join(parts)


# -- users ---------------------------------------------------------------------------------------
async def user_list(ctx: ControlContext, args: dict[str, Any], p: Progress) -> Any:
    return await ctx.cluster.list_users_cluster()


async def user_create(ctx: ControlContext, args: dict[str, Any], p: Progress) -> Any:
    c = ctx.cluster
    username, role, pw = arg_str(args, "username"), arg_str(args, "role"), arg_str(args, "password")
    await with_login(ctx, args, "admin", lambda lg: c.create_user(lg, username, role, pw))
    return {"username": username, "role": role}


async def user_delete(ctx: ControlContext, args: dict[str, Any], p: Progress) -> Any:
    c = ctx.cluster
    username = arg_str(args, "username")
    await with_login(ctx, args, "admin", lambda lg: c.delete_user(lg, username))
    return {"username": username, "deleted": True}


async def user_change_password(ctx: ControlContext, args: dict[str, Any], p: Progress) -> Any:
    c = ctx.cluster
    username, pw = arg_str(args, "username"), arg_str(args, "password")
    role = "admin" if args.get("role_login") is None else args["role_login"]
    await with_login(ctx, args, role, lambda lg: c.change_password(lg, username, pw))
    for name, path in (("admin", ctx.state.admin_password),
                       ("crypto_user", ctx.state.cu_password)):
        if username == name:
            write_secret(path, pw)
    return {"username": username, "changed": True}


async def user_unlock(ctx: ControlContext, args: dict[str, Any], p: Progress) -> Any:
    c = ctx.cluster
    username = arg_str(args, "username")
    await with_login(ctx, args, "admin", lambda lg: c.unlock_user(lg, username))
    return {"username": username, "unlocked": True}


# -- keys ----------------------------------------------------------------------------------------
async def key_list(ctx: ControlContext, args: dict[str, Any], p: Progress) -> Any:
    c = ctx.cluster
    as_user = args.get("as_user")
    if as_user is not None and (not isinstance(as_user, str) or not as_user):
        raise ControlError("`as_user` must be a username", "arguments")

    async def run(lg: Login) -> Any:
        handles = await c.find_objects(lg, {}, 0, as_user)
        want = [int(Attribute.CLASS), int(Attribute.KEY_TYPE), int(Attribute.LABEL),
                int(Attribute.ID), int(Attribute.TOKEN)]
        out = []
        for h in handles:
            attrs = {a.attr: a.value for a in await c.get_attributes(lg, h, want)}
            cls = attrs.get(int(Attribute.CLASS))
            kt = attrs.get(int(Attribute.KEY_TYPE))
            label = attrs.get(int(Attribute.LABEL))
            id_ = attrs.get(int(Attribute.ID))
            obj = c.directory.get(h)
            out.append({
                "handle": h, "key_reference": key_reference(h),
                "label": label if isinstance(label, str) else None,
                "id": id_.hex() if isinstance(id_, bytes) else None,
                "class": _name(ObjectClass, cls), "key_type": _name(KeyType, kt),
                "token": attrs.get(int(Attribute.TOKEN)),
                "coverage": (f"{len(obj.holders)}/{len(c.members)}" if obj else None),
                "uri": pkcs11_uri(label if isinstance(label, str) else None,
                                  id_ if isinstance(id_, bytes) else None,
                                  cls if isinstance(cls, int) else None),
            })
        return out
    # FIDELITY: an admin lists the keys one crypto user sees (owned, shared, public), as
    # CloudHSM CLI's `key list --verbose` shows admins every key with its owner; no need
    # for that user's password (kmsuser's is KMS's alone once a key store connected).
    return await with_login(ctx, args, "admin" if as_user else "crypto-user", run)


async def key_share(ctx: ControlContext, args: dict[str, Any], p: Progress) -> Any:
    c = ctx.cluster
    handle, user = arg_int(args, "handle", 1, 2**63), arg_str(args, "username")
    await with_login(ctx, args, "crypto-user", lambda lg: c.share_key(lg, handle, user))
    return {"key_reference": key_reference(handle), "shared_with": user}


async def key_unshare(ctx: ControlContext, args: dict[str, Any], p: Progress) -> Any:
    c = ctx.cluster
    handle, user = arg_int(args, "handle", 1, 2**63), arg_str(args, "username")
    await with_login(ctx, args, "crypto-user", lambda lg: c.unshare_key(lg, handle, user))
    return {"key_reference": key_reference(handle), "unshared_from": user}


async def key_delete(ctx: ControlContext, args: dict[str, Any], p: Progress) -> Any:
    c = ctx.cluster
    handle = arg_int(args, "handle", 1, 2**63)
    await with_login(ctx, args, "crypto-user", lambda lg: c.destroy_object(lg, handle))
    return {"key_reference": key_reference(handle), "deleted": True}


def _name(enum: Any, value: Any) -> str | None:
    if not isinstance(value, int):
        return None
    try:
        return str(enum(value).name)
    except ValueError:
        return hex(value)


OPS: dict[str, Op] = {
    "user.list": user_list, "user.create": user_create, "user.delete": user_delete,
    "user.change_password": user_change_password, "user.unlock": user_unlock,
    "key.list": key_list, "key.share": key_share, "key.unshare": key_unshare,
    "key.delete": key_delete,
}
