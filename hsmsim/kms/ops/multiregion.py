"""Multi-Region keys: ReplicateKey and UpdatePrimaryRegion. A multi-Region key is one key id
with a record in each Region that holds it (the primary's and its replicas'); the records share
key material (and so ciphertexts, signatures and MACs) and the primary's rotation, and each has
its own policy, tags, description, grants, aliases and key state (KMS Developer Guide,
"Multi-Region keys in AWS KMS")."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from hsmsim.kms import errors as e, model
from hsmsim.kms.model import KeyRecord
from hsmsim.kms.inputs import ReplicateKeyRequest, UpdatePrimaryRegionRequest
from hsmsim.kms.ops.common import Call, Handler, Response, check_tags, initial_policy, metadata
from hsmsim.kms.runtime import Kms


def _usable_primary(kms: Kms, call: Call, ref: str, action: str) -> KeyRecord:
    key = kms.resolve(ref, aliases=False)
    call.touch(key)
    kms.authorize(call.caller, key, action)
    if not key.multi_region:
        raise e.Unsupported(f"{key.arn} is not a multi-Region key.")
    if kms.is_replica(key):
        raise e.Unsupported(f"{key.arn} is not a multi-Region primary key.")
    if key.state == model.DISABLED:  # key-state table: ReplicateKey / UpdatePrimaryRegion
        raise e.Disabled(f"{key.arn} is disabled.")
    kms.require_not_pending_deletion(key)
    if key.state == model.PENDING_IMPORT:
        raise e.InvalidState(f"{key.arn} is pending import.")
    return key


def _region(kms: Kms, name: str, member: str) -> str:
    if name not in kms.config.allowed_regions:
        raise e.Invalid(f"{name} is not a valid {member} for this request: it is not a Region this "
                        "endpoint serves ([kms] regions).")
    return name


async def replicate_key(kms: Kms, call: Call, req: ReplicateKeyRequest) -> Response:
    primary = _usable_primary(kms, call, req.key_id, "ReplicateKey")
    region = _region(kms, req.replica_region, "ReplicaRegion")
    if region == kms.region:
        raise e.Invalid(f"ReplicaRegion {region} is the Region of the primary key {primary.arn}.")
    there = kms.in_region(region)
    if primary.key_id in there.store.keys:
        raise e.AlreadyExists(f"Replica key {there.key_arn(primary.key_id)} already exists.")
    tags = check_tags(req.tags)
    doc = initial_policy(kms, call, req.policy, req.bypass_policy_lockout_safety_check)
    # FIDELITY: the replica is Enabled at once (AWS: Creating for a while, then Enabled); a
    # replica of a key with imported material waits for its own import (PendingImport), as on AWS.
    replica = replace(
        primary, arn=there.key_arn(primary.key_id), created=kms.clock.now(),
        state=model.PENDING_IMPORT if primary.origin == model.EXTERNAL else model.ENABLED,
        policy=doc, description=req.description or "", tags=tuple(tags), deletion_date=None,
        pending_window=None, on_demand_rotations=0, on_demand_started=None,
        current_material=None if primary.origin == model.EXTERNAL else primary.current_material,
        valid_to=None, expiration_model=None)
    there.store.put_key(replica)
    call.resources.append(replica.arn)
    return {"ReplicaKeyMetadata": metadata(there, replica, {region: replica}),
            "ReplicaPolicy": doc, "ReplicaTags": [{"TagKey": k, "TagValue": v} for k, v in tags]}


async def update_primary_region(kms: Kms, call: Call, req: UpdatePrimaryRegionRequest) -> Response:
    primary = _usable_primary(kms, call, req.key_id, "UpdatePrimaryRegion")
    region = _region(kms, req.primary_region, "PrimaryRegion")
    regions = kms.store.key_regions(primary.key_id)
    if region == kms.region:
        return {}  # already the primary
    if region not in regions:
        raise e.NotFound(f"Replica key {kms.key_arn_in(region, primary.key_id)} does not exist.")
    # FIDELITY: the change is immediate (AWS: both keys are Updating for a while).
    with kms.store.transaction():
        for r, rec in regions.items():
            kms.in_region(r).store.put_key(replace(rec, primary_region=region))
        # The new primary takes over the rotation schedule; a replica keeps none of its own.
        new_primary = regions[region]
        kms.in_region(region).store.put_key(replace(
            new_primary, primary_region=region, rotation_enabled=primary.rotation_enabled,
            rotation_period=primary.rotation_period, next_rotation=primary.next_rotation,
            on_demand_rotations=primary.on_demand_rotations, on_demand_started=primary.on_demand_started))
    call.resources.append(new_primary.arn)
    return {}


HANDLERS: dict[str, Handler[Any]] = {
    "ReplicateKey": Handler(ReplicateKeyRequest, replicate_key),
    "UpdatePrimaryRegion": Handler(UpdatePrimaryRegionRequest, update_primary_region),
}
