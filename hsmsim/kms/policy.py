"""Key policies and grants: the default policy (AWS's `key-default-1`), policy document
validation, and evaluation of a caller's request against a key's policy and grants.

Evaluation follows AWS's model in a reduced form: an explicit Deny wins; otherwise an Allow in
the key policy or a matching grant permits. A statement allowing the account root delegates to
IAM, which we treat as "every principal of that account is allowed" (there are no IAM policies
here). Conditions supported: StringEquals / StringLike (and their ...IfExists) on
`kms:EncryptionContext:<k>`, `kms:CallerAccount`, `kms:ViaService`.

FIDELITY: IAM identity policies, Null/Bool/numeric/ARN condition operators and
`kms:GrantIsForAWSResource` are not modelled; unknown condition keys never match."""

from __future__ import annotations

import fnmatch
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hsmsim.kms import errors as e
from hsmsim.kms.model import GrantRecord

GRANT_OPERATIONS = (
    "Decrypt", "Encrypt", "GenerateDataKey", "GenerateDataKeyWithoutPlaintext", "ReEncryptFrom",
    "ReEncryptTo", "Sign", "Verify", "GetPublicKey", "CreateGrant", "RetireGrant", "DescribeKey",
    "GenerateDataKeyPair", "GenerateDataKeyPairWithoutPlaintext", "GenerateMac", "VerifyMac",
    "DeriveSharedSecret")


@dataclass(frozen=True)
class Caller:
    arn: str
    account: str
    access_key: str


def default_policy(account: str) -> str:
    return json.dumps({
        "Version": "2012-10-17", "Id": "key-default-1",
        "Statement": [{"Sid": "Enable IAM User Permissions", "Effect": "Allow",
                       "Principal": {"AWS": f"arn:aws:iam::{account}:root"},
                       "Action": "kms:*", "Resource": "*"}]}, indent=2)


# The AWS managed keys (`alias/aws/<service>`) hsmsim creates on first use, and the service
# endpoint prefix their policy's kms:ViaService condition names.
MANAGED_SERVICES: dict[str, str] = {
    "acm": "acm", "backup": "backup", "codecommit": "codecommit", "dynamodb": "dynamodb",
    "ebs": "ec2", "elasticfilesystem": "elasticfilesystem", "es": "es", "glue": "glue",
    "kinesis": "kinesis", "lambda": "lambda", "rds": "rds", "redshift": "redshift", "s3": "s3",
    "secretsmanager": "secretsmanager", "sns": "sns", "sqs": "sqs", "ssm": "ssm",
}


def managed_policy(account: str, region: str, service: str) -> str:
    """The key policy of an AWS managed key (KMS Developer Guide, "AWS managed keys" and the
    "Default key policy" examples such as aws/ebs's `auto-ebs-2`): principals of the account
    may use it through the service (kms:ViaService); the account may read its metadata and
    revoke grants directly. Nobody may change, disable or delete it."""
    via = MANAGED_SERVICES[service]
    return json.dumps({
        "Version": "2012-10-17", "Id": f"auto-{service}-2",
        "Statement": [
            {"Sid": f"Allow access through {service} for all principals in the account that are "
                    f"authorized to use {service}", "Effect": "Allow", "Principal": {"AWS": "*"},
             "Action": ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*",
                        "kms:CreateGrant", "kms:DescribeKey"], "Resource": "*",
             "Condition": {"StringEquals": {"kms:ViaService": f"{via}.{region}.amazonaws.com",
                                            "kms:CallerAccount": account}}},
            {"Sid": "Allow direct access to key metadata to the account", "Effect": "Allow",
             "Principal": {"AWS": f"arn:aws:iam::{account}:root"},
             "Action": ["kms:Describe*", "kms:Get*", "kms:List*", "kms:RevokeGrant"], "Resource": "*"}]},
        indent=2)


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def validate(document: str) -> dict[str, Any]:
    """The parsed policy; MalformedPolicy when it is not a policy document."""
    try:
        doc = json.loads(document)
    except ValueError:
        raise e.MalformedPolicy("The new key policy will not allow you to update the key policy in the future.") from None
    if not isinstance(doc, dict) or "Statement" not in doc:
        raise e.MalformedPolicy("Policy contains a statement with no Statement element.")
    for st in _as_list(doc["Statement"]):
        if not isinstance(st, dict):
            raise e.MalformedPolicy("Policy contains a malformed statement.")
        if st.get("Effect") not in ("Allow", "Deny"):
            raise e.MalformedPolicy("Policy contains a statement with an invalid Effect.")
        if "Principal" not in st and "NotPrincipal" not in st:
            raise e.MalformedPolicy("Policy contains a statement with no principal.")
    return doc


