"""Custom key store operations: CreateCustomKeyStore, ConnectCustomKeyStore,
DisconnectCustomKeyStore, DescribeCustomKeyStores, UpdateCustomKeyStore, DeleteCustomKeyStore.
Only the AWS_CLOUDHSM type exists here."""

from __future__ import annotations

import secrets
from dataclasses import replace
from typing import Any

from hsmsim.kms import errors as e
from hsmsim.kms.keystores import CONNECTED, CONNECTING, DISCONNECTED, DISCONNECTING, FAILED
from hsmsim.kms.model import StoreRecord
from hsmsim.kms.inputs import (ConnectCustomKeyStoreRequest, CreateCustomKeyStoreRequest,
                               DeleteCustomKeyStoreRequest, DescribeCustomKeyStoresRequest,
                               DisconnectCustomKeyStoreRequest, UpdateCustomKeyStoreRequest)
from hsmsim.kms.ops.common import Call, Handler, Response, paginate
from hsmsim.kms.runtime import Kms

MAX_STORES = 10


def _store(kms: Kms, store_id: str) -> StoreRecord:
    s = kms.store.stores.get(store_id)
    if s is None:
        raise e.StoreNotFound(f"Custom key store {store_id} was not found.")
    return s


def _event(call: Call, s: StoreRecord) -> None:
    call.additional = {"customKeyStoreName": s.name, "clusterId": s.cluster_id}


async def create_custom_key_store(kms: Kms, call: Call, req: CreateCustomKeyStoreRequest) -> Response:
    if (req.custom_key_store_type or "AWS_CLOUDHSM") != "AWS_CLOUDHSM":
        # FIDELITY: external key stores (XKS) are not simulated.
        raise e.Unsupported("Only AWS_CLOUDHSM custom key stores are supported by hsmsim.")
    cluster_id, anchor, password = req.cloud_hsm_cluster_id, req.trust_anchor_certificate, req.key_store_password
    if cluster_id is None:
        raise e.Invalid("CloudHsmClusterId is required for custom key stores of type AWS_CLOUDHSM.")
    if anchor is None:
        raise e.Invalid("TrustAnchorCertificate is required for custom key stores of type AWS_CLOUDHSM.")
    if password is None:
        raise e.Invalid("KeyStorePassword is required for custom key stores of type AWS_CLOUDHSM.")
    name = req.custom_key_store_name
    if any(s.name == name for s in kms.store.stores.values()):
        raise e.StoreNameInUse(f"Custom key store name {name} is already in use.")
    info = await kms.keystores.check_for_create(cluster_id, anchor)
    if any(s.cluster_id == info.cluster_id for s in kms.store.stores.values()):
        raise e.ClusterInUse(f"Cluster {cluster_id} is already associated with a custom key store.")
    if len(kms.store.stores) >= MAX_STORES:
        raise e.LimitExceeded("You have reached the maximum of 10 custom key stores.")
    store_id = "cks-" + secrets.token_hex(9)[:17]
    sealed = await kms.keystores.seal_password(store_id, password)
    s = StoreRecord(store_id=store_id, name=name, cluster_id=cluster_id,
                    trust_anchor=anchor, password=sealed,
                    created=kms.clock.now())
    kms.store.put_store(s)
    _event(call, s)
    call.response_elements = {"customKeyStoreId": store_id}
    return {"CustomKeyStoreId": store_id}


async def connect_custom_key_store(kms: Kms, call: Call, req: ConnectCustomKeyStoreRequest) -> Response:
    kms.keystores.check_served()  # a store whose cluster stopped is DISCONNECTED
    s = _store(kms, req.custom_key_store_id)
    _event(call, s)
    if s.state in (DISCONNECTING, FAILED):
        raise e.StoreInvalidState(f"Custom key store {s.store_id} is {s.state.lower()}; it cannot be "
                                  "connected in this state.")
    if s.state in (CONNECTED, CONNECTING):
        return {}
    try:
        info = await kms.keystores.cluster_info(s.cluster_id)
    except e.ClusterNotFound:
        # ConnectCustomKeyStore has no CloudHsmClusterNotFoundException: a cluster without HSMs
        # or deleted fails the connection (INSUFFICIENT_CLOUDHSM_HSMS, CLUSTER_NOT_FOUND)
        info = None
    if info is not None and info.state not in ("ACTIVE", "DEGRADED"):
        raise e.ClusterNotActive(f"Cluster {s.cluster_id} is not active.")
    kms.keystores.start_connect(s.store_id)
    return {}


