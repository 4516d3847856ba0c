"""Key policies, grants and tags: PutKeyPolicy, GetKeyPolicy, ListKeyPolicies, CreateGrant,
ListGrants, ListRetirableGrants, RevokeGrant, RetireGrant, TagResource, UntagResource,
ListResourceTags."""

from __future__ import annotations

import secrets
from dataclasses import replace
from typing import Any

from hsmsim.kms import errors as e, model, policy
from hsmsim.kms.model import GrantRecord
from hsmsim.kms.inputs import (CreateGrantRequest, GetKeyPolicyRequest, ListGrantsRequest,
                               ListKeyPoliciesRequest, ListResourceTagsRequest, ListRetirableGrantsRequest,
                               PutKeyPolicyRequest, RetireGrantRequest, RevokeGrantRequest,
                               TagResourceRequest, UntagResourceRequest)
from hsmsim.kms.ops.common import (Call, Handler, Response, check_tags, dry_run, paginate,
                                   require_customer_managed)
from hsmsim.kms.runtime import Kms

MAX_GRANTS_PER_KEY = 50_000


def _policy_name(name: str | None) -> None:
    if name is not None and name != "default":
        raise e.NotFound("No such policy exists")


async def put_key_policy(kms: Kms, call: Call, req: PutKeyPolicyRequest) -> Response:
    key = kms.resolve(req.key_id, aliases=False)
    call.touch(key)
    kms.authorize(call.caller, key, "PutKeyPolicy")
    require_customer_managed(kms, call, key, "PutKeyPolicy")
    _policy_name(req.policy_name)
    doc = req.policy
    policy.validate(doc)
    if len(doc.encode()) > 32768:
        raise e.LimitExceeded("The key policy exceeds the 32 KB limit.")
    if not req.bypass_policy_lockout_safety_check and \
            policy.evaluate(doc, call.caller, "PutKeyPolicy", {}) != "Allow":
        raise e.MalformedPolicy("The new key policy will not allow you to update the key policy in the future.")
    kms.store.put_key(replace(kms.store.keys[key.key_id], policy=doc))
    return {}


async def get_key_policy(kms: Kms, call: Call, req: GetKeyPolicyRequest) -> Response:
    key = kms.resolve(req.key_id, aliases=False)
    call.touch(key)
    kms.authorize(call.caller, key, "GetKeyPolicy")
    _policy_name(req.policy_name)
    return {"Policy": key.policy, "PolicyName": "default"}


async def list_key_policies(kms: Kms, call: Call, req: ListKeyPoliciesRequest) -> Response:
    key = kms.resolve(req.key_id, aliases=False)
    call.touch(key)
    kms.authorize(call.caller, key, "ListKeyPolicies")
    return {"PolicyNames": ["default"], "Truncated": False}


def _grant_entry(kms: Kms, g: GrantRecord) -> Response:
    out: Response = {"KeyId": kms.key_arn(g.key_id), "GrantId": g.grant_id, "Name": g.name,
                     "CreationDate": g.created, "GranteePrincipal": g.grantee,
                     "RetiringPrincipal": g.retiring, "IssuingAccount": f"arn:aws:iam::{g.issuing_account}:root",
                     "Operations": list(g.operations)}
    if g.ec_subset is not None or g.ec_equals is not None:
        out["Constraints"] = {k: dict(v) for k, v in (("EncryptionContextSubset", g.ec_subset),
                                                       ("EncryptionContextEquals", g.ec_equals)) if v is not None}
    return out


