"""Pieces every operation family uses: the per-call context, the handler record (an operation's
typed input and its coroutine), pagination markers, tag rules, DryRun, and KeyMetadata
rendering."""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from hsmsim.kms import errors as e
from hsmsim.kms import model, policy
from hsmsim.kms.inputs import Tag
from hsmsim.kms.model import KeyRecord
from hsmsim.kms.policy import Caller
from hsmsim.kms.runtime import Kms

T = TypeVar("T")
In = TypeVar("In")  # an operation's input dataclass (hsmsim.kms.inputs)
Response = dict[str, Any]


@dataclass
class Call:
    """One request as the handlers see it: who calls, and what the audit record should name."""

    caller: Caller
    resources: list[str] = field(default_factory=list)
    additional: dict[str, Any] | None = None
    response_elements: dict[str, Any] | None = None
    # What to undo outside the KMS store (a key created in a CloudHSM cluster) if the request
    # fails after the handler did it: the request is all-or-nothing.
    undo: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def touch(self, key: KeyRecord) -> None:
        if key.arn not in self.resources:
            self.resources.append(key.arn)


@dataclass(frozen=True)
class Handler(Generic[In]):
    """One operation: the generated class of its input (`hsmsim.kms.inputs`) and the coroutine
    that serves it, which takes that input, already validated, and returns the output members.
    Built as `Handler(EncryptRequest, encrypt)`, so mypy checks that they agree."""

    input: type[In]
    run: Callable[[Kms, Call, In], Awaitable[Response]]


def require_customer_managed(kms: Kms, call: Call, key: KeyRecord, action: str) -> None:
    """AWS managed keys cannot be changed, disabled, deleted, re-policied, tagged or aliased by
    anyone (their key policy allows none of it; KMS Developer Guide, "AWS managed keys").

    FIDELITY: refused with AccessDeniedException even when [kms] enforce_policies is off, and
    the message is ours."""
    if key.key_manager == "AWS":
        raise e.AccessDenied(f"User: {call.caller.arn} is not authorized to perform: kms:{action} "
                             f"on resource: {key.arn} because it is an AWS managed key")


def paginate(items: Sequence[T], limit: int | None, marker: str | None,
             default_limit: int = 100) -> tuple[list[T], Response]:
    """One page of `items` (a request's Limit and Marker) and the NextMarker/Truncated members."""
    if limit is None:
        limit = default_limit
    start = 0
    if marker is not None:
        try:
            start = int(base64.urlsafe_b64decode(marker.encode()).decode().removeprefix("hsmsim:"))
        except (ValueError, UnicodeDecodeError):
            raise e.InvalidMarker("The marker that specifies where pagination should next begin is not valid.") from None
        if start < 0 or start > len(items):
            raise e.InvalidMarker("The marker that specifies where pagination should next begin is not valid.")
    page = list(items[start:start + limit])
    extra: Response = {"Truncated": start + limit < len(items)}
    if extra["Truncated"]:
        extra["NextMarker"] = base64.urlsafe_b64encode(f"hsmsim:{start + limit}".encode()).decode()
    return page, extra


def dry_run(flag: bool | None) -> None:
    """DryRunOperationException when a request's DryRun is set (call it once the checks passed)."""
    if flag:
        raise e.DryRun("The request would have succeeded, but the DryRun option is set.")


def initial_policy(kms: Kms, call: Call, doc: str | None, bypass_lockout_check: bool | None) -> Any:
    """The key policy of a new key (CreateKey, ReplicateKey): the request's `Policy`, checked
    and held to the lockout safety check unless bypassed, else the default key policy."""
    if doc is None:
        return policy.default_policy(kms.account)
    policy.validate(doc)
    if not bypass_lockout_check and \
            policy.evaluate(doc, call.caller, "PutKeyPolicy", {}) != "Allow":
        raise e.MalformedPolicy("The new key policy will not allow you to update the key policy in the future.")
    return doc