async def disconnect_custom_key_store(kms: Kms, call: Call, req: DisconnectCustomKeyStoreRequest) -> Response:
    s = _store(kms, req.custom_key_store_id)
    _event(call, s)
    if s.state in (DISCONNECTING, DISCONNECTED):
        raise e.StoreInvalidState(f"Custom key store {s.store_id} is {s.state.lower()}.")
    await kms.keystores.disconnect(s.store_id)
    return {}


async def describe_custom_key_stores(kms: Kms, call: Call, req: DescribeCustomKeyStoresRequest) -> Response:
    kms.keystores.check_served()
    stores = sorted(kms.store.stores.values(), key=lambda s: s.created)
    if req.custom_key_store_id is not None:
        stores = [s for s in stores if s.store_id == req.custom_key_store_id]
        if not stores:
            raise e.StoreNotFound(f"Custom key store {req.custom_key_store_id} was not found.")
    if req.custom_key_store_name is not None:
        stores = [s for s in stores if s.name == req.custom_key_store_name]
        if not stores:
            raise e.StoreNotFound(f"Custom key store {req.custom_key_store_name} was not found.")
    page, extra = paginate(stores, req.limit, req.marker)
    rows = []
    for s in page:
        row: Response = {"CustomKeyStoreId": s.store_id, "CustomKeyStoreName": s.name,
                         "CloudHsmClusterId": s.cluster_id, "TrustAnchorCertificate": s.trust_anchor,
                         "ConnectionState": s.state, "CreationDate": s.created,
                         "CustomKeyStoreType": "AWS_CLOUDHSM"}
        if s.state == FAILED and s.error_code:
            row["ConnectionErrorCode"] = s.error_code
        rows.append(row)
    return {"CustomKeyStores": rows, **extra}


async def update_custom_key_store(kms: Kms, call: Call, req: UpdateCustomKeyStoreRequest) -> Response:
    s = _store(kms, req.custom_key_store_id)
    _event(call, s)
    changes: dict[str, object] = {}
    new_name = req.new_custom_key_store_name
    if new_name is not None and new_name != s.name:
        if any(o.name == new_name for o in kms.store.stores.values()):
            raise e.StoreNameInUse(f"Custom key store name {new_name} is already in use.")
        changes["name"] = new_name
    other = {k for k, v in (("KeyStorePassword", req.key_store_password),
                            ("CloudHsmClusterId", req.cloud_hsm_cluster_id)) if v is not None}
    if other and s.state != DISCONNECTED:
        raise e.StoreInvalidState(f"Custom key store {s.store_id} must be disconnected to change "
                                  f"{sorted(other)[0]}.")
    if req.cloud_hsm_cluster_id is not None and req.cloud_hsm_cluster_id != s.cluster_id:
        info = await kms.keystores.check_for_create(req.cloud_hsm_cluster_id, None)
        kms.keystores.check_related(s.cluster_id, s.trust_anchor, info)
        changes["cluster_id"] = req.cloud_hsm_cluster_id
    if req.key_store_password is not None:
        changes["password"] = await kms.keystores.seal_password(s.store_id, req.key_store_password)
        changes["pending_password"] = None
    if changes:
        kms.store.put_store(replace(s, **changes))  # type: ignore[arg-type]
    return {}


async def delete_custom_key_store(kms: Kms, call: Call, req: DeleteCustomKeyStoreRequest) -> Response:
    s = _store(kms, req.custom_key_store_id)
    _event(call, s)
    if s.state != DISCONNECTED:
        raise e.StoreInvalidState(f"Custom key store {s.store_id} must be disconnected before it is deleted.")
    if any(k.custom_key_store_id == s.store_id for k in kms.store.keys.values()):
        raise e.StoreHasKeys(f"Custom key store {s.store_id} still contains KMS keys.")
    kms.store.delete_store(s.store_id)
    return {}


HANDLERS: dict[str, Handler[Any]] = {
    "CreateCustomKeyStore": Handler(CreateCustomKeyStoreRequest, create_custom_key_store),
    "ConnectCustomKeyStore": Handler(ConnectCustomKeyStoreRequest, connect_custom_key_store),
    "DisconnectCustomKeyStore": Handler(DisconnectCustomKeyStoreRequest, disconnect_custom_key_store),
    "DescribeCustomKeyStores": Handler(DescribeCustomKeyStoresRequest, describe_custom_key_stores),
    "UpdateCustomKeyStore": Handler(UpdateCustomKeyStoreRequest, update_custom_key_store),
    "DeleteCustomKeyStore": Handler(DeleteCustomKeyStoreRequest, delete_custom_key_store),
}
