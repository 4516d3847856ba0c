"""The control API's operations: one handler per op, each a thin call into the cluster, the
supervisor or the backup store, returning plain JSON values (see docs/control-protocol.md)."""

from __future__ import annotations

import asyncio
import os
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from hsmsim.cluster.api import Login
from hsmsim.control.protocol import ControlError
from hsmsim.pkcs11.constants import Attribute, KeyType, ObjectClass, UserType

if TYPE_CHECKING:
    from hsmsim.daemon.main import Daemon

Progress = Callable[[int, int, str], Awaitable[None]]
Handler = Callable[[dict[str, Any], Progress], Awaitable[Any]]

_ROLES = {"admin": UserType.SO, "crypto-user": UserType.USER}


def _str(args: dict[str, Any], name: str, default: str | None = None) -> str:
    v = args.get(name, default)
    if not isinstance(v, str) or not v:
        raise ControlError(f"`{name}` is required", "arguments")
    return v


def _int(args: dict[str, Any], name: str, lo: int, hi: int) -> int:
    v = args.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ControlError(f"`{name}` must be an integer between {lo} and {hi}", "arguments")
    return v


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


def handlers(d: "Daemon") -> dict[str, Handler]:
    assert d.cluster is not None and d.supervisor is not None
    c, sup = d.cluster, d.supervisor

    async def login_as(args: dict[str, Any], default_role: str) -> Login:
        role = args.get("role_login", default_role)
        if role not in _ROLES:
            raise ControlError(f"unknown role {role!r} (admin or crypto-user)", "arguments")
        user = _str(args, "login_user", "admin" if role == "admin" else "crypto_user")
        pw = args.get("login_password")
        if not isinstance(pw, str) or not pw:
            secret = d.state.admin_password if user == "admin" else (
                d.state.cu_password if user == "crypto_user" else None)
            if secret is None:
                raise ControlError(f"a password is needed to log in as {user!r}", "arguments")
            pw = d.state.read_secret(secret)
        return await c.login(_ROLES[role], user, pw)

    async def ping(args: dict[str, Any], p: Progress) -> Any:
        return {"pid": os.getpid(), "cluster_id": c.spec.cluster_id}

    async def status(args: dict[str, Any], p: Progress) -> Any:
        info = await c.info()
        hsms = []
        for m in c.members.values():
            s = m.status(c.held(m), c.sync_lag(m))
            hsms.append({"hsm_id": s.hsm_id, "az": s.az, "state": s.state,
                         "condition": s.condition, "pid": s.pid, "keys": s.keys,
                         "sync_lag": s.sync_lag, "last_error": s.last_error,
                         "restarts": s.restarts, "latency_ms": s.latency_ms,
                         "throttle_rps": s.throttle_rps})
        return {"cluster_id": info.cluster_id, "state": info.state,
                "converging": sup.converging(), "objects": len(c.live_token_handles()),
                "hsms": hsms, "daemon_pid": os.getpid(), "endpoints": d.endpoints,
                "warnings": d.warnings_now(),
                "settings": d.settings_rows,
                "key_availability_check": c.check_availability,
                "retry_mode": c.config.default_retry_mode}

    async def shutdown(args: dict[str, Any], p: Progress) -> Any:
        asyncio.get_running_loop().call_later(0.05, d.stopping.set)
        return {"stopping": True}

    async def hsm_add(args: dict[str, Any], p: Progress) -> Any:
        az = _str(args, "az")
        from hsmsim.cluster.state import AZ_RE, MAX_HSMS
        if not AZ_RE.match(az):
            raise ControlError(f"{az!r} is not an availability zone name like us-east-1a",
                               "arguments")
        if len(c.members) >= MAX_HSMS:
            raise ControlError(f"a cluster holds at most {MAX_HSMS} HSMs", "ClusterOpError")
        from hsmsim.cluster.backup import create_backup
        await create_backup(c, d.state, reason="hsm add", progress=None)
        hsm_id = await sup.add_hsm(az, p)
        return {"hsm_id": hsm_id, "az": az}

    async def hsm_remove(args: dict[str, Any], p: Progress) -> Any:
        hsm_id = _str(args, "hsm_id")
        sup.member(hsm_id)
        await sup.remove_hsm(hsm_id)
        from hsmsim.cluster.backup import create_backup
        try:
            await create_backup(c, d.state, reason="hsm remove", progress=None)
        except Exception:
            pass
        return {"hsm_id": hsm_id, "state": "DELETED"}

    def simple(fn: Callable[[str], Awaitable[None]], word: str) -> Handler:
        async def h(args: dict[str, Any], p: Progress) -> Any:
            hsm_id = _str(args, "hsm_id")
            await fn(hsm_id)
            return {"hsm_id": hsm_id, "done": word}
        return h

    async def hsm_latency(args: dict[str, Any], p: Progress) -> Any:
        hsm_id = _str(args, "hsm_id")
        ms = _int(args, "ms", 0, 600_000)
        return await sup.set_fault(hsm_id, latency_ms=ms)

    async def hsm_throttle(args: dict[str, Any], p: Progress) -> Any:
        hsm_id = _str(args, "hsm_id")
        rps = _int(args, "rps", 0, 1_000_000)
        return await sup.set_fault(hsm_id, throttle_rps=rps)

    async def inventory(args: dict[str, Any], p: Progress) -> Any:
        out: dict[str, Any] = {}
        for m in c.usable():
            inv = await c.timed(m, m.client.inventory(), timeout=30)  # type: ignore[union-attr]
            out[m.hsm_id] = {str(e.handle): e.fingerprint.hex() for e in inv}
        return {"hsms": out, "tombstones": len(c.journal.tombstones),
                "live": sorted(c.live_token_handles())}

    # -- users -----------------------------------------------------------------------------------
    async def user_list(args: dict[str, Any], p: Progress) -> Any:
        return await c.list_users_cluster()

    async def with_login(args: dict[str, Any], role: str,
                         fn: Callable[[Login], Awaitable[Any]]) -> Any:
        login = await login_as(args, role)
        try:
            return await fn(login)
        finally:
            await c.logout(login)

    async def user_create(args: dict[str, Any], p: Progress) -> Any:
        username, role, pw = _str(args, "username"), _str(args, "role"), _str(args, "password")
        await with_login(args, "admin", lambda lg: c.create_user(lg, username, role, pw))
        return {"username": username, "role": role}

    async def user_delete(args: dict[str, Any], p: Progress) -> Any:
        username = _str(args, "username")
        await with_login(args, "admin", lambda lg: c.delete_user(lg, username))
        return {"username": username, "deleted": True}

    async def user_change_password(args: dict[str, Any], p: Progress) -> Any:
        username, pw = _str(args, "username"), _str(args, "password")
        role = "admin" if args.get("role_login") is None else args["role_login"]
        await with_login(args, role, lambda lg: c.change_password(lg, username, pw))
        for name, path in (("admin", d.state.admin_password), ("crypto_user", d.state.cu_password)):
            if username == name:
                from hsmsim.cluster.state import write_secret
                write_secret(path, pw)
        return {"username": username, "changed": True}

    async def user_unlock(args: dict[str, Any], p: Progress) -> Any:
        username = _str(args, "username")
        await with_login(args, "admin", lambda lg: c.unlock_user(lg, username))
        return {"username": username, "unlocked": True}

    # -- keys ------------------------------------------------------------------------------------
    async def key_list(args: dict[str, Any], p: Progress) -> Any:
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
                obj = c.objects.get(h)
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
        return await with_login(args, "admin" if as_user else "crypto-user", run)

    async def key_share(args: dict[str, Any], p: Progress) -> Any:
        handle, user = _int(args, "handle", 1, 2**63), _str(args, "username")
        await with_login(args, "crypto-user", lambda lg: c.share_key(lg, handle, user))
        return {"key_reference": key_reference(handle), "shared_with": user}

    async def key_unshare(args: dict[str, Any], p: Progress) -> Any:
        handle, user = _int(args, "handle", 1, 2**63), _str(args, "username")
        await with_login(args, "crypto-user", lambda lg: c.unshare_key(lg, handle, user))
        return {"key_reference": key_reference(handle), "unshared_from": user}

    async def key_delete(args: dict[str, Any], p: Progress) -> Any:
        handle = _int(args, "handle", 1, 2**63)
        await with_login(args, "crypto-user", lambda lg: c.destroy_object(lg, handle))
        return {"key_reference": key_reference(handle), "deleted": True}

    # -- audit -----------------------------------------------------------------------------------
    async def audit_read(args: dict[str, Any], p: Progress) -> Any:
        only = args.get("hsm_id")
        if only is not None and not isinstance(only, str):
            raise ControlError("`hsm_id` must be a string", "arguments")
        since = args.get("since") or {}
        if not isinstance(since, dict) or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
                for k, v in since.items()):
            raise ControlError("`since` must map HSM ids to sequence numbers", "arguments")
        limit = _int(args, "limit", 1, 100_000) if "limit" in args else 1000
        out = []
        for m in c.members.values():
            if only and m.hsm_id != only:
                continue
            if not m.usable or m.client is None:
                continue
            recs = await c.timed(m, m.client.audit_read(int(since.get(m.hsm_id, 0)), limit))
            for r in recs:
                out.append({"hsm_id": m.hsm_id, "seq": r.seq, "time_us": r.time_us,
                            "event": r.event, **{k: v for k, v in r.fields.items()
                                                 if k not in ("hsm_id", "seq")}})
        if only and only not in c.members:
            sup.member(only)
        out.sort(key=lambda r: (r["time_us"], r["hsm_id"], r["seq"]))
        return out

    # -- backups ---------------------------------------------------------------------------------
    async def backup_create(args: dict[str, Any], p: Progress) -> Any:
        from hsmsim.cluster.backup import create_backup
        return await create_backup(c, d.state, reason="manual", progress=p)

    async def backup_list(args: dict[str, Any], p: Progress) -> Any:
        from hsmsim.cluster.backup import list_backups
        return list_backups(d.state)

    async def backup_restore(args: dict[str, Any], p: Progress) -> Any:
        from hsmsim.cluster.backup import restore_backup
        return await restore_backup(c, d.state, _str(args, "backup_id"), _str(args, "target"),
                                    progress=p)

    return {
        "ping": ping, "status": status, "shutdown": shutdown, "inventory": inventory,
        "hsm.add": hsm_add, "hsm.remove": hsm_remove,
        "hsm.kill": simple(sup.kill, "killed"), "hsm.start": simple(sup.start_hsm, "started"),
        "hsm.pause": simple(sup.pause, "paused"), "hsm.resume": simple(sup.resume, "resumed"),
        "hsm.partition": simple(sup.partition, "partitioned"),
        "hsm.heal": simple(sup.heal, "healed"),
        "hsm.latency": hsm_latency, "hsm.throttle": hsm_throttle,
        "user.list": user_list, "user.create": user_create, "user.delete": user_delete,
        "user.change_password": user_change_password, "user.unlock": user_unlock,
        "key.list": key_list, "key.share": key_share, "key.unshare": key_unshare,
        "key.delete": key_delete,
        "audit.read": audit_read,
        "backup.create": backup_create, "backup.list": backup_list,
        "backup.restore": backup_restore,
    }


def _name(enum: Any, value: Any) -> str | None:
    if not isinstance(value, int):
        return None
    try:
        return str(enum(value).name)
    except ValueError:
        return hex(value)
