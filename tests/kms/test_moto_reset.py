"""`POST /moto-api/reset` behaves as moto_server's: the KMS starts over (every Region's keys,
aliases, grants and custom key stores), so test suites written for moto point at hsmsim
unchanged. Unsigned as moto takes it, verified in strict SigV4 mode, 404 without test control."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from hsmsim.kms.config import KmsConfig

from .conftest import KmsEndpoint, start_double, stop_double


def _post(ep: KmsEndpoint, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(ep.url + path, method="POST", data=b"", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _regional(ep: KmsEndpoint, region: str):  # type: ignore[no-untyped-def]
    import boto3
    return boto3.client("kms", endpoint_url=ep.url, region_name=region,
                        aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="secret")


def test_reset_forgets_every_region_and_serves_on(tmp_path: Path) -> None:
    ep = start_double(tmp_path)
    try:
        east, west = _regional(ep, "us-east-1"), _regional(ep, "eu-west-1")
        k = east.create_key()["KeyMetadata"]["KeyId"]
        east.create_alias(AliasName="alias/before-reset", TargetKeyId=k)
        east.create_grant(KeyId=k, GranteePrincipal="arn:aws:iam::111122223333:role/r",
                          Operations=["Decrypt"])
        blob = east.encrypt(KeyId=k, Plaintext=b"old")["CiphertextBlob"]
        west.create_key()
        status, body = _post(ep, "/moto-api/reset")  # unsigned, as moto's clients send it
        assert (status, body) == (200, {"status": "ok"})
        assert east.list_keys()["Keys"] == [] and west.list_keys()["Keys"] == []
        assert "alias/before-reset" not in [a["AliasName"] for a in east.list_aliases()["Aliases"]]
        with pytest.raises(east.exceptions.NotFoundException):
            east.describe_key(KeyId=k)
        with pytest.raises(Exception):
            east.decrypt(CiphertextBlob=blob)
        # ... and the KMS keeps serving: a new key works.
        k2 = east.create_key()["KeyMetadata"]["KeyId"]
        assert east.decrypt(CiphertextBlob=east.encrypt(KeyId=k2, Plaintext=b"new")["CiphertextBlob"])["Plaintext"] == b"new"
    finally:
        stop_double(ep)
    # The reset survives a restart: the store was emptied, not only the caches.
    ep = start_double(tmp_path)
    try:
        assert [x["KeyId"] for x in _regional(ep, "us-east-1").list_keys()["Keys"]] == [k2]
    finally:
        stop_double(ep)


def test_reset_is_verified_in_strict_mode_and_off_without_test_control(tmp_path: Path) -> None:
    ep = start_double(tmp_path / "strict", KmsConfig(port=0, strict_sigv4=True,
                                                    principals=("AKIDSTRICT=arn:aws:iam::111122223333:root=s3cret",)))
    try:
        assert _post(ep, "/moto-api/reset")[0] == 403
    finally:
        stop_double(ep)
    ep = start_double(tmp_path / "off", KmsConfig(port=0, clock_control=False))
    try:
        assert _post(ep, "/moto-api/reset")[0] == 404
    finally:
        stop_double(ep)
