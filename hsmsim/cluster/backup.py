"""Cluster backups: a consistent snapshot of one in-sync HSM's masked objects and masked users,
encrypted at rest (AES-256-GCM under the cluster's backup key), listed with metadata, and
restored into a new cluster directory whose HSMs receive the masking key by cloning."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hsmsim import files
from hsmsim.cluster.cluster import Cluster
from hsmsim.cluster.journal import HandleAllocator
from hsmsim.cluster.members import Member
from hsmsim.cluster.state import (ClusterSpec, StateDir, discard_new_cluster,
                                  finish_new_cluster, new_id, prepare_new_cluster, utcnow)
from hsmsim.errors import HsmsimError

ProgressFn = Callable[[int, int, str], Awaitable[None]]
MAGIC = b"HSMSIM-BACKUP-1\n"


class BackupError(HsmsimError):
    """A backup cannot be made, found, decrypted or restored."""


def _key(state: StateDir) -> bytes:
    raw = state.read_secret(state.backup_key)
    try:
        key = bytes.fromhex(raw)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise BackupError(f"{state.backup_key} is corrupt")
    return key


def _paths(state: StateDir, backup_id: str) -> tuple[Path, Path]:
    if not backup_id.startswith("backup-") or not backup_id[7:].isalnum():
        raise BackupError(f"{backup_id!r} is not a backup id (backup-XXXXXXXXXXX)")
    return state.backups / f"{backup_id}.bak", state.backups / f"{backup_id}.json"


async def create_backup(c: Cluster, state: StateDir, reason: str,
                        progress: ProgressFn | None) -> dict[str, Any]:
    """Snapshot one in-sync HSM: every live token object as a masked blob, and the users.
    FIDELITY: CloudHSM encrypts backups under an ephemeral key wrapped by a persistent backup
    key derived in the HSM, then KMS; here the file is AES-256-GCM under STATE/secrets/backup.key
    and its objects stay masked under the cluster's masking key."""
    sources = [m for m in c.routable()] or c.usable()
    if not sources:
        raise BackupError("no healthy HSM to take the backup from")
    src = sources[0]
    client = src.connection()
    inv = await c.pool.timed(src, client.inventory(), timeout=60)
    handles = [e.handle for e in inv if not c.directory.is_tombstoned(e.handle)]
    users = await c.pool.timed(src, client.export_users())
    blobs: list[bytes] = []
    for i, h in enumerate(handles, 1):
        blobs.append(await c.pool.timed(src, client.export_masked(h)))
        if progress is not None and (i % 20 == 0 or i == len(handles)):
            await progress(i, len(handles), "backing up")
    backup_id = new_id("backup-")
    meta = {"backup_id": backup_id, "cluster_id": c.spec.cluster_id, "state": "READY",
            "created": utcnow(), "objects": len(blobs), "users": "included", "reason": reason,
            "source_hsm": src.hsm_id, "hsm_type": c.spec.hsm_type, "mode": c.spec.mode,
            "azs": [h.az for h in c.spec.hsms], "max_handle": max(handles, default=0)}
    payload = msgpack.packb({"meta": meta, "users": users, "objects": blobs}, use_bin_type=True)
    nonce = os.urandom(12)
    ct = AESGCM(_key(state)).encrypt(nonce, payload, backup_id.encode())
    data_path, meta_path = _paths(state, backup_id)
    files.make_dir(state.backups, parents=False)
    files.atomic_write(data_path, MAGIC + nonce + ct, mode=0o600)
    files.atomic_write(meta_path, (json.dumps(meta, indent=2) + "\n").encode(), mode=0o600)
    return meta


def list_backups(state: StateDir) -> list[dict[str, Any]]:
    out = []
    if state.backups.is_dir():
        for p in sorted(state.backups.glob("backup-*.json")):
            try:
                out.append(json.loads(p.read_text()))
            except (OSError, ValueError):
                out.append({"backup_id": p.stem, "state": "CORRUPT"})
    return sorted(out, key=lambda m: str(m.get("created", "")))


def read_backup(state: StateDir, backup_id: str) -> dict[str, Any]:
    data_path, _ = _paths(state, backup_id)
    try:
        raw = data_path.read_bytes()
    except FileNotFoundError:
        raise BackupError(f"no backup {backup_id} in {state.backups}") from None
    if not raw.startswith(MAGIC) or len(raw) < len(MAGIC) + 12 + 16:
        raise BackupError(f"{data_path} is not an hsmsim backup")
    body = raw[len(MAGIC):]
    try:
        payload = AESGCM(_key(state)).decrypt(body[:12], body[12:], backup_id.encode())
    except Exception:
        raise BackupError(f"backup {backup_id} is corrupt or was tampered with") from None
    obj = msgpack.unpackb(payload, raw=False)
    if not isinstance(obj, dict) or "objects" not in obj:
        raise BackupError(f"backup {backup_id} is corrupt")
    return obj


