"""The 18 CloudHSMv2 operations, one handler each: the operation's typed input in (the generated
frozen dataclass of `hsmsim.cloudhsm.inputs`, snake_case fields, built from the validated
request), output dict out (wire member names: the output is encoded as it is), domain errors
(`hsmsim.cloudhsm.errors`) raised. Each acts on the `Plane` for the request's Region."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from hsmsim.cloudhsm import backups, lifecycle
from hsmsim.cloudhsm import errors as e
from hsmsim.cloudhsm import inputs as i
from hsmsim.cloudhsm.plane import ACCOUNT, MAX_TAGS, Plane, page

In = TypeVar("In")
Response = dict[str, Any]


@dataclass(frozen=True)
class Handler(Generic[In]):
    """One operation: the generated class of its input and the coroutine serving it (plane,
    Region, input). Built as `Handler(i.CreateHsmRequest, create_hsm)`, so mypy checks that
    they agree."""

    input: type[In]
    run: Callable[[Plane, str, In], Awaitable[Response]]


def _tags(items: tuple[i.Tag, ...] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for t in items or ():
        if t.key.startswith("aws:"):
            raise e.TagError("Tag keys starting with 'aws:' are reserved.")
        out[t.key] = t.value
    return out


def _retention(policy: i.BackupRetentionPolicy | None) -> str | None:
    if policy is None:
        return None
    if (policy.type or "DAYS") != "DAYS" or policy.value is None:
        raise e.InvalidRequest("BackupRetentionPolicy needs Type DAYS and a Value.")
    days = int(policy.value)
    if not 7 <= days <= 379:
        raise e.InvalidRequest("The backup retention period must be between 7 and 379 days.")
    return str(days)


def _filters(given: Mapping[str, tuple[str, ...]] | None,
             allowed: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    for k in given or {}:
        if k not in allowed:
            raise e.InvalidRequest(f"Invalid filter {k}; valid filters are {', '.join(allowed)}.")
    return dict(given or {})


def _size(given: int | None, default: int) -> int:
    return default if given is None else given


async def describe_clusters(p: Plane, region: str, a: i.DescribeClustersRequest) -> Response:
    f = _filters(a.filters, ("clusterIds", "vpcIds", "states"))
    views = [p.describe(cid) for cid in p.clusters_in(region)]
    if "clusterIds" in f:
        views = [v for v in views if v["ClusterId"] in f["clusterIds"]]
    if "vpcIds" in f:
        views = [v for v in views if v["VpcId"] in f["vpcIds"]]
    if "states" in f:
        views = [v for v in views if v["State"] in f["states"]]
    items, nxt = page(views, a.next_token, _size(a.max_results, 25), "clusters")
    return {"Clusters": items, "NextToken": nxt}


async def create_cluster(p: Plane, region: str, a: i.CreateClusterRequest) -> Response:
    tags = _tags(a.tag_list)
    if len(tags) > MAX_TAGS:
        raise e.TagError(f"A resource has at most {MAX_TAGS} tags.")
    async with p.lock:
        cid = lifecycle.create_cluster(p, region, a.hsm_type, list(a.subnet_ids), a.mode or "FIPS",
                                       a.network_type or "IPV4", _retention(a.backup_retention_policy),
                                       a.source_backup_id, tags)
    return {"Cluster": p.describe(cid)}


async def create_hsm(p: Plane, region: str, a: i.CreateHsmRequest) -> Response:
    # FIDELITY: IpAddress is accepted and ignored: the HSM's address is its node's listener.
    async with p.lock:
        return {"Hsm": await lifecycle.create_hsm(p, a.cluster_id, region, a.availability_zone)}


async def delete_hsm(p: Plane, region: str, a: i.DeleteHsmRequest) -> Response:
    async with p.lock:
        return {"HsmId": await lifecycle.delete_hsm(p, a.cluster_id, region, a.hsm_id, a.eni_id, a.eni_ip)}


async def initialize_cluster(p: Plane, region: str, a: i.InitializeClusterRequest) -> Response:
    async with p.lock:
        state = await lifecycle.initialize(p, a.cluster_id, region, a.signed_cert, a.trust_anchor)
    return {"State": state, "StateMessage": "Cluster is initializing."}


async def delete_cluster(p: Plane, region: str, a: i.DeleteClusterRequest) -> Response:
    async with p.lock:
        return {"Cluster": await lifecycle.delete_cluster(p, a.cluster_id, region)}


async def modify_cluster(p: Plane, region: str, a: i.ModifyClusterRequest) -> Response:
    cid = a.cluster_id
    async with p.lock:
        rec = p.record(cid, region)
        if rec["phase"] == "DELETED":
            raise e.InvalidRequest(f"Cluster {cid} is deleted.")
        days = _retention(a.backup_retention_policy)
        hsm_type = a.hsm_type
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
async def describe_backups(p: Plane, region: str, a: i.DescribeBackupsRequest) -> Response:
    f = _filters(a.filters, ("backupIds", "sourceBackupIds", "clusterIds", "states", "neverExpires"))
    metas = sorted(backups.backups_in(p, region), key=lambda m: (str(m.get("created", "")), m.get("_order", 0),
                                                        "_copy" in m, str(m["backup_id"])))
    if not a.sort_ascending:
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
    items, nxt = page(views, a.next_token, _size(a.max_results, 50), "backups")
    return {"Backups": items, "NextToken": nxt}


async def delete_backup(p: Plane, region: str, a: i.DeleteBackupRequest) -> Response:
    bid = a.backup_id
    async with p.lock:
        backups.sweep(p)
        meta = backups.backup(p, bid, region)
        if backups.backup_state(p, bid) != "READY":
            raise e.InvalidRequest(f"Backup {bid} is already pending deletion.")
        p.data["backups"].setdefault(bid, {})["deleted_at"] = p.clock()
        p.save()
        return {"Backup": backups.backup_view(p, meta)}


async def restore_backup(p: Plane, region: str, a: i.RestoreBackupRequest) -> Response:
    bid = a.backup_id
    async with p.lock:
        backups.sweep(p)
        meta = backups.backup(p, bid, region)
        if backups.backup_state(p, bid) != "PENDING_DELETION":
            raise e.InvalidRequest(f"Backup {bid} is not pending deletion.")
        p.data["backups"][bid].pop("deleted_at", None)
        p.save()
        return {"Backup": backups.backup_view(p, meta)}


async def modify_backup_attributes(p: Plane, region: str, a: i.ModifyBackupAttributesRequest) -> Response:
    bid = a.backup_id
    async with p.lock:
        backups.sweep(p)
        meta = backups.backup(p, bid, region)
        p.data["backups"].setdefault(bid, {})["never_expires"] = bool(a.never_expires)
        p.save()
        return {"Backup": backups.backup_view(p, meta)}


async def copy_backup_to_region(p: Plane, region: str, a: i.CopyBackupToRegionRequest) -> Response:
    bid, dest = a.backup_id, a.destination_region
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
        tags = _tags(a.tag_list) if a.tag_list is not None else dict(p.data["tags"].get(bid, {}))
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


async def tag_resource(p: Plane, region: str, a: i.TagResourceRequest) -> Response:
    rid = a.resource_id
    async with p.lock:
        _resource(p, rid, region)
        tags = {**p.data["tags"].get(rid, {}), **_tags(a.tag_list)}
        if len(tags) > MAX_TAGS:
            raise e.LimitExceeded(f"A resource has at most {MAX_TAGS} tags.")
        p.data["tags"][rid] = tags
        p.save()
    return {}


async def untag_resource(p: Plane, region: str, a: i.UntagResourceRequest) -> Response:
    rid = a.resource_id
    async with p.lock:
        _resource(p, rid, region)
        tags = p.data["tags"].get(rid, {})
        for k in a.tag_key_list:
            tags.pop(k, None)
        if tags:
            p.data["tags"][rid] = tags
        else:
            p.data["tags"].pop(rid, None)
        p.save()
    return {}


async def list_tags(p: Plane, region: str, a: i.ListTagsRequest) -> Response:
    rid = a.resource_id
    _resource(p, rid, region)
    items = [{"Key": k, "Value": v} for k, v in sorted(p.data["tags"].get(rid, {}).items())]
    got, nxt = page(items, a.next_token, _size(a.max_results, 100), "tags:" + rid)
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


async def put_resource_policy(p: Plane, region: str, a: i.PutResourcePolicyRequest) -> Response:
    async with p.lock:
        arn = _policy_target(p, a.resource_arn, region)
        policy = a.policy
        try:
            doc = json.loads(policy or "")
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or not isinstance(doc.get("Statement"), (list, dict)):
            raise e.InvalidRequest("Policy must be a JSON policy document with a Statement.")
        p.data["policies"][arn] = policy
        p.save()
    return {"ResourceArn": arn, "Policy": policy}


async def get_resource_policy(p: Plane, region: str, a: i.GetResourcePolicyRequest) -> Response:
    arn = _policy_target(p, a.resource_arn, region)
    return {"Policy": p.data["policies"].get(arn)}


async def delete_resource_policy(p: Plane, region: str, a: i.DeleteResourcePolicyRequest) -> Response:
    async with p.lock:
        arn = _policy_target(p, a.resource_arn, region)
        policy = p.data["policies"].pop(arn, None)
        if policy is None:
            raise e.NotFound(f"No resource policy is attached to {arn}.")
        p.save()
    return {"ResourceArn": arn, "Policy": policy}


HANDLERS: dict[str, Handler[Any]] = {
    "CopyBackupToRegion": Handler(i.CopyBackupToRegionRequest, copy_backup_to_region),
    "CreateCluster": Handler(i.CreateClusterRequest, create_cluster),
    "CreateHsm": Handler(i.CreateHsmRequest, create_hsm),
    "DeleteBackup": Handler(i.DeleteBackupRequest, delete_backup),
    "DeleteCluster": Handler(i.DeleteClusterRequest, delete_cluster),
    "DeleteHsm": Handler(i.DeleteHsmRequest, delete_hsm),
    "DeleteResourcePolicy": Handler(i.DeleteResourcePolicyRequest, delete_resource_policy),
    "DescribeBackups": Handler(i.DescribeBackupsRequest, describe_backups),
    "DescribeClusters": Handler(i.DescribeClustersRequest, describe_clusters),
    "GetResourcePolicy": Handler(i.GetResourcePolicyRequest, get_resource_policy),
    "InitializeCluster": Handler(i.InitializeClusterRequest, initialize_cluster),
    "ListTags": Handler(i.ListTagsRequest, list_tags),
    "ModifyBackupAttributes": Handler(i.ModifyBackupAttributesRequest, modify_backup_attributes),
    "ModifyCluster": Handler(i.ModifyClusterRequest, modify_cluster),
    "PutResourcePolicy": Handler(i.PutResourcePolicyRequest, put_resource_policy),
    "RestoreBackup": Handler(i.RestoreBackupRequest, restore_backup),
    "TagResource": Handler(i.TagResourceRequest, tag_resource),
    "UntagResource": Handler(i.UntagResourceRequest, untag_resource),
}