def _principal_matches(principal: Any, caller: Caller) -> bool:
    if principal == "*":
        return True
    if not isinstance(principal, dict):
        return False
    for value in _as_list(principal.get("AWS", [])):
        if value == "*" or value == caller.arn or value == caller.account:
            return True
        if value == f"arn:aws:iam::{caller.account}:root":
            return True  # the key policy delegates to IAM: the whole account
    return False


def _action_matches(actions: Any, action: str) -> bool:
    return any(fnmatch.fnmatchcase(action.lower(), str(a).lower()) for a in _as_list(actions))


def _condition_holds(cond: Any, caller: Caller, context: Mapping[str, str], via: str | None) -> bool:
    if not isinstance(cond, dict):
        return False
    for op, tests in cond.items():
        if not isinstance(tests, dict):
            return False
        if_exists = op.endswith("IfExists")
        base = op[:-8] if if_exists else op
        for key, expected in tests.items():
            lk = key.lower()
            if lk.startswith("kms:encryptioncontext:"):
                actual = context.get(key.split(":", 2)[2])
            elif lk == "kms:calleraccount":
                actual = caller.account
            elif lk == "kms:viaservice":
                actual = via
            else:
                return False
            if actual is None:
                if if_exists:
                    continue
                return False
            wanted = [str(x) for x in _as_list(expected)]
            if base == "StringEquals":
                ok = actual in wanted
            elif base == "StringLike":
                ok = any(fnmatch.fnmatchcase(actual, w) for w in wanted)
            elif base == "StringNotEquals":
                ok = actual not in wanted
            else:
                return False
            if not ok:
                return False
    return True


@functools.lru_cache(maxsize=1024)
def _statements(document: str) -> tuple[dict[str, Any], ...]:
    """The statements of a policy document, parsed once per distinct document."""
    try:
        doc = json.loads(document)
    except ValueError:
        return ()
    if not isinstance(doc, dict):
        return ()
    return tuple(st for st in _as_list(doc.get("Statement", [])) if isinstance(st, dict))


def evaluate(document: str, caller: Caller, action: str, context: Mapping[str, str]) -> str | None:
    """"Deny", "Allow" or None (no statement applies) for `kms:<action>`."""
    result: str | None = None
    for st in _statements(document):
        if not isinstance(st, dict):
            continue
        if "Principal" in st and not _principal_matches(st["Principal"], caller):
            continue
        if "NotPrincipal" in st and _principal_matches(st["NotPrincipal"], caller):
            continue
        if "Action" in st and not _action_matches(st["Action"], f"kms:{action}"):
            continue
        if "NotAction" in st and _action_matches(st["NotAction"], f"kms:{action}"):
            continue
        if "Action" not in st and "NotAction" not in st:
            continue
        if "Condition" in st and not _condition_holds(st["Condition"], caller, context, None):
            continue
        if st.get("Effect") == "Deny":
            return "Deny"
        result = "Allow"
    return result


def grant_allows(grant: GrantRecord, caller: Caller, operation: str, context: Mapping[str, str]) -> bool:
    """Whether `grant` lets `caller` perform `operation` with this encryption context."""
    if grant.grantee not in (caller.arn, f"arn:aws:iam::{caller.account}:root") or operation not in grant.operations:
        return False
    if grant.ec_equals is not None and dict(grant.ec_equals) != dict(context):
        return False
    if grant.ec_subset is not None and any(context.get(k) != v for k, v in grant.ec_subset):
        return False
    return True
