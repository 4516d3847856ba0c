"""Alias operations: CreateAlias, UpdateAlias, DeleteAlias, ListAliases. `alias/aws/` is
reserved for AWS managed keys."""

from __future__ import annotations

import re
from typing import Any

from hsmsim.kms import errors as e, model
from hsmsim.kms.model import AliasRecord, KeyRecord
from hsmsim.kms import policy
from hsmsim.kms.inputs import CreateAliasRequest, DeleteAliasRequest, ListAliasesRequest, UpdateAliasRequest
from hsmsim.kms.ops.common import Call, Handler, Response, paginate, require_customer_managed
from hsmsim.kms.runtime import Kms

MAX_ALIASES_PER_KEY = 50
# KMS API Reference, CreateAlias: the name "can contain only alphanumeric characters, forward
# slashes (/), underscores (_), and dashes (-)" (botocore's pattern also lets ':' through).
_NAME_RE = re.compile(r"^alias/[a-zA-Z0-9/_-]+$")
_PREFIX_MSG = ('Alias must start with the prefix "alias/". Please see '
               "https://docs.aws.amazon.com/kms/latest/developerguide/kms-alias.html")


def _check_name(name: str) -> None:
    if not name.startswith("alias/") or name == "alias/":
        raise e.Invalid(_PREFIX_MSG)
    if name.startswith("alias/aws/"):
        raise e.NotAuthorized("Cannot create, update or delete an alias with the reserved prefix alias/aws/.")


def _target(kms: Kms, call: Call, ref: str) -> KeyRecord:
    if ref.startswith("alias/") or ":alias/" in ref:
        raise e.Invalid("Aliases must refer to keys. Not aliases")
    key = kms.resolve(ref, aliases=False)
    call.touch(key)
    require_customer_managed(kms, call, key, "CreateAlias")  # API Reference: not an AWS managed key
    kms.require_not_pending_deletion(key)
    return key


def _key_type(key: KeyRecord) -> str:
    if key.key_spec == model.SYMMETRIC:
        return "SYMMETRIC"
    return "HMAC" if key.key_spec in model.HMAC_SPECS else "ASYMMETRIC"


async def create_alias(kms: Kms, call: Call, req: CreateAliasRequest) -> Response:
    name = req.alias_name
    _check_name(name)
    if not _NAME_RE.match(name):
        raise e.InvalidAliasName(f"Alias name {name} is not valid: an alias name can contain only "
                                 "alphanumeric characters, forward slashes (/), underscores (_), and dashes (-).")
    key = _target(kms, call, req.target_key_id)
    kms.authorize(call.caller, key, "CreateAlias")
    if name in kms.store.aliases:
        raise e.AlreadyExists(f"An alias with the name {kms.alias_arn(name)} already exists")
    if sum(1 for a in kms.store.aliases.values() if a.key_id == key.key_id) >= MAX_ALIASES_PER_KEY:
        raise e.LimitExceeded(f"Too many aliases for {key.arn}")
    now = kms.clock.now()
    kms.store.put_alias(AliasRecord(name, key.key_id, now, now))
    return {}


async def update_alias(kms: Kms, call: Call, req: UpdateAliasRequest) -> Response:
    name = req.alias_name
    _check_name(name)
    alias = kms.store.aliases.get(name)
    if alias is None:
        raise e.NotFound(f"Alias {kms.alias_arn(name)} is not found.")
    key = _target(kms, call, req.target_key_id)
    kms.authorize(call.caller, key, "UpdateAlias")
    old = kms.store.keys.get(alias.key_id)
    # KMS Developer Guide, "Update aliases": the current and new key must be the same type
    # (symmetric, asymmetric or HMAC) and have the same key usage; the key spec may differ.
    if old is not None and (old.key_usage, _key_type(old)) != (key.key_usage, _key_type(key)):
        raise e.Invalid(f"{key.arn} key type or key usage does not match the current target of {name}.")
    kms.store.put_alias(AliasRecord(name, key.key_id, alias.created, kms.clock.now()))
    return {}


async def delete_alias(kms: Kms, call: Call, req: DeleteAliasRequest) -> Response:
    name = req.alias_name
    _check_name(name)
    alias = kms.store.aliases.get(name)
    if alias is None:
        raise e.NotFound(f"Alias {kms.alias_arn(name)} is not found.")
    key = kms.store.keys.get(alias.key_id)
    if key is not None:
        call.touch(key)
        kms.authorize(call.caller, key, "DeleteAlias")
    kms.store.delete_alias(name)
    return {}


async def list_aliases(kms: Kms, call: Call, req: ListAliasesRequest) -> Response:
    aliases = sorted(kms.store.aliases.values(), key=lambda a: a.name)
    if req.key_id is not None:
        key = kms.resolve(req.key_id, aliases=False)
        call.touch(key)
        aliases = [a for a in aliases if a.key_id == key.key_id]
    rows: list[Response] = [{"AliasName": a.name, "AliasArn": kms.alias_arn(a.name), "TargetKeyId": a.key_id,
                             "CreationDate": a.created, "LastUpdatedDate": a.updated} for a in aliases]
    if req.key_id is None:
        # API Reference, ListAliases: the predefined AWS aliases not yet associated with a key
        # are listed without TargetKeyId.
        rows += [{"AliasName": f"alias/aws/{s}", "AliasArn": kms.alias_arn(f"alias/aws/{s}")}
                 for s in policy.MANAGED_SERVICES if f"alias/aws/{s}" not in kms.store.aliases]
        rows.sort(key=lambda r: str(r["AliasName"]))
    page, extra = paginate(rows, req.limit, req.marker)
    return {"Aliases": page, **extra}


HANDLERS: dict[str, Handler[Any]] = {
    "CreateAlias": Handler(CreateAliasRequest, create_alias),
    "UpdateAlias": Handler(UpdateAliasRequest, update_alias),
    "DeleteAlias": Handler(DeleteAliasRequest, delete_alias),
    "ListAliases": Handler(ListAliasesRequest, list_aliases),
}

