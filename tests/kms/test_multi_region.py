"""Multi-Region keys (KMS Developer Guide "Multi-Region keys in AWS KMS"; API Reference
CreateKey, ReplicateKey, UpdatePrimaryRegion, ScheduleKeyDeletion): mrk- ids, replicas in other
Regions with the same key id and shared material but their own policy, tags and state;
ciphertexts, signatures and MACs usable across Regions; the primary's rotation shared; the
deletion rules. Ring 1 and ring 3 through boto3 (two clients, two Regions, one endpoint)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from .conftest import KmsEndpoint, advance_clock
from .test_http import send

NO_RETRY = Config(parameter_validation=False, retries={"total_max_attempts": 1})
PRIMARY, REPLICA, THIRD = "us-east-1", "eu-west-1", "ap-northeast-1"


def code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


def regional(ep: KmsEndpoint, region: str) -> Any:
    import boto3
    return boto3.client("kms", endpoint_url=ep.url, region_name=region, aws_access_key_id="AKIDMRK",
                        aws_secret_access_key="secret", config=NO_RETRY)


def test_replica_shares_material_not_metadata(kms: KmsEndpoint) -> None:
    east, west = regional(kms, PRIMARY), regional(kms, REPLICA)
    md = east.create_key(MultiRegion=True, Description="primary",
                         Tags=[{"TagKey": "side", "TagValue": "east"}])["KeyMetadata"]
    kid = md["KeyId"]
    assert kid.startswith("mrk-") and len(kid) == 36 and md["MultiRegion"] is True
    assert md["MultiRegionConfiguration"] == {
        "MultiRegionKeyType": "PRIMARY", "PrimaryKey": {"Arn": md["Arn"], "Region": PRIMARY}, "ReplicaKeys": []}
    policy = json.dumps({"Version": "2012-10-17", "Id": "replica-policy", "Statement": [
        {"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{kms.account}:root"}, "Action": "kms:*",
         "Resource": "*"}]})
    out = east.replicate_key(KeyId=kid, ReplicaRegion=REPLICA, Description="replica", Policy=policy,
                             Tags=[{"TagKey": "side", "TagValue": "west"}])
    rmd = out["ReplicaKeyMetadata"]
    replica_arn = f"arn:aws:kms:{REPLICA}:{kms.account}:key/{kid}"
    assert rmd["KeyId"] == kid and rmd["Arn"] == replica_arn and rmd["KeyState"] == "Enabled"
    assert out["ReplicaPolicy"] == policy and out["ReplicaTags"] == [{"TagKey": "side", "TagValue": "west"}]
    assert rmd["MultiRegionConfiguration"] == {
        "MultiRegionKeyType": "REPLICA", "PrimaryKey": {"Arn": md["Arn"], "Region": PRIMARY},
        "ReplicaKeys": [{"Arn": replica_arn, "Region": REPLICA}]}
    assert east.describe_key(KeyId=kid)["KeyMetadata"]["MultiRegionConfiguration"]["ReplicaKeys"] == [
        {"Arn": replica_arn, "Region": REPLICA}]
    wmd = west.describe_key(KeyId=kid)["KeyMetadata"]
    assert wmd["Description"] == "replica" and wmd["CurrentKeyMaterialId"] == md["CurrentKeyMaterialId"]
    assert json.loads(west.get_key_policy(KeyId=kid)["Policy"])["Id"] == "replica-policy"
    assert json.loads(east.get_key_policy(KeyId=kid)["Policy"])["Id"] == "key-default-1"
    assert west.list_resource_tags(KeyId=kid)["Tags"] == [{"TagKey": "side", "TagValue": "west"}]
    # ciphertext of the primary decrypts in the replica's Region, and the other way round
    blob = east.encrypt(KeyId=kid, Plaintext=b"across", EncryptionContext={"k": "v"})["CiphertextBlob"]
    back = west.decrypt(CiphertextBlob=blob, EncryptionContext={"k": "v"})
    assert back["Plaintext"] == b"across" and back["KeyId"] == replica_arn
    blob2 = west.encrypt(KeyId=kid, Plaintext=b"back")["CiphertextBlob"]
    assert east.decrypt(CiphertextBlob=blob2)["Plaintext"] == b"back"
    # own state: disabling the replica leaves the primary usable
    west.disable_key(KeyId=kid)
    with pytest.raises(ClientError) as exc:
        west.decrypt(CiphertextBlob=blob, EncryptionContext={"k": "v"})
    assert code(exc) == "DisabledException"
    assert east.decrypt(CiphertextBlob=blob, EncryptionContext={"k": "v"})["Plaintext"] == b"across"
    west.enable_key(KeyId=kid)
    # replicating again to the same Region, or a replica, or a single-Region key: refused
    with pytest.raises(ClientError) as exc:
        east.replicate_key(KeyId=kid, ReplicaRegion=REPLICA)
    assert code(exc) == "AlreadyExistsException"
    with pytest.raises(ClientError) as exc:
        west.replicate_key(KeyId=kid, ReplicaRegion=THIRD)
    assert code(exc) == "UnsupportedOperationException"
    single = east.create_key()["KeyMetadata"]["KeyId"]
    with pytest.raises(ClientError) as exc:
        east.replicate_key(KeyId=single, ReplicaRegion=REPLICA)
    assert code(exc) == "UnsupportedOperationException"


@pytest.mark.parametrize("spec,usage", [("ECC_NIST_P256", "SIGN_VERIFY"), ("RSA_2048", "SIGN_VERIFY"),
                                        ("HMAC_256", "GENERATE_VERIFY_MAC"), ("RSA_3072", "ENCRYPT_DECRYPT")])
def test_asymmetric_and_hmac_replicas(kms: KmsEndpoint, spec: str, usage: str) -> None:
    east, west = regional(kms, PRIMARY), regional(kms, REPLICA)
    kid = east.create_key(MultiRegion=True, KeySpec=spec, KeyUsage=usage)["KeyMetadata"]["KeyId"]
    east.replicate_key(KeyId=kid, ReplicaRegion=REPLICA)
    if usage == "SIGN_VERIFY":
        alg = "ECDSA_SHA_256" if spec.startswith("ECC") else "RSASSA_PSS_SHA_256"
        sig = east.sign(KeyId=kid, Message=b"m", SigningAlgorithm=alg)["Signature"]
        assert west.verify(KeyId=kid, Message=b"m", Signature=sig, SigningAlgorithm=alg)["SignatureValid"]
        assert west.get_public_key(KeyId=kid)["PublicKey"] == east.get_public_key(KeyId=kid)["PublicKey"]
    elif usage == "GENERATE_VERIFY_MAC":
        mac = east.generate_mac(KeyId=kid, Message=b"m", MacAlgorithm="HMAC_SHA_256")["Mac"]
        assert west.verify_mac(KeyId=kid, Message=b"m", Mac=mac, MacAlgorithm="HMAC_SHA_256")["MacValid"]
    else:
        ct = west.encrypt(KeyId=kid, Plaintext=b"oaep", EncryptionAlgorithm="RSAES_OAEP_SHA_256")["CiphertextBlob"]
        assert east.decrypt(KeyId=kid, CiphertextBlob=ct, EncryptionAlgorithm="RSAES_OAEP_SHA_256")["Plaintext"] == b"oaep"


def test_rotation_of_the_primary_is_shared(kms: KmsEndpoint) -> None:
    east, west = regional(kms, PRIMARY), regional(kms, REPLICA)
    kid = east.create_key(MultiRegion=True)["KeyMetadata"]["KeyId"]
    east.replicate_key(KeyId=kid, ReplicaRegion=REPLICA)
    old = west.encrypt(KeyId=kid, Plaintext=b"old")["CiphertextBlob"]
    for call in (west.enable_key_rotation, west.rotate_key_on_demand, west.disable_key_rotation):
        with pytest.raises(ClientError) as exc:
            call(KeyId=kid)
        assert code(exc) == "UnsupportedOperationException"
    east.enable_key_rotation(KeyId=kid, RotationPeriodInDays=180)
    status = west.get_key_rotation_status(KeyId=kid)
    assert status["KeyRotationEnabled"] is True and status["RotationPeriodInDays"] == 180
    east.rotate_key_on_demand(KeyId=kid)
    current = east.describe_key(KeyId=kid)["KeyMetadata"]["CurrentKeyMaterialId"]
    assert west.describe_key(KeyId=kid)["KeyMetadata"]["CurrentKeyMaterialId"] == current
    new = west.encrypt(KeyId=kid, Plaintext=b"new")
    back = east.decrypt(CiphertextBlob=new["CiphertextBlob"])
    assert back["Plaintext"] == b"new" and back["KeyMaterialId"] == current
    assert west.decrypt(CiphertextBlob=old)["Plaintext"] == b"old"
    assert [r["KeyMaterialId"] for r in west.list_key_rotations(KeyId=kid)["Rotations"]] == [current]


def test_update_primary_region(kms: KmsEndpoint) -> None:
    east, west = regional(kms, PRIMARY), regional(kms, REPLICA)
    kid = east.create_key(MultiRegion=True)["KeyMetadata"]["KeyId"]
    with pytest.raises(ClientError) as exc:
        east.update_primary_region(KeyId=kid, PrimaryRegion=REPLICA)  # no replica there yet
    assert code(exc) == "NotFoundException"
    east.replicate_key(KeyId=kid, ReplicaRegion=REPLICA)
    east.update_primary_region(KeyId=kid, PrimaryRegion=REPLICA)
    e_cfg = east.describe_key(KeyId=kid)["KeyMetadata"]["MultiRegionConfiguration"]
    w_cfg = west.describe_key(KeyId=kid)["KeyMetadata"]["MultiRegionConfiguration"]
    assert e_cfg["MultiRegionKeyType"] == "REPLICA" and w_cfg["MultiRegionKeyType"] == "PRIMARY"
    assert w_cfg["PrimaryKey"]["Region"] == REPLICA == e_cfg["PrimaryKey"]["Region"]
    assert w_cfg["ReplicaKeys"] == [{"Arn": f"arn:aws:kms:{PRIMARY}:{kms.account}:key/{kid}", "Region": PRIMARY}]
    with pytest.raises(ClientError) as exc:
        east.replicate_key(KeyId=kid, ReplicaRegion=THIRD)  # no longer the primary
    assert code(exc) == "UnsupportedOperationException"
    west.replicate_key(KeyId=kid, ReplicaRegion=THIRD)
    assert regional(kms, THIRD).describe_key(KeyId=kid)["KeyMetadata"]["MultiRegionConfiguration"][
        "PrimaryKey"]["Region"] == REPLICA


def test_primary_waits_for_its_replicas_to_be_deleted(kms: KmsEndpoint) -> None:
    east, west = regional(kms, PRIMARY), regional(kms, REPLICA)
    kid = east.create_key(MultiRegion=True)["KeyMetadata"]["KeyId"]
    east.replicate_key(KeyId=kid, ReplicaRegion=REPLICA)
    blob = east.encrypt(KeyId=kid, Plaintext=b"survives the replica")["CiphertextBlob"]
    out = east.schedule_key_deletion(KeyId=kid, PendingWindowInDays=7)
    assert out["KeyState"] == "PendingReplicaDeletion" and "DeletionDate" not in out
    md = east.describe_key(KeyId=kid)["KeyMetadata"]
    assert md["KeyState"] == "PendingReplicaDeletion" and md["PendingDeletionWindowInDays"] == 7
    assert "DeletionDate" not in md
    with pytest.raises(ClientError) as exc:
        east.encrypt(KeyId=kid, Plaintext=b"x")
    assert code(exc) == "KMSInvalidStateException"
    with pytest.raises(ClientError) as exc:
        east.replicate_key(KeyId=kid, ReplicaRegion=THIRD)
    assert code(exc) == "KMSInvalidStateException"
    advance_clock(kms, 40 * 86400)  # however long: the primary waits for its replica
    assert east.describe_key(KeyId=kid)["KeyMetadata"]["KeyState"] == "PendingReplicaDeletion"
    west.schedule_key_deletion(KeyId=kid, PendingWindowInDays=7)
    now = advance_clock(kms, 8 * 86400)
    with pytest.raises(ClientError) as exc:
        west.describe_key(KeyId=kid)
    assert code(exc) == "NotFoundException"
    md = east.describe_key(KeyId=kid)["KeyMetadata"]
    assert md["KeyState"] == "PendingDeletion" and md["MultiRegionConfiguration"]["ReplicaKeys"] == []
    assert abs(md["DeletionDate"].timestamp() - (now + 7 * 86400)) < 60
    east.cancel_key_deletion(KeyId=kid)
    east.enable_key(KeyId=kid)
    assert east.decrypt(CiphertextBlob=blob)["Plaintext"] == b"survives the replica"


def test_multi_region_refused_in_custom_key_store(kms: KmsEndpoint) -> None:
    with pytest.raises(ClientError) as exc:
        regional(kms, PRIMARY).create_key(MultiRegion=True, Origin="AWS_CLOUDHSM",
                                          CustomKeyStoreId="cks-1234567890abcdef0")
    assert code(exc) == "UnsupportedOperationException"


def test_replicate_key_raw_http(kms_real: KmsEndpoint) -> None:
    status, _, body = send(kms_real, b'{"MultiRegion": true}', target="TrentService.CreateKey")
    assert status == 200
    kid = body["KeyMetadata"]["KeyId"]
    status, _, body = send(kms_real, json.dumps({"KeyId": kid, "ReplicaRegion": "sa-east-1"}).encode(),
                           target="TrentService.ReplicateKey")
    assert status == 200 and body["ReplicaKeyMetadata"]["Arn"].split(":")[3] == "sa-east-1"
    assert body["ReplicaKeyMetadata"]["MultiRegionConfiguration"]["MultiRegionKeyType"] == "REPLICA"
    status, _, body = send(kms_real, json.dumps({"KeyId": kid, "ReplicaRegion": "nowhere-1"}).encode(),
                           target="TrentService.ReplicateKey")
    assert status == 400 and body["__type"] == "ValidationException"


def test_imported_material_replica_takes_the_same_material(kms: KmsEndpoint) -> None:
    import os

    from .test_operations import _wrap
    east, west = regional(kms, PRIMARY), regional(kms, REPLICA)
    alg = "RSAES_OAEP_SHA_256"
    kid = east.create_key(MultiRegion=True, Origin="EXTERNAL")["KeyMetadata"]["KeyId"]
    material = os.urandom(32)
    p = east.get_parameters_for_import(KeyId=kid, WrappingAlgorithm=alg, WrappingKeySpec="RSA_2048")
    east.import_key_material(KeyId=kid, ImportToken=p["ImportToken"], EncryptedKeyMaterial=_wrap(p, material, alg),
                             ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE")
    blob = east.encrypt(KeyId=kid, Plaintext=b"imported mrk")["CiphertextBlob"]
    rmd = east.replicate_key(KeyId=kid, ReplicaRegion=REPLICA)["ReplicaKeyMetadata"]
    assert rmd["KeyState"] == "PendingImport" and rmd["Origin"] == "EXTERNAL"
    p = west.get_parameters_for_import(KeyId=kid, WrappingAlgorithm=alg, WrappingKeySpec="RSA_2048")
    with pytest.raises(ClientError) as exc:
        west.import_key_material(KeyId=kid, ImportToken=p["ImportToken"],
                                 EncryptedKeyMaterial=_wrap(p, os.urandom(32), alg),
                                 ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE")
    assert code(exc) == "IncorrectKeyMaterialException"
    west.import_key_material(KeyId=kid, ImportToken=p["ImportToken"], EncryptedKeyMaterial=_wrap(p, material, alg),
                             ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE")
    assert west.decrypt(CiphertextBlob=blob)["Plaintext"] == b"imported mrk"
    # deleting the replica's imported material leaves the primary's
    west.delete_imported_key_material(KeyId=kid)
    assert east.decrypt(CiphertextBlob=blob)["Plaintext"] == b"imported mrk"


def test_encryption_sdk_decrypts_with_the_replica(kms_real: KmsEndpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ring 3 with a real client: the aws-encryption-sdk's MRK-aware provider encrypts with the
    primary's ARN and decrypts with the replica's ARN, calling KMS in the replica's Region (it
    derives each client's Region from the key ARN)."""
    aws_encryption_sdk = pytest.importorskip("aws_encryption_sdk")
    import botocore.session
    from aws_encryption_sdk.identifiers import CommitmentPolicy
    from aws_encryption_sdk.key_providers.kms import MRKAwareStrictAwsKmsMasterKeyProvider

    east = regional(kms_real, PRIMARY)
    md = east.create_key(MultiRegion=True)["KeyMetadata"]
    replica_arn = east.replicate_key(KeyId=md["KeyId"], ReplicaRegion=REPLICA)["ReplicaKeyMetadata"]["Arn"]
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", kms_real.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDESDKMRK")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "esdk-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", PRIMARY)
    sdk = aws_encryption_sdk.EncryptionSDKClient(commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT)
    enc = MRKAwareStrictAwsKmsMasterKeyProvider(key_ids=[md["Arn"]], botocore_session=botocore.session.Session())
    ct, _ = sdk.encrypt(source=b"mrk message" * 100, key_provider=enc, encryption_context={"app": "mrk"})
    dec = MRKAwareStrictAwsKmsMasterKeyProvider(key_ids=[replica_arn], botocore_session=botocore.session.Session())
    pt, header = sdk.decrypt(source=ct, key_provider=dec)
    assert pt == b"mrk message" * 100 and header.encryption_context["app"] == "mrk"
    # the replica's Region did the Decrypt: its usage tracking says so
    usage = regional(kms_real, REPLICA).get_key_last_usage(KeyId=md["KeyId"])["KeyLastUsage"]
    assert usage["Operation"] == "Decrypt"