async def restore_backup(c: Cluster, state: StateDir, backup_id: str, target: str,
                         progress: ProgressFn | None) -> dict[str, Any]:
    """A new cluster in `target` from a backup: same users and keys (same handles), new
    cluster id, CA and cluster secret. Its HSMs get the masking key by cloning from this
    cluster. FIDELITY: CloudHSM restores onto any HSM of the same manufacturer; here the source
    cluster's daemon must be running, because only its HSMs can hand over the masking key."""
    backup = read_backup(state, backup_id)
    sources = c.routable() or c.usable()
    if not sources:
        raise BackupError("no healthy HSM of this cluster to hand over the masking key")
    tstate = StateDir(Path(target).absolute())
    if tstate.exists() or (tstate.root.exists() and any(tstate.root.iterdir())):
        raise BackupError(f"{tstate.root} is not empty; restore needs a new directory")
    meta = backup["meta"]
    azs = [str(a) for a in meta.get("azs") or ["us-east-1a", "us-east-1b", "us-east-1c"]]
    new = prepare_new_cluster(tstate, azs, 1, state.read_secret(state.admin_password),
                              state.read_secret(state.cu_password))
    spec = ClusterSpec(new.spec.cluster_id, new.spec.hsms, new.spec.created, meta.get("hsm_type",
                       "hsm2m.medium"), meta.get("mode", "FIPS"), backup_id)
    files.atomic_write(tstate.init_marker, spec.to_json())
    members = [Member(h.hsm_id, h.az, tstate) for h in spec.hsms]
    objects: list[bytes] = list(backup["objects"])
    total = len(objects) * len(members)
    done = 0
    try:
        await asyncio.gather(*(m.spawn("clone", c.config.node_start_timeout_s) for m in members))
        src = sources[0]
        assert src.client is not None
        for m in members:
            assert m.client is not None
            offer = await m.client.clone_offer()
            await m.client.clone_accept(await src.client.clone_export(offer))
            await m.client.import_users(bytes(backup["users"]))
        sem = asyncio.Semaphore(16)

        async def put(m: Member, blob: bytes) -> None:
            nonlocal done
            async with sem:
                assert m.client is not None
                await m.client.import_masked(blob)
                done += 1
                if progress is not None and (done % 20 == 0 or done == total):
                    await progress(done, total, "restoring")
        await asyncio.gather(*(put(m, b) for m in members for b in objects))
        HandleAllocator(tstate.handles).bump_past(int(meta.get("max_handle", 0)))
    except BaseException as exc:
        await asyncio.gather(*(m.terminate() for m in members), return_exceptions=True)
        discard_new_cluster(tstate, new.created_root)
        if isinstance(exc, HsmsimError):
            raise BackupError(f"restore failed: {exc}") from None
        raise
    await asyncio.gather(*(m.terminate() for m in members), return_exceptions=True)
    finish_new_cluster(tstate, spec)
    return {"backup_id": backup_id, "cluster_id": spec.cluster_id, "state_dir": str(tstate.root),
            "objects": len(objects), "hsms": [h.hsm_id for h in spec.hsms]}


def expire_backups(state: StateDir, retention_days: int) -> list[str]:
    """Delete backups older than the retention period, never the newest one."""
    import datetime as dt
    backups = list_backups(state)
    if len(backups) <= 1:
        return []
    cutoff = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=retention_days)
    gone = []
    for meta in backups[:-1]:
        try:
            created = dt.datetime.strptime(str(meta["created"]), "%Y-%m-%dT%H:%M:%SZ").replace(
                tzinfo=dt.timezone.utc)
        except (KeyError, ValueError):
            continue
        if created < cutoff:
            for p in _paths(state, str(meta["backup_id"])):
                p.unlink(missing_ok=True)
            gone.append(str(meta["backup_id"]))
    return gone


async def backup_loop(c: Cluster, state: StateDir, interval_h: float, retention_days: int) -> None:
    """The periodic backup (CloudHSM: at least once every 24 hours) and retention."""
    import logging
    log = logging.getLogger("hsmsim.cluster")
    while True:
        await asyncio.sleep(interval_h * 3600)
        try:
            meta = await create_backup(c, state, reason="periodic", progress=None)
            log.info("periodic backup %s: %d objects", meta["backup_id"], meta["objects"])
            expire_backups(state, retention_days)
        except Exception as exc:  # keep trying next period
            log.warning("periodic backup failed: %s", exc)
