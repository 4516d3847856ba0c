"""The wire edge and the ciphertext format without a server: JSON 1.1 decoding and validation
messages, the error table, SigV4 verification against botocore's signer, the blob layout and
the injective encryption-context encoding."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from hypothesis import given, strategies as st

from hsmsim.kms import blob, errors as e, sigv4, wire


def test_validation_messages() -> None:
    with pytest.raises(e.Invalid) as exc:
        wire.decode_request("Encrypt", json.dumps({"Plaintext": "QQ=="}).encode())
    assert exc.value.message == ("1 validation error detected: Value null at 'keyId' failed to satisfy "
                                 "constraint: Member must not be null")
    with pytest.raises(e.Invalid) as exc:
        wire.decode_request("GenerateRandom", b'{"NumberOfBytes": 0}')
    assert exc.value.message == ("1 validation error detected: Value '0' at 'numberOfBytes' failed to "
                                 "satisfy constraint: Member must have value greater than or equal to 1")
    with pytest.raises(e.Invalid) as exc:
        wire.decode_request("CreateKey", b'{"KeySpec": "X", "KeyUsage": "Y"}')
    assert exc.value.message.startswith("2 validation errors detected: ")
    with pytest.raises(e.Invalid) as exc:
        wire.decode_request("CreateCustomKeyStore", b'{"CustomKeyStoreName": "n", "KeyStorePassword": "abc"}')
    assert "abc" not in exc.value.message  # passwords are never echoed
    assert wire.decode_request("Encrypt", b'{"KeyId": "k", "Plaintext": "aGk=", "Unknown": 1}') == {
        "KeyId": "k", "Plaintext": b"hi"}


@pytest.mark.parametrize("body", [b"{", b"[]", b'"x"', b'{"KeyId": 5, "Plaintext": "QQ=="}',
                                  b'{"KeyId": "k", "Plaintext": "***"}', b'{"KeyId": "k", "Plaintext": 1}',
                                  b'{"KeyId": "k", "Plaintext": "QQ==", "EncryptionContext": []}',
                                  b'{"KeyId": "k", "Plaintext": "QQ==", "GrantTokens": "x"}',
                                  b"\xff\xfe"])
def test_malformed_bodies(body: bytes) -> None:
    with pytest.raises(e.Malformed):
        wire.decode_request("Encrypt", body)


def test_error_table() -> None:
    assert wire.to_wire(e.NotFound("m")) == wire.WireError("NotFoundException", 400, "m")
    assert wire.to_wire(e.Internal("")).status == 500
    assert wire.to_wire(e.KeyUnavailable("")).status == 500
    assert wire.to_wire(e.AuthMissing("")).status == 403
    for cls in e.KmsError.__subclasses__():
        assert cls in wire.ERROR_TABLE, cls
    with pytest.raises(e.UnknownOperation):
        wire.operation_name("TrentService.Nope")
    with pytest.raises(e.UnknownOperation):
        wire.operation_name("Other.Encrypt")
    assert wire.operation_name("TrentService.Encrypt") == "Encrypt"


def _signed(secret: str = "s3cret", body: bytes = b'{"KeyId":"k"}') -> AWSRequest:
    req = AWSRequest(method="POST", url="http://127.0.0.1:4599/", data=body,
                     headers={"X-Amz-Target": "TrentService.DescribeKey",
                              "Content-Type": "application/x-amz-json-1.1"})
    SigV4Auth(Credentials("AKIDEXAMPLE", secret), "kms", "us-east-1").add_auth(req)
    return req


def test_sigv4_verifies_botocore_signatures() -> None:
    req = _signed()
    headers = {"Host": "127.0.0.1:4599", **dict(req.headers.items())}  # as sent on the wire
    cred = sigv4.parse_authorization(headers["Authorization"])
    assert cred is not None and cred.access_key == "AKIDEXAMPLE" and cred.region == "us-east-1"
    sigv4.verify(cred, "s3cret", "POST", "/", "", headers, req.body)
    with pytest.raises(e.AuthBadSignature):
        sigv4.verify(cred, "wrong", "POST", "/", "", headers, req.body)
    with pytest.raises(e.AuthBadSignature):
        sigv4.verify(cred, "s3cret", "POST", "/", "", headers, req.body + b" ")
    with pytest.raises(e.AuthExpired):
        sigv4.verify(cred, "s3cret", "POST", "/", "", headers, req.body,
                     now=datetime(2001, 1, 1, tzinfo=timezone.utc))
    for bad in ("AWS4-HMAC-SHA256 Credential=x", "Basic abc", "AWS4-HMAC-SHA256 Credential=a/b, SignedHeaders=host, Signature=0"):
        with pytest.raises(e.AuthIncomplete):
            sigv4.parse_authorization(bad)
    assert sigv4.parse_authorization(None) is None


def test_context_encoding_is_injective_and_order_free() -> None:
    assert blob.encode_context({"a": "bc"}) != blob.encode_context({"ab": "c"})
    assert blob.encode_context({"a": "1", "b": "2"}) == blob.encode_context({"b": "2", "a": "1"})
    assert blob.encode_context({}) == blob.encode_context(None)
    assert blob.encode_context({"": ""}) != blob.encode_context({})


@given(st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=4),
       st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=4))
def test_context_encoding_injective_property(a: dict[str, str], b: dict[str, str]) -> None:
    assert (blob.encode_context(a) == blob.encode_context(b)) == (a == b)


def test_blob_layout() -> None:
    kid = "1234abcd-12ab-34cd-56ef-1234567890ab"
    hdr = blob.header(blob.ENGINE_FLEET, kid, bytes(range(32)))
    data = blob.pack(hdr, b"\x01" * 12, b"\x02" * (4096 + 16))
    assert len(data) == 4096 + 101 <= 6144
    parsed, h2 = blob.unpack(data)
    assert h2 == hdr and parsed.key_id == kid and parsed.material == bytes(range(32))
    assert parsed.iv == b"\x01" * 12 and parsed.engine == blob.ENGINE_FLEET
    for bad in (b"", data[:60], b"XX" + data[2:], data[:2] + b"\x09" + data[3:], data[:3] + b"\x07" + data[4:]):
        with pytest.raises(ValueError):
            blob.unpack(bad)


def test_quota_buckets() -> None:
    from hsmsim.kms.quotas import Quotas
    q = Quotas(op_rps={"CreateKey": 2}, shared=3, per_store=2)
    q.check("CreateKey")
    q.check("CreateKey")
    with pytest.raises(e.Throttled) as exc:
        q.check("CreateKey")
    assert exc.value.message.startswith("You have exceeded the rate at which you may call KMS.")
    for _ in range(3):
        q.check("Encrypt")  # the shared cryptographic quota
    with pytest.raises(e.Throttled):
        q.check("Decrypt")
    q.check_store("cks-1")
    q.check_store("cks-1")
    with pytest.raises(e.Throttled):
        q.check_store("cks-1")
    q.check_store("cks-2")  # each custom key store has its own bucket
