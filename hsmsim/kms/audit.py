"""The KMS audit trail: one CloudTrail-shaped JSON line per call, successful or not, in
`<state>/kms/audit.jsonl`, and the reader `hsmsim audit --kms` uses. Records never contain
plaintext, ciphertext, data keys, passwords or trust anchors: request parameters pass through
an allow-list."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

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
    "CloudHsmClusterId", "NewCustomKeyStoreName", "DryRun", "IncludeKeyMaterial", "ReplicaRegion",
    "PrimaryRegion",
}
_READ_ONLY = ("Describe", "List", "Get")


_CAMEL = {name: name[:1].lower() + name[1:] for name in _LOGGED}


def request_parameters(op: str, params: Mapping[str, Any]) -> dict[str, Any] | None:
    out = {_CAMEL[k]: v for k, v in params.items() if k in _CAMEL and not isinstance(v, bytes)}
    if op == "Decrypt":
        out.setdefault("encryptionAlgorithm", "SYMMETRIC_DEFAULT")
    return out or None


class AuditLog:
    """Appends records, each with one write(2) to an O_APPEND file before the response is sent
    (so a reader that saw the response sees the record)."""

    def __init__(self, state_dir: Path) -> None:
        path = state_dir / AUDIT_FILE
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._pending: list[str] = []
        self._scheduled = False
        self._last_second = -1
        self._last_time = ""

    def _write(self, line: str) -> None:
        self._pending.append(line)
        self.flush()

    def flush(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        data = "".join(self._pending).encode()
        self._pending.clear()
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]

    def _event_time(self, when: float) -> str:
        second = int(when)
        if second != self._last_second:
            self._last_second = second
            self._last_time = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))
        return self._last_time

    def record(self, *, op: str, caller_arn: str, account: str, access_key: str, region: str,
               source_ip: str, user_agent: str, request_id: str, params: Mapping[str, Any],
               resources: list[str], error: tuple[str, str] | None, when: float,
               response: Mapping[str, Any] | None = None,
               additional: Mapping[str, Any] | None = None) -> str:
        """Renders and appends one record; returns its event id."""
        event_id, line = self.render(
            op=op, caller_arn=caller_arn, account=account, access_key=access_key, region=region,
            source_ip=source_ip, user_agent=user_agent, request_id=request_id, params=params,
            resources=resources, error=error, when=when, response=response, additional=additional)
        self.append(line)
        return event_id

    def append(self, line: str) -> None:
        """Appends one rendered record (OSError when it cannot be written)."""
        self._write(line)

    def render(self, *, op: str, caller_arn: str, account: str, access_key: str, region: str,
               source_ip: str, user_agent: str, request_id: str, params: Mapping[str, Any],
               resources: list[str], error: tuple[str, str] | None, when: float,
               response: Mapping[str, Any] | None = None,
               additional: Mapping[str, Any] | None = None) -> tuple[str, str]:
        """(event id, JSON line) of one record, not yet written (so that a request can write it
        in the same step as its store changes)."""
        h = os.urandom(16).hex()
        event_id = f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:32]}"
        rec: dict[str, Any] = {
            "eventVersion": "1.08",
            "userIdentity": {"type": "Root" if caller_arn.endswith(":root") else "IAMUser",
                             "principalId": account, "arn": caller_arn, "accountId": account,
                             "accessKeyId": access_key},
            "eventTime": self._event_time(when),
            "eventSource": "kms.amazonaws.com",
            "eventName": op,
            "awsRegion": region,
            "sourceIPAddress": source_ip,
            "userAgent": user_agent,
            "requestParameters": request_parameters(op, params),
            "responseElements": response or None,
            "requestID": request_id,
            "eventID": event_id,
            "readOnly": op.startswith(_READ_ONLY) or _is_data_event(op),  # CloudTrail: crypto is read-only
            "resources": [{"accountId": account, "type": "AWS::KMS::Key", "ARN": r} for r in resources],
            "eventType": "AwsApiCall",
            "managementEvent": not _is_data_event(op),
            "recipientAccountId": account,
        }
        if additional:
            rec["additionalEventData"] = dict(additional)
        if error is not None:
            rec["errorCode"], rec["errorMessage"] = error
        return event_id, json.dumps(rec, separators=(",", ":"), allow_nan=False) + "\n"

    def close(self) -> None:
        self.flush()
        os.close(self._fd)


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


def summary(rec: Mapping[str, Any]) -> str:
    """One human-readable line for a record (what `hsmsim audit --kms` can print on a terminal):
    time, event, outcome, caller, resources."""
    outcome = "OK" if "errorCode" not in rec else f"{rec['errorCode']}: {rec.get('errorMessage', '')}".rstrip(": ")
    who = (rec.get("userIdentity") or {}).get("arn", "")
    res = ",".join(r.get("ARN", "") for r in rec.get("resources") or [])
    return f"{rec.get('eventTime', '')} {rec.get('eventName', '')} {outcome} by={who}" + (f" on={res}" if res else "")
