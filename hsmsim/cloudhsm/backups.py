"""The clusters' backups as the CloudHSMv2 API shows them: the backup files of every cluster
(`hsmsim.cluster.backup`), the cross-Region copies and the attributes AWS keeps beside them
(pending deletion, NeverExpires, tags) in the plane's record, the API view of one, and the
sweep that deletes backups whose 7 days of pending deletion or whose retention are over."""

from __future__ import annotations

from typing import Any

from hsmsim.cloudhsm import errors as e
from hsmsim.cloudhsm.plane import (ACCOUNT, DEFAULT_RETENTION_DAYS, PENDING_DELETION_DAYS, Plane,
                                   parse_utc, tag_list, ts)
from hsmsim.cluster.backup import list_backups


def all_backups(p: Plane) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for cid, rec in p.data["clusters"].items():
        for meta in list_backups(p.cluster_dir(cid)):
            if meta.get("state") == "CORRUPT":
                continue
            meta = dict(meta)
            meta["_region"], meta["_owner"] = rec["region"], cid
            try:  # `created` has whole seconds; the file's time orders backups of one second
                meta["_order"] = (p.cluster_dir(cid).backups / f"{meta['backup_id']}.json").stat().st_mtime_ns
            except OSError:
                meta["_order"] = 0
            out[str(meta["backup_id"])] = meta
    for bid, copy in p.data["copies"].items():
        src = out.get(str(copy["source_backup"]))
        if src is None:
            continue
        out[bid] = {**src, "backup_id": bid, "_region": copy["region"], "_copy": copy}
    return out


def backup_meta(p: Plane, bid: str) -> dict[str, Any] | None:
    return all_backups(p).get(bid)


def backup_state(p: Plane, bid: str) -> str:
    return "PENDING_DELETION" if p.data["backups"].get(bid, {}).get("deleted_at") else "READY"


def backup_view(p: Plane, meta: dict[str, Any]) -> dict[str, Any]:
    bid = str(meta["backup_id"])
    attrs = p.data["backups"].get(bid, {})
    copy = meta.get("_copy")
    deleted = attrs.get("deleted_at")
    view: dict[str, Any] = {
        "BackupId": bid, "BackupArn": f"arn:aws:cloudhsm:{meta['_region']}:{ACCOUNT}:backup/{bid}",
        "BackupState": backup_state(p, bid), "ClusterId": meta.get("cluster_id"),
        "CreateTimestamp": ts(parse_utc(str(meta.get("created", "")))),
        "NeverExpires": bool(attrs.get("never_expires", False)),
        "HsmType": meta.get("hsm_type"), "Mode": meta.get("mode"),
        # when the backup will be gone for good: 7 days after DeleteBackup
        "DeleteTimestamp": ts(float(deleted) + PENDING_DELETION_DAYS * 86400) if deleted else None,
        "TagList": tag_list(p.data["tags"].get(bid, {})) or None}
    if copy is not None:
        view.update({"CopyTimestamp": ts(float(copy["created"])), "SourceRegion": copy["source_region"],
                     "SourceBackup": copy["source_backup"], "SourceCluster": copy["source_cluster"]})
    return view


def backups_in(p: Plane, region: str) -> list[dict[str, Any]]:
    sweep(p)
    return [m for m in all_backups(p).values() if m["_region"] == region]


def backup(p: Plane, bid: str, region: str) -> dict[str, Any]:
    meta = backup_meta(p, bid)
    if meta is None or meta["_region"] != region:
        raise e.NotFound(f"Backup {bid} not found.")
    return meta


def sweep(p: Plane) -> list[str]:
    """Backups whose 7 days of pending deletion are over, and READY backups past their
    cluster's retention (never the cluster's newest, never one that NeverExpires), are
    deleted. Runs before every backup operation."""
    now = p.clock()
    gone = []
    metas = all_backups(p)
    newest: dict[str, str] = {}
    for bid, meta in sorted(metas.items(), key=lambda kv: (str(kv[1].get("created", "")),
                                                          kv[1].get("_order", 0))):
        if "_copy" not in meta:
            newest[str(meta["_owner"])] = bid
    for bid, meta in metas.items():
        attrs = p.data["backups"].get(bid, {})
        deleted = attrs.get("deleted_at")
        rec = p.data["clusters"].get(str(meta["_owner"]), {})
        if deleted is not None:
            expired = now >= float(deleted) + PENDING_DELETION_DAYS * 86400
        else:
            days = int(rec.get("retention", DEFAULT_RETENTION_DAYS))
            expired = (not attrs.get("never_expires") and newest.get(str(meta["_owner"])) != bid
                       and now >= parse_utc(str(meta.get("created", ""))) + days * 86400)
        if expired:
            _remove_backup(p, bid, meta)
            gone.append(bid)
    if gone:
        p.save()
    return gone


def _remove_backup(p: Plane, bid: str, meta: dict[str, Any]) -> None:
    if "_copy" in meta:
        p.data["copies"].pop(bid, None)
    else:
        backups = p.cluster_dir(str(meta["_owner"])).backups
        for suffix in (".bak", ".json"):
            (backups / f"{bid}{suffix}").unlink(missing_ok=True)
    p.data["backups"].pop(bid, None)
    p.data["tags"].pop(bid, None)
    for arn in [a for a in p.data["policies"] if a.endswith("/" + bid)]:
        p.data["policies"].pop(arn)
