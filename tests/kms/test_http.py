"""Ring 2: raw HTTP against the real daemon's KMS endpoint: framing, content types, unknown
targets, malformed and oversized bodies, authentication headers, request ids, and a short
fuzz of bodies (a long one is marked soak). Every answer must be an AWS-shaped JSON error
with the right status, and the server must stay up."""

from __future__ import annotations

import http.client
import json
import random
from typing import Any
from urllib.parse import urlsplit

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from .conftest import KmsEndpoint

JSON11 = "application/x-amz-json-1.1"


def send(ep: KmsEndpoint, body: bytes, target: str | None = "TrentService.ListKeys",
         content_type: str | None = JSON11, sign: bool = True, method: str = "POST",
         path: str = "/", extra: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    u = urlsplit(ep.url)
    headers: dict[str, str] = {}
    if target is not None:
        headers["X-Amz-Target"] = target
    if content_type is not None:
        headers["Content-Type"] = content_type
    if sign:
        req = AWSRequest(method=method, url=ep.url + path, data=body, headers=headers)
        SigV4Auth(Credentials("AKIDRAW", "raw-secret"), "kms", ep.region).add_auth(req)
        headers = dict(req.headers.items())
    headers.update(extra or {})
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        hdrs = {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()
    try:
        parsed = json.loads(raw) if raw else None
    except ValueError:
        parsed = raw
    return resp.status, hdrs, parsed


@pytest.fixture(scope="module")
def ep(kms_real: KmsEndpoint) -> KmsEndpoint:
    return kms_real


def test_success_framing(ep: KmsEndpoint) -> None:
    status, headers, body = send(ep, b"{}")
    assert status == 200 and headers["content-type"] == JSON11
    assert len(headers["x-amzn-requestid"]) == 36 and "Keys" in body
    status, headers, body = send(ep, b"{}", content_type="application/json")
    assert status == 200  # hand-rolled clients (curl) send plain JSON


@pytest.mark.parametrize("target,want", [
    ("TrentService.NoSuchOperation", "UnknownOperationException"),
    ("OtherService.ListKeys", "UnknownOperationException"),
    (None, "UnknownOperationException"),
])
def test_unknown_targets(ep: KmsEndpoint, target: str | None, want: str) -> None:
    status, headers, body = send(ep, b"{}", target=target)
    assert status == 400 and body["__type"] == want and "x-amzn-requestid" in headers


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/xml"])
def test_wrong_content_types(ep: KmsEndpoint, content_type: str | None) -> None:
    status, _, body = send(ep, b"{}", content_type=content_type)
    assert status == 400 and body["__type"] == "SerializationException"


@pytest.mark.parametrize("payload", [b"{", b"[1,2]", b"null", b'{"KeyId": 12}', b'{"KeyId": "k", "Plaintext": "%%%"}',
                                     b'{"KeyId": "k", "Plaintext": "QQ==", "EncryptionContext": {"a": 1}}',
                                     b"\x00\xff" * 10])
def test_malformed_bodies(ep: KmsEndpoint, payload: bytes) -> None:
    status, _, body = send(ep, payload, target="TrentService.Encrypt")
    assert status == 400 and body["__type"] == "SerializationException" and body["message"]


@pytest.mark.parametrize("op", ["DeriveSharedSecret", "Encapsulate", "Decapsulate"])
def test_unimplemented_operations(ep: KmsEndpoint, op: str) -> None:
    from hsmsim.kms.shapes import OPERATIONS, SHAPES
    required = SHAPES[OPERATIONS[op]["input"]].get("required", [])
    members = SHAPES[OPERATIONS[op]["input"]]["members"]
    doc = {m: ("QUFBQQ==" if SHAPES[members[m]]["type"] == "blob" else "us-west-2" if m.endswith("Region") else
               SHAPES[members[m]].get("enum", ["x" * max(1, SHAPES[members[m]].get("min", 1))])[0])
           for m in required}
    status, _, body = send(ep, json.dumps(doc).encode(), target=f"TrentService.{op}")
    assert status == 400 and body["__type"] == "UnsupportedOperationException", body


def test_missing_member_and_constraints(ep: KmsEndpoint) -> None:
    status, _, body = send(ep, b"{}", target="TrentService.Encrypt")
    assert status == 400 and body["__type"] == "ValidationException"
    assert body["message"].startswith("2 validation errors detected: Value null at 'keyId'")
    status, _, body = send(ep, b'{"Limit": 0}', target="TrentService.ListKeys")
    assert status == 400 and body["__type"] == "ValidationException"


def test_oversized_request(ep: KmsEndpoint) -> None:
    big = json.dumps({"KeyId": "k", "Plaintext": "A" * 200_000}).encode()
    status, headers, body = send(ep, big, target="TrentService.Encrypt")
    assert status == 413 and body["__type"] == "RequestEntityTooLargeException"
    assert "x-amzn-requestid" in headers
    assert send(ep, b"{}")[0] == 200  # still serving


def test_oversized_chunked_request(ep: KmsEndpoint) -> None:
    """No Content-Length: the limit applies while reading the chunked body."""
    u = urlsplit(ep.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        body = iter([b'{"KeyId": "k", "Plaintext": "', b"A" * 100_000, b'"}'])
        conn.request("POST", "/", body=body, encode_chunked=True, headers={
            "X-Amz-Target": "TrentService.Encrypt", "Content-Type": JSON11,
            "Authorization": "AWS4-HMAC-SHA256 Credential=AKIDRAW/20261123/us-east-1/kms/aws4_request, "
                             "SignedHeaders=host, Signature=00"})
        resp = conn.getresponse()
        data = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 413 and data["__type"] == "RequestEntityTooLargeException"
    assert send(ep, b"{}")[0] == 200


def test_authentication_required(ep: KmsEndpoint) -> None:
    status, _, body = send(ep, b"{}", sign=False)
    assert status == 403 and body["__type"] == "MissingAuthenticationTokenException"
    status, _, body = send(ep, b"{}", sign=False, extra={"Authorization": "AWS4-HMAC-SHA256 Credential=x"})
    assert status == 400 and body["__type"] == "IncompleteSignatureException"


def test_other_methods(ep: KmsEndpoint) -> None:
    status, headers, body = send(ep, b"", method="GET", sign=False)
    assert status == 400 and body["__type"] == "UnknownOperationException" and "x-amzn-requestid" in headers


def _fuzz(ep: KmsEndpoint, n: int, seed: int) -> None:
    rng = random.Random(seed)
    ops = ["Encrypt", "Decrypt", "CreateAlias", "GenerateDataKey", "Sign", "CreateGrant", "ListAliases",
           "CreateCustomKeyStore", "ReEncrypt", "TagResource"]
    atoms: list[Any] = [None, True, 0, -1, 2**63, 1.5, "", "x" * 300, "alias/aws/x", "QQ==", [], {}, [1], {"a": None}]
    members = ["KeyId", "Plaintext", "CiphertextBlob", "AliasName", "TargetKeyId", "NumberOfBytes", "KeySpec",
               "EncryptionContext", "GrantTokens", "Tags", "Operations", "GranteePrincipal", "Limit", "Marker"]
    for _ in range(n):
        op = rng.choice(ops)
        doc = {rng.choice(members): rng.choice(atoms) for _ in range(rng.randint(0, 4))}
        raw = json.dumps(doc).encode()
        if rng.random() < 0.2:
            cut = rng.randint(0, len(raw))
            raw = raw[:cut] + bytes([rng.randint(0, 255)]) + raw[cut + 1:]
        status, _, body = send(ep, raw, target=f"TrentService.{op}")
        assert status in (200, 400), (op, raw, status, body)
        if status == 400:
            assert isinstance(body, dict) and body.get("__type", "").endswith("Exception"), body


def test_fuzz_short(ep: KmsEndpoint) -> None:
    _fuzz(ep, 150, 1)
    assert send(ep, b"{}")[0] == 200


@pytest.mark.soak
def test_fuzz_long(ep: KmsEndpoint) -> None:
    _fuzz(ep, 5000, 2)
