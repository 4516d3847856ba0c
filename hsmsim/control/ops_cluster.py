"""The control operations on the cluster itself: ping, status, shutdown, inventory, adding,
removing and faulting HSMs, the audit log and backups."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from hsmsim.cluster.backup import create_backup, list_backups, restore_backup
from hsmsim.cluster.state import AZ_RE, MAX_HSMS
from hsmsim.cluster.supervisor import Supervisor
from hsmsim.control.context import ControlContext, Op, arg_int, arg_str
from hsmsim.control.protocol import ControlError
from hsmsim.control.server import Progress
from hsmsim.errors import HsmsimError
from hsmsim.node import direct_tls

log = logging.getLogger("hsmsim.control")

async def ping(ctx: ControlContext, args: dict[str, Any], p: Progress) -> Any:
    return {"pid": os.getpid(), "cluster_id": ctx.cluster.spec.cluster_id}


async def status(ctx: ControlContext, args: dict[str, Any], p: Progress) -> Any:
    c, sup = ctx.cluster, ctx.supervisor
    info = await c.info()
    hsms = []
    for m in c.members.values():
        s = m.status(c.held(m), c.sync_lag(m))
        hsms.append({"hsm_id": s.hsm_id, "az": s.az, "state": s.state,
                     "condition": s.condition, "pid": s.pid, "keys": s.keys,
                     "sync_lag": s.sync_lag, "last_error": s.last_error,
                     "restarts": s.restarts, "latency_ms": s.latency_ms,
                     "throttle_rps": s.throttle_rps,
                     "direct_address": direct_tls.read_address(m.dir)})
    return {"cluster_id": info.cluster_id, "state": info.state,
            "converging": sup.converging(), "objects": len(c.live_token_handles()),
            "hsms": hsms, "daemon_pid": os.getpid(), "endpoints": dict(ctx.endpoints),
            "warnings": ctx.warnings(),
            "settings": list(ctx.settings_rows),
            "key_availability_check": c.check_availability,
            "retry_mode": c.config.default_retry_mode}


async def shutdown(ctx: ControlContext, args: dict[str, Any], p: Progress) -> Any:
    asyncio.get_running_loop().call_later(0.05, ctx.stop)
    return {"stopping": True}


async def hsm_add(ctx: ControlContext, args: dict[str, Any], p: Progress) -> Any:
    c, sup = ctx.cluster, ctx.supervisor
    az = arg_str(args, "az")
    if not AZ_RE.match(az):
        raise ControlError(f"{az!r} is not an availability zone name like us-east-1a",
                           "arguments")
    if len(c.members) >= MAX_HSMS:
        raise ControlError(f"a cluster holds at most {MAX_HSMS} HSMs", "ClusterOpError")
    await create_backup(c, ctx.state, reason="hsm add", progress=None)
    hsm_id = await sup.add_hsm(az, p)
    return {"hsm_id": hsm_id, "az": az}


async def hsm_remove(ctx: ControlContext, args: dict[str, Any], p: Progress) -> Any:
    c, sup = ctx.cluster, ctx.supervisor
    hsm_id = arg_str(args, "hsm_id")
    sup.member(hsm_id)
    await sup.remove_hsm(hsm_id)
    # CloudHSM backs a cluster up when an HSM leaves it; taken after the removal so that the
    # backup's AZs (what a restore recreates) are the cluster's from now on.
    # FIDELITY: a failed backup fails the call (CloudHSM's are made in the background, and
    # DeleteHsm does not report them); the HSM stays removed, and the error says so.
    try:
        await create_backup(c, ctx.state, reason="hsm remove", progress=None)
    except (HsmsimError, OSError) as exc:
        log.warning("the backup after removing %s failed: %s", hsm_id, exc)
        raise ControlError(f"{hsm_id} was removed, but the backup taken on removal failed: "
                           f"{exc}; take one with `hsmsim backup create` once that is fixed",
                           "BackupError") from None
    return {"hsm_id": hsm_id, "state": "DELETED"}


def hsm_action(action: Callable[[Supervisor, str], Awaitable[None]], word: str) -> Op:
    """An operation that applies one supervisor action (kill, pause, ...) to one HSM."""
    async def op(ctx: ControlContext, args: dict[str, Any], p: Progress) -> Any:
        hsm_id = arg_str(args, "hsm_id")
        await action(ctx.supervisor, hsm_id)
        return {"hsm_id": hsm_id, "done": word}
    return op


async def hsm_latency(ctx: ControlContext, args: dict[str, Any], p: Progress) -> Any:
    hsm_id = arg_str(args, "hsm_id")
    ms = arg_int(args, "ms", 0, 600_000)
    return await ctx.supervisor.set_fault(hsm_id, latency_ms=ms)


async def hsm_throttle(ctx: ControlContext, args: dict[str, Any], p: Progress) -> Any:
    hsm_id = arg_str(args, "hsm_id")
    rps = arg_int(args, "rps", 0, 1_000_000)
    return await ctx.supervisor.set_fault(hsm_id, throttle_rps=rps)


async def inventory(ctx: ControlContext, args: dict[str, Any], p: Progress) -> Any:
    c = ctx.cluster
    out: dict[str, Any] = {}
    for m in c.usable():
        inv = await c.pool.timed(m, m.connection().inventory(), timeout=30)
        out[m.hsm_id] = {str(e.handle): e.fingerprint.hex() for e in inv}
    return {"hsms": out, "tombstones": c.directory.tombstone_count(),
            "live": sorted(c.live_token_handles())}


async def audit_read(ctx: ControlContext, args: dict[str, Any], p: Progress) -> Any:
    c, sup = ctx.cluster, ctx.supervisor
    only = args.get("hsm_id")
    if only is not None and not isinstance(only, str):
        raise ControlError("`hsm_id` must be a string", "arguments")
    since = args.get("since") or {}
    if not isinstance(since, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
            for k, v in since.items()):
        raise ControlError("`since` must map HSM ids to sequence numbers", "arguments")
    limit = arg_int(args, "limit", 1, 100_000) if "limit" in args else 1000
    out = []
    for m in c.members.values():
        if only and m.hsm_id != only:
            continue
        if not m.usable or m.client is None:
            continue
        recs = await c.pool.timed(m, m.client.audit_read(int(since.get(m.hsm_id, 0)), limit))
        for r in recs:
            out.append({"hsm_id": m.hsm_id, "seq": r.seq, "time_us": r.time_us,
                        "event": r.event, **{k: v for k, v in r.fields.items()
                                             if k not in ("hsm_id", "seq")}})
    if only and only not in c.members:
        sup.member(only)
    out.sort(key=lambda r: (r["time_us"], r["hsm_id"], r["seq"]))
    return out


async def backup_create(ctx: ControlContext, args: dict[str, Any], p: Progress) -> Any:
    return await create_backup(ctx.cluster, ctx.state, reason="manual", progress=p)


async def backup_list(ctx: ControlContext, args: dict[str, Any], p: Progress) -> Any:
    return list_backups(ctx.state)


async def backup_restore(ctx: ControlContext, args: dict[str, Any], p: Progress) -> Any:
    return await restore_backup(ctx.cluster, ctx.state, arg_str(args, "backup_id"),
                                arg_str(args, "target"), progress=p)


OPS: dict[str, Op] = {
    "ping": ping, "status": status, "shutdown": shutdown, "inventory": inventory,
    "hsm.add": hsm_add, "hsm.remove": hsm_remove,
    "hsm.kill": hsm_action(Supervisor.kill, "killed"),
    "hsm.start": hsm_action(Supervisor.start_hsm, "started"),
    "hsm.pause": hsm_action(Supervisor.pause, "paused"),
    "hsm.resume": hsm_action(Supervisor.resume, "resumed"),
    "hsm.partition": hsm_action(Supervisor.partition, "partitioned"),
    "hsm.heal": hsm_action(Supervisor.heal, "healed"),
    "hsm.latency": hsm_latency, "hsm.throttle": hsm_throttle,
    "audit.read": audit_read,
    "backup.create": backup_create, "backup.list": backup_list,
    "backup.restore": backup_restore,
}
