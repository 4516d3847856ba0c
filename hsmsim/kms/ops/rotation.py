"""Key rotation: EnableKeyRotation, DisableKeyRotation, GetKeyRotationStatus,
RotateKeyOnDemand, ListKeyRotations; new backing material is made and the old kept for
decryption (blobs name their material)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from hsmsim.kms import errors as e, model
from hsmsim.kms.model import KeyRecord
from hsmsim.kms.inputs import (DisableKeyRotationRequest, EnableKeyRotationRequest,
                               GetKeyRotationStatusRequest, ListKeyRotationsRequest, RotateKeyOnDemandRequest)
from hsmsim.kms.ops.common import Call, Handler, Response, paginate, require_customer_managed
from hsmsim.kms.ops.keys import new_material
from hsmsim.kms.runtime import DAY, Kms

ON_DEMAND_LIMIT = 25


def _rotatable(kms: Kms, key: KeyRecord) -> None:
    if key.origin != model.AWS_KMS:
        raise e.Unsupported(f"{key.arn} origin is {key.origin} which is not valid for this operation.")
    if key.key_spec != model.SYMMETRIC:
        raise e.Unsupported(f"{key.arn} key spec is {key.key_spec} which is not valid for this operation.")


def _not_replica(kms: Kms, key: KeyRecord) -> None:
    # KMS Developer Guide, "Rotating multi-Region keys": rotation is set, and on-demand
    # rotation done, on the primary key; its replicas share the primary's material.
    if kms.is_replica(key):
        raise e.Unsupported(f"{key.arn} is a multi-Region replica key; manage its rotation on the "
                            f"primary key in {key.primary_region}.")


def _mutable(kms: Kms, key: KeyRecord) -> None:
    if key.state == model.DISABLED:
        raise e.Disabled(f"{key.arn} is disabled.")
    kms.require_not_pending_deletion(key)


async def rotate(kms: Kms, key: KeyRecord, rotation_type: str) -> KeyRecord:
    seq = len(kms.store.materials(key.key_id))
    mat = await new_material(kms, key, seq, rotation_type)
    key = kms.store.keys[key.key_id]  # re-read: other requests ran while the material was sealed
    if rotation_type == "ON_DEMAND" and key.on_demand_rotations >= ON_DEMAND_LIMIT:
        raise e.LimitExceeded("The on-demand rotations limit has been reached for the given keyId. "
                              f"No more on-demand rotations can be performed for this key: {key.arn}")
    now = kms.clock.now()
    changes: dict[str, object] = {"current_material": mat.material_id}
    if rotation_type == "ON_DEMAND":
        changes["on_demand_rotations"] = key.on_demand_rotations + 1
        changes["on_demand_started"] = now
    elif key.rotation_period:
        changes["next_rotation"] = now + key.rotation_period * DAY
    new = replace(key, **changes)  # type: ignore[arg-type]
    with kms.store.transaction():
        kms.store.put_material(mat)
        kms.store.put_key(new)
        for region, replica in kms.store.key_regions(key.key_id).items():  # multi-Region replicas
            if region != kms.region:
                kms.in_region(region).store.put_key(replace(replica, current_material=mat.material_id))
    return new


async def enable_key_rotation(kms: Kms, call: Call, req: EnableKeyRotationRequest) -> Response:
    key = kms.resolve(req.key_id, aliases=False)
    call.touch(key)
    kms.authorize(call.caller, key, "EnableKeyRotation")
    _rotatable(kms, key)
    _not_replica(kms, key)
    require_customer_managed(kms, call, key, "EnableKeyRotation")  # yearly, always (Developer Guide)
    _mutable(kms, key)
    period = req.rotation_period_in_days if req.rotation_period_in_days is not None else 365
    kms.store.put_key(replace(key, rotation_enabled=True, rotation_period=period,
                              next_rotation=kms.clock.now() + period * DAY))
    return {}


async def disable_key_rotation(kms: Kms, call: Call, req: DisableKeyRotationRequest) -> Response:
    key = kms.resolve(req.key_id, aliases=False)
    call.touch(key)
    kms.authorize(call.caller, key, "DisableKeyRotation")
    _rotatable(kms, key)
    _not_replica(kms, key)
    require_customer_managed(kms, call, key, "DisableKeyRotation")
    _mutable(kms, key)
    kms.store.put_key(replace(key, rotation_enabled=False, next_rotation=None))
    return {}


async def get_key_rotation_status(kms: Kms, call: Call, req: GetKeyRotationStatusRequest) -> Response:
    key = kms.resolve(req.key_id, aliases=False)
    call.touch(key)
    kms.authorize(call.caller, key, "GetKeyRotationStatus")
    _rotatable(kms, key)
    arn = key.arn
    key = kms.primary_of(key)  # a replica shows its primary's rotation
    out: Response = {"KeyRotationEnabled": key.rotation_enabled, "KeyId": arn}
    if key.rotation_enabled:
        out["RotationPeriodInDays"] = key.rotation_period
        out["NextRotationDate"] = key.next_rotation
    if key.on_demand_started is not None:
        out["OnDemandRotationStartDate"] = key.on_demand_started
    return out


async def rotate_key_on_demand(kms: Kms, call: Call, req: RotateKeyOnDemandRequest) -> Response:
    key = kms.resolve(req.key_id, aliases=False)
    call.touch(key)
    kms.authorize(call.caller, key, "RotateKeyOnDemand")
    _rotatable(kms, key)
    _not_replica(kms, key)
    require_customer_managed(kms, call, key, "RotateKeyOnDemand")
    _mutable(kms, key)
    if key.on_demand_rotations >= ON_DEMAND_LIMIT:
        raise e.LimitExceeded("The on-demand rotations limit has been reached for the given keyId. "
                              f"No more on-demand rotations can be performed for this key: {key.arn}")
    if key.rotation_enabled and key.next_rotation is not None and key.next_rotation - kms.clock.now() < 1200:
        raise e.Conflict("An automatic rotation of this key is currently in progress or scheduled "
                         "to begin within the next 20 minutes.")
    await rotate(kms, key, "ON_DEMAND")
    return {"KeyId": key.arn}


async def list_key_rotations(kms: Kms, call: Call, req: ListKeyRotationsRequest) -> Response:
    key = kms.resolve(req.key_id, aliases=False)
    call.touch(key)
    kms.authorize(call.caller, key, "ListKeyRotations")
    _rotatable(kms, key)
    materials = kms.store.materials(key.key_id)
    if (req.include_key_material or "ROTATIONS_ONLY") == "ROTATIONS_ONLY":
        materials = [m for m in materials if m.rotation_type is not None]
    page, extra = paginate(materials, req.limit, req.marker)
    rows = []
    for m in page:
        row: Response = {"KeyId": key.arn, "KeyMaterialId": m.material_id,
               "KeyMaterialState": "CURRENT" if m.material_id == key.current_material else "NON_CURRENT"}
        if m.rotation_type is not None:
            row["RotationDate"] = m.created
            row["RotationType"] = m.rotation_type
        rows.append(row)
    return {"Rotations": rows, **extra}


HANDLERS: dict[str, Handler[Any]] = {
    "EnableKeyRotation": Handler(EnableKeyRotationRequest, enable_key_rotation),
    "DisableKeyRotation": Handler(DisableKeyRotationRequest, disable_key_rotation),
    "GetKeyRotationStatus": Handler(GetKeyRotationStatusRequest, get_key_rotation_status),
    "RotateKeyOnDemand": Handler(RotateKeyOnDemandRequest, rotate_key_on_demand),
    "ListKeyRotations": Handler(ListKeyRotationsRequest, list_key_rotations),
}
