"""The KMS audit trail: one CloudTrail-shaped JSON line per call, successful or not, in
`<state>/kms/audit.jsonl`, and the reader `hsmsim audit --kms` uses. Records never contain
plaintext, ciphertext, data keys, passwords or trust anchors: request parameters pass through
an allow-list."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

AUDIT_FILE = Path("kms") / "audit.jsonl"

# Request members that may be logged (camelCased on output). Everything else is dropped.
_LOGGED = {
    "KeyId", "EncryptionContext", "EncryptionAlgorithm", "KeySpec", "NumberOfBytes", "KeyPairSpec",
    "KeyUsage", "CustomerMasterKeySpec", "Origin", "CustomKeyStoreId", "Description", "MultiRegion",
    "AliasName", "TargetKeyId", "PendingWindowInDays", "RotationPeriodInDays", "SigningAlgorithm",
    "MessageType", "MacAlgorithm", "GranteePrincipal", "RetiringPrincipal", "Operations", "Constraints",
    "Name", "GrantId", "PolicyName", "BypassPolicyLockoutSafetyCheck", "TagKeys", "Limit", "Marker",
    "SourceKeyId", "DestinationKeyId", "SourceEncryptionContext", "DestinationEncryptionContext",
    "SourceEncryptionAlgorithm", "DestinationEncryptionAlgorithm", "CustomKeyStoreName",
    "CloudHsmClusterId", "NewCustomKeyStoreName", "DryRun", "IncludeKeyMaterial",
}
_READ_ONLY = ("Describe", "List", "Get")


def _camel(name: str) -> str:
    return name[:1].lower() + name[1:]


def request_parameters(op: str, params: Mapping[str, Any]) -> dict[str, Any] | None:
    out = {_camel(k): v for k, v in params.items() if k in _LOGGED and not isinstance(v, bytes)}
    if op == "Decrypt":
        out.setdefault("encryptionAlgorithm", "SYMMETRIC_DEFAULT")
    return out or None


class AuditLog:
    """Appends records; each line is flushed before the response is sent."""

    def __init__(self, state_dir: Path) -> None:
        path = state_dir / AUDIT_FILE
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._f: TextIO = os.fdopen(fd, "a", buffering=1)

    def record(self, *, op: str, caller_arn: str, account: str, access_key: str, region: str,
               source_ip: str, user_agent: str, request_id: str, params: Mapping[str, Any],
               resources: list[str], error: tuple[str, str] | None, when: float,
               response: Mapping[str, Any] | None = None,
               additional: Mapping[str, Any] | None = None) -> str:
        event_id = str(uuid.uuid4())
        rec: dict[str, Any] = {
            "eventVersion": "1.08",
            "userIdentity": {"type": "Root" if caller_arn.endswith(":root") else "IAMUser",
                             "principalId": account, "arn": caller_arn, "accountId": account,
                             "accessKeyId": access_key},
            "eventTime": datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "eventSource": "kms.amazonaws.com",
            "eventName": op,
            "awsRegion": region,
            "sourceIPAddress": source_ip,
            "userAgent": user_agent,
            "requestParameters": request_parameters(op, params),
            "responseElements": response or None,
            "requestID": request_id,
            "eventID": event_id,
            "readOnly": op.startswith(_READ_ONLY),
            "resources": [{"accountId": account, "type": "AWS::KMS::Key", "ARN": r} for r in resources],
            "eventType": "AwsApiCall",
            "managementEvent": not _is_data_event(op),
            "recipientAccountId": account,
        }
        if additional:
            rec["additionalEventData"] = dict(additional)
        if error is not None:
            rec["errorCode"], rec["errorMessage"] = error
        self._f.write(json.dumps(rec, separators=(",", ":")) + "\n")
        return event_id

    def close(self) -> None:
        self._f.close()


def _is_data_event(op: str) -> bool:
    return op in {"Encrypt", "Decrypt", "ReEncrypt", "GenerateDataKey", "GenerateDataKeyWithoutPlaintext",
                  "GenerateDataKeyPair", "GenerateDataKeyPairWithoutPlaintext", "GenerateRandom",
                  "Sign", "Verify", "GenerateMac", "VerifyMac"}


def read(state_dir: Path) -> Iterator[dict[str, Any]]:
    """The KMS audit records of a state directory, oldest first (a torn last line is skipped)."""
    path = state_dir / AUDIT_FILE
    if not path.exists():
        return
    with path.open("r", encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except ValueError:
                continue
