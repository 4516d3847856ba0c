"""The 18 CloudHSMv2 operations, one handler each: validated input in, output dict out, domain
errors (`hsmsim.cloudhsm.errors`) raised. Each acts on the `Plane` for the request's Region."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from hsmsim.cloudhsm import backups, lifecycle
from hsmsim.cloudhsm import errors as e
from hsmsim.cloudhsm.plane import ACCOUNT, MAX_TAGS, Plane, page

Handler = Callable[[Plane, str, dict[str, Any]], Awaitable[dict[str, Any]]]


def _tags(items: list[dict[str, str]] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for t in items or ():
        if t["Key"].startswith("aws:"):
            raise e.TagError("Tag keys starting with 'aws:' are reserved.")
        out[t["Key"]] = t["Value"]
    return out


def _retention(policy: dict[str, str] | None) -> str | None:
    if policy is None:
        return None
    if policy.get("Type", "DAYS") != "DAYS" or "Value" not in policy:
        raise e.InvalidRequest("BackupRetentionPolicy needs Type DAYS and a Value.")
    days = int(policy["Value"])
    if not 7 <= days <= 379:
        raise e.InvalidRequest("The backup retention period must be between 7 and 379 days.")
    return str(days)


def _filters(given: dict[str, list[str]] | None, allowed: tuple[str, ...]) -> dict[str, list[str]]:
    for k in given or {}:
        if k not in allowed:
            raise e.InvalidRequest(f"Invalid filter {k}; valid filters are {', '.join(allowed)}.")
    return dict(given or {})


async def describe_clusters(p: Plane, region: str, a: dict[str, Any]) -> dict[str, Any]:
    f = _filters(a.get("Filters"), ("clusterIds", "vpcIds", "states"))
    views = [p.describe(cid) for cid in p.clusters_in(region)]
    if "clusterIds" in f:
        views = [v for v in views if v["ClusterId"] in f["clusterIds"]]
    if "vpcIds" in f:
        views = [v for v in views if v["VpcId"] in f["vpcIds"]]
    if "states" in f:
        views = [v for v in views if v["State"] in f["states"]]
    items, nxt = page(views, a.get("NextToken"), a.get("MaxResults", 25), "clusters")
    return {"Clusters": items, "NextToken": nxt}


async def create_cluster(p: Plane, region: str, a: dict[str, Any]) -> dict[str, Any]:
    tags = _tags(a.get("TagList"))
    if len(tags) > MAX_TAGS:
        raise e.TagError(f"A resource has at most {MAX_TAGS} tags.")
    async with p.lock:
        cid = lifecycle.create_cluster(p, region, a["HsmType"], a["SubnetIds"], a.get("Mode", "FIPS"),
                               a.get("NetworkType", "IPV4"), _retention(a.get("BackupRetentionPolicy")),
                               a.get("SourceBackupId"), tags)
    return {"Cluster": p.describe(cid)}


async def create_hsm(p: Plane, region: str, a: dict[str, Any]) -> dict[str, Any]:
    # FIDELITY: IpAddress is accepted and ignored: the HSM's address is its node's listener.
    async with p.lock:
        return {"Hsm": await lifecycle.create_hsm(p, a["ClusterId"], region, a["AvailabilityZone"])}


async def delete_hsm(p: Plane, region: str, a: dict[str, Any]) -> dict[str, Any]:
    async with p.lock:
        return {"HsmId": await lifecycle.delete_hsm(p, a["ClusterId"], region, a.get("HsmId"), a.get("EniId"),
                                            a.get("EniIp"))}


async def initialize_cluster(p: Plane, region: str, a: dict[str, Any]) -> dict[str, Any]:
    async with p.lock:
        state = await lifecycle.initialize(p, a["ClusterId"], region, a["SignedCert"], a["TrustAnchor"])
    return {"State": state, "StateMessage": "Cluster is initializing."}


async def delete_cluster(p: Plane, region: str, a: dict[str, Any]) -> dict[str, Any]:
    async with p.lock:
        return {"Cluster": await lifecycle.delete_cluster(p, a["ClusterId"], region)}


async def modify_cluster(p: Plane, region: str, a: dict[str, Any]) -> dict[str, Any]:
    cid = a["ClusterId"]
    async with p.lock:
        rec = p.record(cid, region)
        if rec["phase"] == "DELETED":
            raise e.InvalidRequest(f"Cluster {cid} is deleted.")
        days = _retention(a.get("BackupRetentionPolicy"))
        hsm_type = a.get("HsmType")
        if days is None and hsm_type is None:
            raise e.InvalidRequest("Specify BackupRetentionPolicy or HsmType.")
        if hsm_type is not None:
            if hsm_type not in ("hsm1.medium", "hsm2m.medium"):
                raise e.InvalidRequest(f"HsmType {hsm_type} is not supported.")
            # FIDELITY: the type is recorded; the HSMs are the same node processes either way
            rec["hsm_type"] = hsm_type
        if days is not None:
            rec["retention"] = days
        p.save()
    return {"Cluster": p.describe(cid)}


# -- backups ---------------------------------------------------------------------------------------
async def describe_backups(p: Plane, region: str, a: dict[str, Any]) -> dict[str, Any]:
    f = _filters(a.get("Filters"), ("backupIds", "sourceBackupIds", "clusterIds", "states", "neverExpires"))
    metas = sorted(backups.backups_in(p, region), key=lambda m: (str(m.get("created", "")), m.get("_order", 0),
                                                        "_copy" in m, str(m["backup_id"])))
    if not a.get("SortAscending", False):
        metas.reverse()
    views = [backups.backup_view(p, m) for m in metas]
    if "backupIds" in f:
        views = [v for v in views if v["BackupId"] in f["backupIds"]]
    if "sourceBackupIds" in f:
        views = [v for v in views if v.get("SourceBackup") in f["sourceBackupIds"]]
    if "clusterIds" in f:
        views = [v for v in views if v["ClusterId"] in f["clusterIds"]]
    if "states" in f:
        views = [v for v in views if v["BackupState"] in f["states"]]
    if "neverExpires" in f:
        want = {x.lower() == "true" for x in f["neverExpires"]}
        views = [v for v in views if v["NeverExpires"] in want]
    items, nxt = page(views, a.get("NextToken"), a.get("MaxResults", 50), "backups")
    return {"Backups": items, "NextToken": nxt}


async def delete_backup(p: Plane, region: str, a: dict[str, Any]) -> dict[str, Any]:
    bid = a["BackupId"]
    async with p.lock:
        backups.sweep(p)
        meta = backups.backup(p, bid, region)
        if backups.backup_state(p, bid) != "READY":
            raise e.InvalidRequest(f"Backup {bid} is already pending deletion.")
        p.data["backups"].setdefault(bid, {})["deleted_at"] = p.clock()
        p.save()
        return {"Backup": backups.backup_view(p, meta)}


async def restore_backup(p: Plane, region: str, a: dict[str, Any]) -> dict[str, Any]:
    bid = a["BackupId"]
    async with p.lock:
        backups.sweep(p)
        meta = backups.backup(p, bid, region)
        if backups.backup_state(p, bid) != "PENDING_DELETION":
            raise e.InvalidRequest(f"Backup {bid} is not pending deletion.")
        p.data["backups"][bid].pop("deleted_at", None)
        p.save()
        return {"Backup": backups.backup_view(p, meta)}


async def modify_backup_attributes(p: Plane, region: str, a: dict[str, Any]) -> dict[str, Any]:
    bid = a["BackupId"]
    async with p.lock:
        backups.sweep(p)
        meta = backups.backup(p, bid, region)
        p.data["backups"].setdefault(bid, {})["never_expires"] = bool(a["NeverExpires"])
        p.save()
        return {"Backup": backups.backup_view(p, meta)}


async def copy_backup_to_region(p: Plane, region: str, a: dict[str, Any]) -> dict[str, Any]:
    bid, dest = a["BackupId"], a["DestinationRegion"]
    async with p.lock:
        backups.sweep(p)
        meta = backups.backup(p, bid, region)
        if dest == region:
            raise e.InvalidRequest("DestinationRegion must differ from the backup's Region.")
        if backups.backup_state(p, bid) != "READY":
            raise e.InvalidRequest(f"Backup {bid} is not READY.")
        from hsmsim.cluster.state import new_id
        copy_id = new_id("backup-")
        source = str(meta.get("_copy", {}).get("source_backup", bid))
        # FIDELITY: the copy is a record pointing at the source's file on this machine; both
        # Regions are served by this endpoint
        p.data["copies"][copy_id] = {"source_backup": source, "source_region": region,
                                     "source_cluster": meta.get("cluster_id"), "region": dest,
                                     "created": p.clock()}
        tags = _tags(a.get("TagList")) if a.get("TagList") is not None else dict(p.data["tags"].get(bid, {}))
        if tags:
            p.data["tags"][copy_id] = tags
        p.save()
        return {"DestinationBackup": {"CreateTimestamp": backups.backup_view(p, meta)["CreateTimestamp"],
                                      "SourceRegion": region, "SourceBackup": bid,
                                      "SourceCluster": meta.get("cluster_id")}}


# -- tags --------------------------------------------------------------------------------------------
def _resource(p: Plane, rid: str, region: str) -> None:
    if rid.startswith("cluster-"):
        p.record(rid, region)
    else:
        backups.backup(p, rid, region)


async def tag_resource(p: Plane, region: str, a: dict[str, Any]) -> dict[str, Any]:
    rid = a["ResourceId"]
    async with p.lock:
        _resource(p, rid, region)
        tags = {**p.data["tags"].get(rid, {}), **_tags(a["TagList"])}
        if len(tags) > MAX_TAGS:
            raise e.LimitExceeded(f"A resource has at most {MAX_TAGS} tags.")
        p.data["tags"][rid] = tags
        p.save()
    return {}


async def untag_resource(p: Plane, region: str, a: dict[str, Any]) -> dict[str, Any]:
    rid = a["ResourceId"]
    async with p.lock:
        _resource(p, rid, region)
        tags = p.data["tags"].get(rid, {})
        for k in a["TagKeyList"]:
            tags.pop(k, None)
        if tags:
            p.data["tags"][rid] = tags
        else:
            p.data["tags"].pop(rid, None)
        p.save()
    return {}


async def list_tags(p: Plane, region: str, a: dict[str, Any]) -> dict[str, Any]:
    rid = a["ResourceId"]
    _resource(p, rid, region)
    items = [{"Key": k, "Value": v} for k, v in sorted(p.data["tags"].get(rid, {}).items())]
    got, nxt = page(items, a.get("NextToken"), a.get("MaxResults", 100), "tags:" + rid)
    return {"TagList": got, "NextToken": nxt}


# -- resource policies ---------------------------------------------------------------------------------
def _policy_target(p: Plane, arn: str | None, region: str) -> str:
    if not arn:
        raise e.InvalidRequest("ResourceArn is required.")
    parts = arn.split(":")
    if parts[3] != region or parts[4] != ACCOUNT:
        raise e.NotFound(f"Resource {arn} not found.")
    kind, _, rid = parts[5].partition("/")
    if kind != "backup":
        # CloudHSM shares backups only (AWS RAM); clusters and HSMs take no resource policy
        raise e.InvalidRequest("Resource policies can be attached to backups only.")
    backups.backup(p, rid, region)
    return arn


async def put_resource_policy(p: Plane, region: str, a: dict[str, Any]) -> dict[str, Any]:
    async with p.lock:
        arn = _policy_target(p, a.get("ResourceArn"), region)
        policy = a.get("Policy")
        try:
            doc = json.loads(policy or "")
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or not isinstance(doc.get("Statement"), (list, dict)):
            raise e.InvalidRequest("Policy must be a JSON policy document with a Statement.")
        p.data["policies"][arn] = policy
        p.save()
    return {"ResourceArn": arn, "Policy": policy}


async def get_resource_policy(p: Plane, region: str, a: dict[str, Any]) -> dict[str, Any]:
    arn = _policy_target(p, a.get("ResourceArn"), region)
    return {"Policy": p.data["policies"].get(arn)}


async def delete_resource_policy(p: Plane, region: str, a: dict[str, Any]) -> dict[str, Any]:
    async with p.lock:
        arn = _policy_target(p, a.get("ResourceArn"), region)
        policy = p.data["policies"].pop(arn, None)
        if policy is None:
            raise e.NotFound(f"No resource policy is attached to {arn}.")
        p.save()
    return {"ResourceArn": arn, "Policy": policy}


HANDLERS: dict[str, Handler] = {
    "CopyBackupToRegion": copy_backup_to_region, "CreateCluster": create_cluster,
    "CreateHsm": create_hsm, "DeleteBackup": delete_backup, "DeleteCluster": delete_cluster,
    "DeleteHsm": delete_hsm, "DeleteResourcePolicy": delete_resource_policy,
    "DescribeBackups": describe_backups, "DescribeClusters": describe_clusters,
    "GetResourcePolicy": get_resource_policy, "InitializeCluster": initialize_cluster,
    "ListTags": list_tags, "ModifyBackupAttributes": modify_backup_attributes,
    "ModifyCluster": modify_cluster, "PutResourcePolicy": put_resource_policy,
    "RestoreBackup": restore_backup, "TagResource": tag_resource, "UntagResource": untag_resource,
}
