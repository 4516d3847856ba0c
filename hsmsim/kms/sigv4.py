"""AWS Signature Version 4 for KMS requests: parses the Authorization header (access key,
credential scope, signed headers) and, in strict mode, recomputes and checks the signature.
Signatures are compared in constant time; secrets never appear in errors."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from urllib.parse import quote

from hsmsim.kms import errors as e

ALGORITHM = "AWS4-HMAC-SHA256"
MAX_SKEW_SECONDS = 15 * 60


@dataclass(frozen=True)
class Credential:
    access_key: str
    date: str
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str

    @property
    def scope(self) -> str:
        return f"{self.date}/{self.region}/{self.service}/aws4_request"


def parse_authorization(header: str | None) -> Credential | None:
    """The credential of an `Authorization: AWS4-HMAC-SHA256 ...` header; None when absent.
    A present but malformed header is IncompleteSignature."""
    if not header:
        return None
    if not header.startswith(ALGORITHM + " "):
        raise e.AuthIncomplete(f"Authorization header requires the '{ALGORITHM}' algorithm.")
    fields: dict[str, str] = {}
    for part in header[len(ALGORITHM) + 1:].split(","):
        key, sep, value = part.strip().partition("=")
        if sep:
            fields[key] = value
    missing = [k for k in ("Credential", "SignedHeaders", "Signature") if k not in fields]
    if missing:
        raise e.AuthIncomplete(
            f"Authorization header requires '{missing[0]}' parameter. Authorization={ALGORITHM}")
    scope = fields["Credential"].split("/")
    if len(scope) != 5 or scope[4] != "aws4_request" or not scope[0]:
        raise e.AuthIncomplete("Credential should be scoped to a valid region, service and aws4_request.")
    return Credential(scope[0], scope[1], scope[2], scope[3],
                      tuple(h.strip().lower() for h in fields["SignedHeaders"].split(";") if h.strip()),
                      fields["Signature"].strip())


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def signing_key(secret: str, cred: Credential) -> bytes:
    k = _hmac(("AWS4" + secret).encode(), cred.date)
    k = _hmac(k, cred.region)
    k = _hmac(k, cred.service)
    return _hmac(k, "aws4_request")


def canonical_request(method: str, path: str, query: str, headers: Mapping[str, str],
                      signed: tuple[str, ...], body: bytes) -> str:
    lower = {k.lower(): v for k, v in headers.items()}
    canon_headers = "".join(f"{h}:{' '.join(lower.get(h, '').split())}\n" for h in signed)
    pairs = sorted(tuple(p.split("=", 1) + [""])[:2] for p in query.split("&") if p)
    canon_query = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in pairs)
    return "\n".join([method, quote(path or "/", safe="/-_.~"), canon_query, canon_headers,
                      ";".join(signed), hashlib.sha256(body).hexdigest()])


def verify(cred: Credential, secret: str, method: str, path: str, query: str,
           headers: Mapping[str, str], body: bytes, now: datetime | None = None) -> None:
    """Checks the request's signature and date; raises the AWS authentication errors."""
    lower = {k.lower(): v for k, v in headers.items()}
    amz_date = lower.get("x-amz-date", "")
    try:
        when = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    except ValueError:
        raise e.AuthIncomplete("Authorization header requires existence of either a 'X-Amz-Date' "
                               "or a 'Date' header.") from None
    if "host" not in cred.signed_headers:
        raise e.AuthIncomplete("'Host' must be a 'SignedHeader' in the AWS Authorization.")
    now = now or datetime.now(timezone.utc)
    if abs((now - when).total_seconds()) > MAX_SKEW_SECONDS:
        raise e.AuthExpired("Signature expired: " + amz_date + " is now earlier than "
                            + (now.strftime("%Y%m%dT%H%M%SZ")) + ".")
    canon = canonical_request(method, path, query, headers, cred.signed_headers, body)
    to_sign = "\n".join([ALGORITHM, amz_date, cred.scope,
                         hashlib.sha256(canon.encode()).hexdigest()])
    expected = hmac.new(signing_key(secret, cred), to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, cred.signature):
        raise e.AuthBadSignature(
            "The request signature we calculated does not match the signature you provided. "
            "Check your AWS Secret Access Key and signing method. Consult the service "
            "documentation for details.")
