"""AWS managed keys (KMS Developer Guide "AWS managed keys"; API Reference DescribeKey,
ListAliases): `alias/aws/<service>` is listed before any key exists, first use through the alias
creates the key (KeyManager AWS, the AWS managed key policy, yearly rotation), and nobody can
disable, delete, re-policy, alias or stop the rotation of it. Ring 1 and ring 3 through boto3,
ring 2 raw."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from hsmsim.kms.config import KmsConfig
from .conftest import KmsEndpoint, start_double, stop_double
from .test_http import send

NO_RETRY = Config(parameter_validation=False, retries={"total_max_attempts": 1})


def code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


def regional(ep: KmsEndpoint, region: str) -> Any:
    import boto3
    return boto3.client("kms", endpoint_url=ep.url, region_name=region, aws_access_key_id="AKIDMANAGED",
                        aws_secret_access_key="secret", config=NO_RETRY)


def _alias(c: Any, name: str) -> dict[str, Any] | None:
    found = [a for a in c.list_aliases(Limit=1000)["Aliases"] if a["AliasName"] == name]
    return found[0] if found else None


def test_created_by_first_use(kms: KmsEndpoint) -> None:
    c = regional(kms, "us-west-2")
    before = _alias(c, "alias/aws/ebs")
    assert before == {"AliasName": "alias/aws/ebs", "AliasArn": f"arn:aws:kms:us-west-2:{kms.account}:alias/aws/ebs"}
    md = c.describe_key(KeyId="alias/aws/ebs")["KeyMetadata"]
    assert md["KeyManager"] == "AWS" and md["KeyState"] == "Enabled" and md["KeySpec"] == "SYMMETRIC_DEFAULT"
    after = _alias(c, "alias/aws/ebs")
    assert after is not None and after["TargetKeyId"] == md["KeyId"]
    assert c.describe_key(KeyId="alias/aws/ebs")["KeyMetadata"]["KeyId"] == md["KeyId"]  # once only
    assert md["KeyId"] in [k["KeyId"] for k in c.list_keys(Limit=1000)["Keys"]]
    policy = json.loads(c.get_key_policy(KeyId=md["KeyId"])["Policy"])
    assert policy["Id"] == "auto-ebs-2"
    via = policy["Statement"][0]["Condition"]["StringEquals"]
    assert via == {"kms:ViaService": "ec2.us-west-2.amazonaws.com", "kms:CallerAccount": kms.account}
    status = c.get_key_rotation_status(KeyId=md["KeyId"])
    assert status["KeyRotationEnabled"] is True and status["RotationPeriodInDays"] == 365
    # the key is regional: another Region has its own (not yet created) aws/ebs
    other = regional(kms, "eu-south-1")
    assert "TargetKeyId" not in (_alias(other, "alias/aws/ebs") or {})


def test_cannot_be_managed_by_the_customer(kms: KmsEndpoint) -> None:
    c = regional(kms, "us-west-1")
    kid = c.describe_key(KeyId="alias/aws/s3")["KeyMetadata"]["KeyId"]
    attempts = [
        lambda: c.disable_key(KeyId=kid),
        lambda: c.schedule_key_deletion(KeyId=kid, PendingWindowInDays=7),
        lambda: c.put_key_policy(KeyId=kid, PolicyName="default", Policy=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"},
                                                    "Action": "kms:*", "Resource": "*"}]})),
        lambda: c.disable_key_rotation(KeyId=kid),
        lambda: c.enable_key_rotation(KeyId=kid, RotationPeriodInDays=90),
        lambda: c.create_alias(AliasName="alias/my-s3", TargetKeyId=kid),
        lambda: c.tag_resource(KeyId=kid, Tags=[{"TagKey": "a", "TagValue": "b"}]),
    ]
    for attempt in attempts:
        with pytest.raises(ClientError) as exc:
            attempt()
        assert code(exc) == "AccessDeniedException"
    for alias_call in (lambda: c.delete_alias(AliasName="alias/aws/s3"),
                       lambda: c.update_alias(AliasName="alias/aws/s3", TargetKeyId=c.create_key()["KeyMetadata"]["KeyId"])):
        with pytest.raises(ClientError) as exc:
            alias_call()
        assert code(exc) == "NotAuthorizedException"
    md = c.describe_key(KeyId=kid)["KeyMetadata"]
    assert md["KeyState"] == "Enabled" and c.get_key_rotation_status(KeyId=kid)["KeyRotationEnabled"] is True
    # direct use is refused by its policy (only through the service, kms:ViaService)
    with pytest.raises(ClientError) as exc:
        c.encrypt(KeyId="alias/aws/s3", Plaintext=b"direct")
    assert code(exc) == "AccessDeniedException"


def test_first_use_by_encrypt_without_policies(tmp_path: Path) -> None:
    ep = start_double(tmp_path, KmsConfig(port=0, enforce_policies=False))
    try:
        c = ep.client(config=NO_RETRY)
        out = c.generate_data_key(KeyId="alias/aws/secretsmanager", KeySpec="AES_256")
        kid = out["KeyId"].rsplit("/", 1)[1]
        assert c.describe_key(KeyId=kid)["KeyMetadata"]["KeyManager"] == "AWS"
        assert c.decrypt(CiphertextBlob=out["CiphertextBlob"])["Plaintext"] == out["Plaintext"]
        with pytest.raises(ClientError) as exc:  # still not the customer's to disable
            c.disable_key(KeyId=kid)
        assert code(exc) == "AccessDeniedException"
        with pytest.raises(ClientError) as exc:  # an unknown service has no predefined alias
            c.encrypt(KeyId="alias/aws/no-such-service", Plaintext=b"x")
        assert code(exc) == "NotFoundException"
    finally:
        stop_double(ep)


def test_managed_key_raw_http(kms_real: KmsEndpoint) -> None:
    status, _, body = send(kms_real, b'{"KeyId": "alias/aws/dynamodb"}', target="TrentService.DescribeKey")
    assert status == 200 and body["KeyMetadata"]["KeyManager"] == "AWS"
    kid = body["KeyMetadata"]["KeyId"]
    status, _, body = send(kms_real, json.dumps({"KeyId": kid}).encode(), target="TrentService.DisableKey")
    assert status == 400 and body["__type"] == "AccessDeniedException"