def check_tags(tags: Sequence[Tag] | None, existing: int = 0) -> list[tuple[str, str]]:
    seen: set[str] = set()
    out = []
    for tag in tags or ():
        k, v = tag.tag_key, tag.tag_value
        if k.startswith("aws:"):
            raise e.TagError("Tags beginning with aws: are reserved")
        if k in seen:
            raise e.TagError("Duplicate tag keys")
        seen.add(k)
        out.append((k, v))
    if existing + len(out) > 50:
        raise e.TagError("Too many tags")
    return out


def encryption_algorithms(key: KeyRecord) -> list[str] | None:
    if key.key_usage != "ENCRYPT_DECRYPT":
        return None
    if key.key_spec == model.SYMMETRIC:
        return ["SYMMETRIC_DEFAULT"]
    return ["RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256"]


def signing_algorithms(key: KeyRecord) -> list[str] | None:
    if key.key_usage != "SIGN_VERIFY":
        return None
    if key.key_spec in model.RSA_SPECS:
        return [f"RSASSA_{p}_SHA_{b}" for p in ("PSS", "PKCS1_V1_5") for b in (256, 384, 512)]
    return {"ECC_NIST_P256": ["ECDSA_SHA_256"], "ECC_SECG_P256K1": ["ECDSA_SHA_256"],
            "ECC_NIST_P384": ["ECDSA_SHA_384"], "ECC_NIST_P521": ["ECDSA_SHA_512"]}[key.key_spec]


def mac_algorithms(key: KeyRecord) -> list[str] | None:
    if key.key_usage != "GENERATE_VERIFY_MAC":
        return None
    return [f"HMAC_SHA_{key.key_spec.split('_')[1]}"]


def multi_region_configuration(kms: Kms, key: KeyRecord,
                               extra: dict[str, KeyRecord] | None = None) -> Response:
    """DescribeKey's MultiRegionConfiguration: the primary and every replica (a replica's own
    record among them), from every Region's record of the key (`extra`: records this request
    writes)."""
    regions = {**kms.store.key_regions(key.key_id), kms.region: key, **(extra or {})}
    primary = key.primary_region or kms.region
    return {
        "MultiRegionKeyType": "PRIMARY" if primary == kms.region else "REPLICA",
        "PrimaryKey": {"Arn": kms.key_arn_in(primary, key.key_id), "Region": primary},
        "ReplicaKeys": [{"Arn": rec.arn, "Region": r} for r, rec in sorted(regions.items()) if r != primary]}


def metadata(kms: Kms, key: KeyRecord, extra: dict[str, KeyRecord] | None = None) -> Response:
    state = kms.state_of(key)
    md: Response = {
        "AWSAccountId": kms.account, "KeyId": key.key_id, "Arn": key.arn,
        "CreationDate": key.created, "Enabled": state == model.ENABLED,
        "Description": key.description, "KeyUsage": key.key_usage, "KeyState": state,
        "Origin": key.origin, "KeyManager": key.key_manager,
        "CustomerMasterKeySpec": key.key_spec, "KeySpec": key.key_spec,
        "EncryptionAlgorithms": encryption_algorithms(key),
        "SigningAlgorithms": signing_algorithms(key),
        "MacAlgorithms": mac_algorithms(key),
        "MultiRegion": key.multi_region,
    }
    if key.state == model.PENDING_DELETION:
        md["DeletionDate"] = key.deletion_date
        md["PendingDeletionWindowInDays"] = key.pending_window
    elif key.state == model.PENDING_REPLICA_DELETION:  # the date is known once the last replica is gone
        md["PendingDeletionWindowInDays"] = key.pending_window
    if key.custom_key_store_id:
        md["CustomKeyStoreId"] = key.custom_key_store_id
        md["CloudHsmClusterId"] = key.cluster_id
    if key.multi_region:
        md["MultiRegionConfiguration"] = multi_region_configuration(kms, key, extra)
    if key.origin in (model.AWS_KMS, model.EXTERNAL) and key.key_spec == model.SYMMETRIC and key.current_material:
        md["CurrentKeyMaterialId"] = key.current_material
    if key.origin == model.EXTERNAL:
        md["ExpirationModel"] = key.expiration_model
        md["ValidTo"] = key.valid_to
    return md
