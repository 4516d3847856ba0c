"""Alias rules as AWS has them (KMS Developer Guide "Update aliases", API Reference
CreateAlias): UpdateAlias needs the same key type and key usage, not the same key spec; alias
names allow only [a-zA-Z0-9/_-] after `alias/`. Ring 1 and ring 3 through boto3, ring 2 raw."""

from __future__ import annotations

import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from .conftest import KmsEndpoint
from .test_http import send

NO_RETRY = Config(parameter_validation=False, retries={"total_max_attempts": 1})


def code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


def test_update_alias_same_type_and_usage_any_spec(kms: KmsEndpoint) -> None:
    c = kms.client(config=NO_RETRY)
    r2048 = c.create_key(KeySpec="RSA_2048", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"]
    r4096 = c.create_key(KeySpec="RSA_4096", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"]
    p256 = c.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"]
    rsa_enc = c.create_key(KeySpec="RSA_2048", KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]["KeyId"]
    h256 = c.create_key(KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")["KeyMetadata"]["KeyId"]
    h512 = c.create_key(KeySpec="HMAC_512", KeyUsage="GENERATE_VERIFY_MAC")["KeyMetadata"]["KeyId"]
    c.create_alias(AliasName="alias/rules-signer", TargetKeyId=r2048)
    c.update_alias(AliasName="alias/rules-signer", TargetKeyId=r4096)  # RSA_2048 -> RSA_4096
    c.update_alias(AliasName="alias/rules-signer", TargetKeyId=p256)   # RSA -> ECC, both asymmetric signing
    assert c.describe_key(KeyId="alias/rules-signer")["KeyMetadata"]["KeyId"] == p256
    with pytest.raises(ClientError) as exc:
        c.update_alias(AliasName="alias/rules-signer", TargetKeyId=rsa_enc)  # other usage
    assert code(exc) == "ValidationException"
    c.create_alias(AliasName="alias/rules-mac", TargetKeyId=h256)
    c.update_alias(AliasName="alias/rules-mac", TargetKeyId=h512)
    sym = c.create_key()["KeyMetadata"]["KeyId"]
    with pytest.raises(ClientError) as exc:
        c.update_alias(AliasName="alias/rules-mac", TargetKeyId=sym)  # HMAC -> symmetric
    assert code(exc) == "ValidationException"
    assert c.describe_key(KeyId="alias/rules-mac")["KeyMetadata"]["KeyId"] == h512


@pytest.mark.parametrize("name,want", [
    ("alias/my:alias", "InvalidAliasNameException"),  # the model's pattern allows ':', KMS does not
    ("alias/sp ace", "ValidationException"),  # the model's pattern refuses these
    ("alias/dot.ted", "ValidationException"),
    ("alias/é", "ValidationException"),
])
def test_alias_name_characters(kms: KmsEndpoint, name: str, want: str) -> None:
    c = kms.client(config=NO_RETRY)
    key = c.create_key()["KeyMetadata"]["KeyId"]
    with pytest.raises(ClientError) as exc:
        c.create_alias(AliasName=name, TargetKeyId=key)
    assert code(exc) == want
    assert not [a for a in c.list_aliases()["Aliases"] if a["AliasName"] == name]
    c.create_alias(AliasName="alias/Ok_name-9/sub", TargetKeyId=key)
    c.delete_alias(AliasName="alias/Ok_name-9/sub")


def test_alias_name_colon_raw_http(kms_real: KmsEndpoint) -> None:
    import json
    status, _, body = send(kms_real, b"{}", target="TrentService.CreateKey")
    key = body["KeyMetadata"]["KeyId"]
    status, _, body = send(kms_real, json.dumps({"AliasName": "alias/my:alias", "TargetKeyId": key}).encode(),
                           target="TrentService.CreateAlias")
    assert status == 400 and body["__type"] == "InvalidAliasNameException"