async def create_grant(kms: Kms, call: Call, req: CreateGrantRequest) -> Response:
    key = kms.resolve(req.key_id, aliases=False)
    call.touch(key)
    kms.authorize(call.caller, key, "CreateGrant", grant_op="CreateGrant")
    if kms.state_of(key) != model.UNAVAILABLE:  # key-state table: CreateGrant is OK when Unavailable
        kms.require_usable(key)
    grantee = req.grantee_principal
    if grantee is None:
        raise e.Invalid("1 validation error detected: Value null at 'granteePrincipal' failed to "
                        "satisfy constraint: Member must not be null")
    ops = req.operations
    if not ops:
        raise e.Invalid("1 validation error detected: Value '[]' at 'operations' failed to satisfy "
                        "constraint: Member must have length greater than or equal to 1")
    sym_only = {"Encrypt", "Decrypt", "ReEncryptFrom", "ReEncryptTo", "GenerateDataKey",
                "GenerateDataKeyWithoutPlaintext", "GenerateDataKeyPair", "GenerateDataKeyPairWithoutPlaintext"}
    if key.key_usage == "SIGN_VERIFY" and sym_only & set(ops) or \
            key.key_usage == "GENERATE_VERIFY_MAC" and set(ops) - {"GenerateMac", "VerifyMac", "DescribeKey",
                                                                  "CreateGrant", "RetireGrant"}:
        raise e.Invalid(f"Grant operations {sorted(set(ops))} are not valid for a key with usage {key.key_usage}.")
    subset = req.constraints.encryption_context_subset if req.constraints else None
    equals = req.constraints.encryption_context_equals if req.constraints else None
    if (subset is not None or equals is not None) and key.key_spec != model.SYMMETRIC:
        raise e.Invalid("Encryption context grant constraints are valid only for symmetric encryption keys.")
    name = req.name
    grants = kms.store.grants(key.key_id)
    if len(grants) >= MAX_GRANTS_PER_KEY:
        raise e.LimitExceeded(f"Too many grants for {key.arn}")
    dry_run(req.dry_run)
    for g in grants:  # CreateGrant is idempotent for an identical named grant
        if name is not None and g.name == name and g.grantee == grantee and \
                tuple(ops) == g.operations:
            return {"GrantToken": g.token, "GrantId": g.grant_id}
    grant_id = secrets.token_hex(32)
    token = f"hsmsim-grant:{grant_id}:{secrets.token_urlsafe(48)}"
    kms.store.put_grant(GrantRecord(
        grant_id=grant_id, key_id=key.key_id, token=token, grantee=grantee,
        operations=tuple(ops), issuing_account=kms.account, created=kms.clock.now(), name=name,
        retiring=req.retiring_principal,
        ec_subset=tuple(sorted(subset.items())) if subset is not None else None,
        ec_equals=tuple(sorted(equals.items())) if equals is not None else None))
    return {"GrantToken": token, "GrantId": grant_id}


async def list_grants(kms: Kms, call: Call, req: ListGrantsRequest) -> Response:
    key = kms.resolve(req.key_id, aliases=False)
    call.touch(key)
    kms.authorize(call.caller, key, "ListGrants")
    grants = kms.store.grants(key.key_id)
    if req.grant_id is not None:
        grants = [g for g in grants if g.grant_id == req.grant_id]
    if req.grantee_principal is not None:
        grants = [g for g in grants if g.grantee == req.grantee_principal]
    page, extra = paginate(grants, req.limit, req.marker, 50)
    return {"Grants": [_grant_entry(kms, g) for g in page], **extra}


async def list_retirable_grants(kms: Kms, call: Call, req: ListRetirableGrantsRequest) -> Response:
    who = req.retiring_principal if req.retiring_principal is not None else call.caller.arn
    grants = [g for g in kms.store.grants_all() if g.retiring == who]
    page, extra = paginate(grants, req.limit, req.marker, 50)
    return {"Grants": [_grant_entry(kms, g) for g in page], **extra}


async def revoke_grant(kms: Kms, call: Call, req: RevokeGrantRequest) -> Response:
    key = kms.resolve(req.key_id, aliases=False)
    call.touch(key)
    kms.authorize(call.caller, key, "RevokeGrant")
    grant = kms.store.grant(req.grant_id)
    if grant is None or grant.key_id != key.key_id:
        raise e.NotFound(f"Grant ID {req.grant_id} not found")
    dry_run(req.dry_run)
    kms.store.delete_grant(grant.grant_id)
    return {}


