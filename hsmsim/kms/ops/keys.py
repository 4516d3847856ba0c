"""Key lifecycle operations: CreateKey, DescribeKey, ListKeys, UpdateKeyDescription, EnableKey,
DisableKey, ScheduleKeyDeletion, CancelKeyDeletion; and the deletion/rotation sweep."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

from hsmsim.kms import errors as e
from hsmsim.kms import material, model, policy
from hsmsim.kms.keystores import CONNECTED
from hsmsim.kms.material import ClusterFailure
from hsmsim.kms.model import KeyRecord, MaterialRecord
from hsmsim.kms.model import AliasRecord
from hsmsim.kms.inputs import (CancelKeyDeletionRequest, CreateKeyRequest, DescribeKeyRequest, DisableKeyRequest,
                               EnableKeyRequest, GetKeyLastUsageRequest, ListKeysRequest, ScheduleKeyDeletionRequest,
                               UpdateKeyDescriptionRequest)
from hsmsim.kms.ops.common import (Call, Handler, Response, check_tags, initial_policy, metadata, paginate,
                                   require_customer_managed)
from hsmsim.kms.runtime import DAY, Kms
from hsmsim.pkcs11.constants import RV

_USAGES = {
    model.SYMMETRIC: ("ENCRYPT_DECRYPT",),
    **{s: ("ENCRYPT_DECRYPT", "SIGN_VERIFY") for s in model.RSA_SPECS},
    **{s: ("SIGN_VERIFY",) for s in model.EC_SPECS},
    **{s: ("GENERATE_VERIFY_MAC",) for s in model.HMAC_SPECS},
}


async def new_material(kms: Kms, key: KeyRecord, seq: int, rotation_type: str | None = None) -> MaterialRecord:
    """Fresh backing material for an AWS_KMS key, sealed in the cluster (not yet stored)."""
    fresh = await asyncio.get_running_loop().run_in_executor(None, material.generate, key.key_spec)
    material_id = material.new_material_id().hex()
    try:
        sealed = await kms.fleet.seal(key.key_id, material_id, fresh.secret)
    except ClusterFailure:
        raise e.DependencyTimeout("KMS could not reach its key material store.") from None
    return MaterialRecord(material_id, key.key_id, seq, kms.clock.now(), sealed, fresh.public, rotation_type)


def managed_service(kms: Kms, ref: str) -> str | None:
    """The service of a KeyId naming a predefined AWS managed key alias (`alias/aws/<service>`
    or its alias ARN in this Region), else None."""
    if ref.startswith("arn:"):
        parts = ref.split(":", 5)
        if len(parts) != 6 or parts[3] != kms.region or parts[4] != kms.account:
            return None
        ref = parts[5]
    if ref.startswith("alias/aws/") and ref[len("alias/aws/"):] in policy.MANAGED_SERVICES:
        return ref[len("alias/aws/"):]
    return None


async def resolve_creating(kms: Kms, call: Call, ref: str) -> KeyRecord:
    """`kms.resolve(ref)`, except that a predefined `alias/aws/<service>` alias not yet in use
    gets its AWS managed key now, as KMS does when an operation first uses it (KMS Developer
    Guide, "AWS managed keys"; API Reference, DescribeKey).

    FIDELITY: the key is created in the same all-or-nothing unit as the request: a request that
    fails (say AccessDenied: the key's policy allows use only through the service) leaves no key."""
    service = managed_service(kms, ref)
    if service is None or f"alias/aws/{service}" in kms.store.aliases:
        return kms.resolve(ref)
    key_id = kms.new_key_id()
    now = kms.clock.now()
    key = KeyRecord(key_id=key_id, arn=kms.key_arn(key_id), created=now, key_spec=model.SYMMETRIC,
                    key_usage="ENCRYPT_DECRYPT", origin=model.AWS_KMS, state=model.ENABLED,
                    policy=policy.managed_policy(kms.account, kms.region, service),
                    description=f"Default key that protects my {service} resources when no other key is defined",
                    key_manager="AWS", rotation_enabled=True, rotation_period=365,
                    next_rotation=now + 365 * DAY)
    mat = await new_material(kms, key, 0)
    try:  # the request uses it before its material is committed: unseal it into the cache now
        await kms.fleet.live(key.key_spec, mat)
    except ClusterFailure:
        raise e.DependencyTimeout("KMS could not reach its key material store.") from None
    key = replace(key, current_material=mat.material_id)
    with kms.store.transaction():
        kms.store.put_key(key)
        kms.store.put_material(mat)
        kms.store.put_alias(AliasRecord(f"alias/aws/{service}", key_id, now, now))
    return key


def cluster_error(key: KeyRecord, exc: ClusterFailure) -> e.KmsError:
    """The KMS error for a failed cluster call on a custom-key-store key.

    FIDELITY: the key's state does not flip to Unavailable when its backing key is found
    missing (AWS does so eventually); each call answers KMSInvalidStateException."""
    if exc.rv in (RV.KEY_HANDLE_INVALID, RV.OBJECT_HANDLE_INVALID):
        return e.InvalidState(f"{key.arn} is unavailable: its key material was not found in the "
                              "associated CloudHSM cluster.")
    return e.InvalidState("KMS cannot communicate with your CloudHSM cluster. This might be a "
                          "transient network issue.")


async def create_key(kms: Kms, call: Call, req: CreateKeyRequest) -> Response:
    spec = req.key_spec or req.customer_master_key_spec or model.SYMMETRIC
    if req.key_spec is not None and req.customer_master_key_spec is not None:
        raise e.Invalid("You cannot specify KeySpec and CustomerMasterKeySpec in the same request. "
                        "CustomerMasterKeySpec is deprecated.")
    if spec not in model.SUPPORTED_SPECS:
        # FIDELITY: SM2 (China Regions), ML-DSA and Ed25519 keys are not simulated.
        raise e.Unsupported(f"KeySpec {spec} is not supported in this Region.")
    usage = req.key_usage
    if usage is None:
        if spec != model.SYMMETRIC:
            raise e.Invalid("You must specify a KeyUsage value for all KMS keys except for "
                            "symmetric encryption keys.")
        usage = "ENCRYPT_DECRYPT"
    if usage not in _USAGES[spec]:
        raise e.Invalid(f"KeyUsage {usage} is not compatible with KeySpec {spec}")
    origin = req.origin or model.AWS_KMS
    store_id = req.custom_key_store_id
    multi = bool(req.multi_region)
    if origin == "EXTERNAL_KEY_STORE":
        raise e.Unsupported("External key stores are not supported by hsmsim.")
    if store_id is not None and origin != model.AWS_CLOUDHSM:
        raise e.Unsupported("CustomKeyStoreId can be specified only when Origin is AWS_CLOUDHSM.")
    if origin == model.AWS_CLOUDHSM:
        if store_id is None:
            raise e.Unsupported("Origin AWS_CLOUDHSM requires a CustomKeyStoreId.")
        if spec != model.SYMMETRIC or multi:
            raise e.Unsupported("Custom key stores support only single-Region symmetric encryption KMS keys.")
    if origin == model.EXTERNAL and spec != model.SYMMETRIC:
        # FIDELITY: imported key material is limited to symmetric keys here.
        raise e.Unsupported("Imported key material is supported only for symmetric encryption keys.")
    tags = check_tags(req.tags)
    doc = initial_policy(kms, call, req.policy, req.bypass_policy_lockout_safety_check)
    key_id = kms.new_key_id(multi)
    key = KeyRecord(key_id=key_id, arn=kms.key_arn(key_id), created=kms.clock.now(), key_spec=spec,
                    key_usage=usage, origin=origin,
                    state=model.PENDING_IMPORT if origin == model.EXTERNAL else model.ENABLED,
                    policy=doc, description=req.description or "", tags=tuple(tags),
                    multi_region=multi, primary_region=kms.region if multi else None)
    mat: MaterialRecord | None = None
    if origin == model.AWS_CLOUDHSM:
        assert store_id is not None
        store = kms.store.stores.get(store_id)
        if store is None:
            raise e.StoreNotFound(f"Custom key store {store_id} was not found.")
        login = kms.keystores.login(store_id)
        if store.state != CONNECTED or login is None:
            raise e.StoreInvalidState(f"Custom key store {store_id} is not connected.")
        info = await kms.keystores.cluster_info(store.cluster_id)
        kms.keystores.require_two_azs(info)
        try:
            handle = await kms.cluster_keys.create(login, key.arn)
        except ClusterFailure:
            raise e.Internal("KMS could not create the key material in the CloudHSM cluster.") from None

        async def destroy_backing_key() -> None:
            await kms.cluster_keys.destroy(login, handle)
        call.undo.append(destroy_backing_key)
        key = replace(key, custom_key_store_id=store_id, cluster_id=store.cluster_id, backing_handle=handle)
    elif origin == model.AWS_KMS:
        mat = await new_material(kms, key, 0)
        key = replace(key, current_material=mat.material_id)
    with kms.store.transaction():
        kms.store.put_key(key)
        if mat is not None:
            kms.store.put_material(mat)
    call.touch(key)
    return {"KeyMetadata": metadata(kms, key)}


async def describe_key(kms: Kms, call: Call, req: DescribeKeyRequest) -> Response:
    key = await resolve_creating(kms, call, req.key_id)
    call.touch(key)
    kms.authorize(call.caller, key, "DescribeKey", grant_tokens=req.grant_tokens)
    return {"KeyMetadata": metadata(kms, key)}


async def list_keys(kms: Kms, call: Call, req: ListKeysRequest) -> Response:
    keys = sorted(kms.store.keys.values(), key=lambda k: (k.created, k.key_id))
    page, extra = paginate(keys, req.limit, req.marker)
    return {"Keys": [{"KeyId": k.key_id, "KeyArn": k.arn} for k in page], **extra}


async def update_key_description(kms: Kms, call: Call, req: UpdateKeyDescriptionRequest) -> Response:
    key = kms.resolve(req.key_id, aliases=False)
    call.touch(key)
    kms.authorize(call.caller, key, "UpdateKeyDescription")
    require_customer_managed(kms, call, key, "UpdateKeyDescription")
    kms.require_not_pending_deletion(key)
    kms.store.put_key(replace(key, description=req.description))
    return {}


async def enable_key(kms: Kms, call: Call, req: EnableKeyRequest) -> Response:
    key = kms.resolve(req.key_id, aliases=False)
    call.touch(key)
    kms.authorize(call.caller, key, "EnableKey")
    require_customer_managed(kms, call, key, "EnableKey")
    kms.require_not_pending_deletion(key)
    if key.state == model.PENDING_IMPORT:
        raise e.InvalidState(f"{key.arn} is pending import.")
    # An Unavailable key takes the new state when its store reconnects (key-state table [12]).
    kms.store.put_key(replace(key, state=model.ENABLED))
    return {}


async def disable_key(kms: Kms, call: Call, req: DisableKeyRequest) -> Response:
    key = kms.resolve(req.key_id, aliases=False)
    call.touch(key)
    kms.authorize(call.caller, key, "DisableKey")
    require_customer_managed(kms, call, key, "DisableKey")
    kms.require_not_pending_deletion(key)
    if key.state == model.PENDING_IMPORT:
        raise e.InvalidState(f"{key.arn} is pending import.")
    kms.store.put_key(replace(key, state=model.DISABLED))
    return {}


async def schedule_key_deletion(kms: Kms, call: Call, req: ScheduleKeyDeletionRequest) -> Response:
    key = kms.resolve(req.key_id, aliases=False)
    call.touch(key)
    kms.authorize(call.caller, key, "ScheduleKeyDeletion")
    require_customer_managed(kms, call, key, "ScheduleKeyDeletion")
    days = req.pending_window_in_days if req.pending_window_in_days is not None else 30
    if not 7 <= days <= 30:
        raise e.Invalid("1 validation error detected: Value '%d' at 'pendingWindowInDays' failed to "
                        "satisfy constraint: Member must have value between 7 and 30" % days)
    kms.require_not_pending_deletion(key)
    if key.multi_region and not kms.is_replica(key) and len(kms.store.key_regions(key.key_id)) > 1:
        # KMS API Reference, ScheduleKeyDeletion: a primary key with replicas is not deleted
        # while they exist; it waits in PendingReplicaDeletion (no DeletionDate) and its
        # waiting period starts when the last replica is deleted.
        kms.store.put_key(replace(key, state=model.PENDING_REPLICA_DELETION, deletion_date=None,
                                  pending_window=days))
        return {"KeyId": key.arn, "KeyState": model.PENDING_REPLICA_DELETION, "PendingWindowInDays": days}
    when = kms.clock.now() + days * DAY
    kms.store.put_key(replace(key, state=model.PENDING_DELETION, deletion_date=when, pending_window=days))
    return {"KeyId": key.arn, "DeletionDate": when, "KeyState": model.PENDING_DELETION,
            "PendingWindowInDays": days}


async def cancel_key_deletion(kms: Kms, call: Call, req: CancelKeyDeletionRequest) -> Response:
    key = kms.resolve(req.key_id, aliases=False)
    call.touch(key)
    kms.authorize(call.caller, key, "CancelKeyDeletion")
    require_customer_managed(kms, call, key, "CancelKeyDeletion")
    if key.state not in model.PENDING_STATES:
        raise e.InvalidState(f"{key.arn} is not pending deletion.")
    kms.store.put_key(replace(key, state=model.DISABLED, deletion_date=None, pending_window=None))
    return {"KeyId": key.arn}


async def get_key_last_usage(kms: Kms, call: Call, req: GetKeyLastUsageRequest) -> Response:
    key = kms.resolve(req.key_id)
    call.touch(key)
    kms.authorize(call.caller, key, "GetKeyLastUsage")
    return {"KeyId": key.arn, "KeyCreationDate": key.created, "TrackingStartDate": kms.tracking_start,
            "KeyLastUsage": kms.last_usage.get(key.key_id)}


async def delete_now(kms: Kms, key: KeyRecord) -> None:
    if key.backing_handle is not None and key.custom_key_store_id:
        # Best effort, as KMS does: an orphan may stay in the cluster while disconnected.
        login = kms.keystores.login(key.custom_key_store_id)
        if login is not None:
            try:
                await kms.cluster_keys.destroy(login, key.backing_handle)
            except ClusterFailure:
                pass
    others = {r: k for r, k in kms.store.key_regions(key.key_id).items() if r != kms.region}
    if not others:  # a multi-Region key's material stays while another Region holds the key
        kms.fleet.forget([m.material_id for m in kms.store.materials(key.key_id)])
    with kms.store.transaction():
        kms.store.delete_key(key.key_id)
        # The last replica gone: a primary waiting in PendingReplicaDeletion starts its window.
        primary = others.get(key.primary_region or "")
        if primary is not None and primary.state == model.PENDING_REPLICA_DELETION and len(others) == 1:
            assert key.primary_region is not None
            when = kms.clock.now() + (primary.pending_window or 30) * DAY
            kms.in_region(key.primary_region).store.put_key(
                replace(primary, state=model.PENDING_DELETION, deletion_date=when))


HANDLERS: dict[str, Handler[Any]] = {
    "CreateKey": Handler(CreateKeyRequest, create_key),
    "DescribeKey": Handler(DescribeKeyRequest, describe_key),
    "ListKeys": Handler(ListKeysRequest, list_keys),
    "UpdateKeyDescription": Handler(UpdateKeyDescriptionRequest, update_key_description),
    "EnableKey": Handler(EnableKeyRequest, enable_key),
    "DisableKey": Handler(DisableKeyRequest, disable_key),
    "ScheduleKeyDeletion": Handler(ScheduleKeyDeletionRequest, schedule_key_deletion),
    "CancelKeyDeletion": Handler(CancelKeyDeletionRequest, cancel_key_deletion),
    "GetKeyLastUsage": Handler(GetKeyLastUsageRequest, get_key_last_usage),
}