async def retire_grant(kms: Kms, call: Call, req: RetireGrantRequest) -> Response:
    token, grant_id, key_ref = req.grant_token, req.grant_id, req.key_id
    grant: GrantRecord | None
    if token is not None:
        parts = token.split(":")
        grant = kms.store.grant(parts[1]) if len(parts) == 3 and parts[0] == "hsmsim-grant" else None
        if grant is None or not secrets.compare_digest(grant.token, token):
            raise e.InvalidGrantToken("The grant token is not valid.")
    elif grant_id is not None and key_ref is not None:
        key = kms.resolve(key_ref, aliases=False)
        grant = kms.store.grant(grant_id)
        if grant is None or grant.key_id != key.key_id:
            raise e.NotFound(f"Grant ID {grant_id} not found")
    else:
        raise e.Invalid("Either GrantToken or both KeyId and GrantId must be specified.")
    if kms.config.enforce_policies and call.caller.arn not in (grant.retiring, grant.grantee) and \
            call.caller.arn != f"arn:aws:iam::{grant.issuing_account}:root":
        raise e.AccessDenied(f"User: {call.caller.arn} is not authorized to perform: kms:RetireGrant")
    call.resources.append(kms.key_arn(grant.key_id))
    dry_run(req.dry_run)
    kms.store.delete_grant(grant.grant_id)
    return {}


async def tag_resource(kms: Kms, call: Call, req: TagResourceRequest) -> Response:
    key = kms.resolve(req.key_id, aliases=False)
    call.touch(key)
    kms.authorize(call.caller, key, "TagResource")
    require_customer_managed(kms, call, key, "TagResource")
    kms.require_not_pending_deletion(key)
    new = check_tags(req.tags)
    tags = dict(key.tags)
    tags.update(new)
    if len(tags) > 50:
        raise e.TagError("Too many tags")
    kms.store.put_key(replace(key, tags=tuple(tags.items())))
    return {}


async def untag_resource(kms: Kms, call: Call, req: UntagResourceRequest) -> Response:
    key = kms.resolve(req.key_id, aliases=False)
    call.touch(key)
    kms.authorize(call.caller, key, "UntagResource")
    require_customer_managed(kms, call, key, "UntagResource")
    kms.require_not_pending_deletion(key)
    drop = set(req.tag_keys)
    kms.store.put_key(replace(key, tags=tuple((k, v) for k, v in key.tags if k not in drop)))
    return {}


async def list_resource_tags(kms: Kms, call: Call, req: ListResourceTagsRequest) -> Response:
    key = kms.resolve(req.key_id, aliases=False)
    call.touch(key)
    kms.authorize(call.caller, key, "ListResourceTags")
    page, extra = paginate(list(key.tags), req.limit, req.marker, 50)
    return {"Tags": [{"TagKey": k, "TagValue": v} for k, v in page], **extra}


HANDLERS: dict[str, Handler[Any]] = {
    "PutKeyPolicy": Handler(PutKeyPolicyRequest, put_key_policy),
    "GetKeyPolicy": Handler(GetKeyPolicyRequest, get_key_policy),
    "ListKeyPolicies": Handler(ListKeyPoliciesRequest, list_key_policies),
    "CreateGrant": Handler(CreateGrantRequest, create_grant),
    "ListGrants": Handler(ListGrantsRequest, list_grants),
    "ListRetirableGrants": Handler(ListRetirableGrantsRequest, list_retirable_grants),
    "RevokeGrant": Handler(RevokeGrantRequest, revoke_grant),
    "RetireGrant": Handler(RetireGrantRequest, retire_grant),
    "TagResource": Handler(TagResourceRequest, tag_resource),
    "UntagResource": Handler(UntagResourceRequest, untag_resource),
    "ListResourceTags": Handler(ListResourceTagsRequest, list_resource_tags),
}
