"""Every KMS operation through boto3, happy paths and documented errors. Parametrised over the
cluster double (ring 1: the KMS's own logic) and a real cluster behind the daemon (ring 3)."""

from __future__ import annotations

import hashlib
import json

import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding

from .conftest import KmsEndpoint, advance_clock


def code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


def message(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"].get("Message", ""))


@pytest.fixture(scope="module")
def client(kms: KmsEndpoint):  # type: ignore[no-untyped-def]
    # Client-side validation off: the server's own validation is under test.
    return kms.client(config=Config(parameter_validation=False, retries={"total_max_attempts": 1}))


@pytest.fixture(scope="module")
def key(client) -> dict:  # type: ignore[no-untyped-def]
    return client.create_key(Description="module key")["KeyMetadata"]  # type: ignore[no-any-return]


def test_create_describe_list_update(client, kms: KmsEndpoint) -> None:  # type: ignore[no-untyped-def]
    md = client.create_key(Description="d1", Tags=[{"TagKey": "team", "TagValue": "x"}])["KeyMetadata"]
    assert md["Arn"] == f"arn:aws:kms:{kms.region}:{kms.account}:key/{md['KeyId']}"
    assert md["KeyState"] == "Enabled" and md["Enabled"] is True
    assert md["KeySpec"] == "SYMMETRIC_DEFAULT" and md["KeyUsage"] == "ENCRYPT_DECRYPT"
    assert md["Origin"] == "AWS_KMS" and md["KeyManager"] == "CUSTOMER"
    assert md["EncryptionAlgorithms"] == ["SYMMETRIC_DEFAULT"]
    assert len(md["CurrentKeyMaterialId"]) == 64
    for ref in (md["KeyId"], md["Arn"]):
        assert client.describe_key(KeyId=ref)["KeyMetadata"]["KeyId"] == md["KeyId"]
    client.update_key_description(KeyId=md["KeyId"], Description="d2")
    assert client.describe_key(KeyId=md["KeyId"])["KeyMetadata"]["Description"] == "d2"
    ids = []
    marker = None
    while True:
        page = client.list_keys(Limit=2, **({"Marker": marker} if marker else {}))
        ids += [k["KeyId"] for k in page["Keys"]]
        assert all(k["KeyArn"].endswith(k["KeyId"]) for k in page["Keys"])
        if not page["Truncated"]:
            break
        marker = page["NextMarker"]
    assert md["KeyId"] in ids and len(ids) == len(set(ids))
    policy = json.loads(client.get_key_policy(KeyId=md["KeyId"])["Policy"])
    assert policy["Id"] == "key-default-1"
    assert policy["Statement"][0]["Principal"]["AWS"] == f"arn:aws:iam::{kms.account}:root"


def test_multi_region_key(client) -> None:  # type: ignore[no-untyped-def]
    md = client.create_key(MultiRegion=True)["KeyMetadata"]
    assert md["KeyId"].startswith("mrk-") and len(md["KeyId"]) == 36 and md["MultiRegion"] is True
    assert md["MultiRegionConfiguration"]["MultiRegionKeyType"] == "PRIMARY"
    blob = client.encrypt(KeyId=md["Arn"], Plaintext=b"mrk")["CiphertextBlob"]
    assert client.decrypt(CiphertextBlob=blob)["Plaintext"] == b"mrk"


def test_describe_errors(client) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ClientError) as exc:
        client.describe_key(KeyId="fake-key-id")
    assert code(exc) == "NotFoundException" and message(exc) == "Invalid keyId 'fake-key-id'"
    with pytest.raises(ClientError) as exc:
        client.describe_key(KeyId="00000000-0000-0000-0000-000000000000")
    assert code(exc) == "NotFoundException" and "does not exist" in message(exc)
    with pytest.raises(ClientError) as exc:
        client.describe_key(KeyId="alias/none-such")
    assert code(exc) == "NotFoundException" and message(exc).endswith(":alias/none-such is not found.")
    with pytest.raises(ClientError) as exc:
        client.list_keys(Marker="garbage!")
    assert code(exc) == "InvalidMarkerException"


def test_create_key_validation(client) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ClientError) as exc:
        client.create_key(KeySpec="RSA_2048")
    assert code(exc) == "ValidationException"
    assert message(exc) == ("You must specify a KeyUsage value for all KMS keys except for "
                            "symmetric encryption keys.")
    with pytest.raises(ClientError) as exc:
        client.create_key(KeySpec="ECC_NIST_P256", KeyUsage="ENCRYPT_DECRYPT")
    assert code(exc) == "ValidationException"
    with pytest.raises(ClientError) as exc:
        client.create_key(KeySpec="NOT_A_SPEC")
    assert code(exc) == "ValidationException" and "enum value set" in message(exc)
    with pytest.raises(ClientError) as exc:
        client.create_key(Tags=[{"TagKey": "aws:x", "TagValue": "y"}])
    assert code(exc) == "TagException"
    with pytest.raises(ClientError) as exc:
        client.create_key(Policy="{not json")
    assert code(exc) == "MalformedPolicyDocumentException"
    with pytest.raises(ClientError) as exc:
        client.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId="cks-00000000000000000")
    assert code(exc) == "CustomKeyStoreNotFoundException"


def test_aliases(client, key, kms: KmsEndpoint) -> None:  # type: ignore[no-untyped-def]
    other = client.create_key()["KeyMetadata"]
    client.create_alias(AliasName="alias/ops-test", TargetKeyId=key["KeyId"])
    with pytest.raises(ClientError) as exc:
        client.create_alias(AliasName="alias/ops-test", TargetKeyId=key["KeyId"])
    assert code(exc) == "AlreadyExistsException"
    with pytest.raises(ClientError) as exc:
        client.create_alias(AliasName="alias/aws/mine", TargetKeyId=key["KeyId"])
    assert code(exc) == "NotAuthorizedException"
    with pytest.raises(ClientError) as exc:
        client.create_alias(AliasName="no-prefix", TargetKeyId=key["KeyId"])
    assert code(exc) == "ValidationException" and message(exc).startswith('Alias must start with the prefix "alias/".')
    assert client.describe_key(KeyId="alias/ops-test")["KeyMetadata"]["KeyId"] == key["KeyId"]
    alias_arn = f"arn:aws:kms:{kms.region}:{kms.account}:alias/ops-test"
    ct = client.encrypt(KeyId=alias_arn, Plaintext=b"x")
    assert ct["KeyId"] == key["Arn"]
    client.update_alias(AliasName="alias/ops-test", TargetKeyId=other["KeyId"])
    listed = client.list_aliases(KeyId=other["KeyId"])["Aliases"]
    assert [(a["AliasName"], a["AliasArn"], a["TargetKeyId"]) for a in listed] == [
        ("alias/ops-test", alias_arn, other["KeyId"])]
    client.delete_alias(AliasName="alias/ops-test")
    with pytest.raises(ClientError) as exc:
        client.delete_alias(AliasName="alias/ops-test")
    assert code(exc) == "NotFoundException"
    with pytest.raises(ClientError) as exc:
        client.encrypt(KeyId="alias/ops-test", Plaintext=b"x")
    assert code(exc) == "NotFoundException"


def test_encrypt_decrypt_context(client, key) -> None:  # type: ignore[no-untyped-def]
    out = client.encrypt(KeyId=key["KeyId"], Plaintext=b"secret", EncryptionContext={"a": "bc", "z": "1"})
    assert out["KeyId"] == key["Arn"] and out["EncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"
    blob = out["CiphertextBlob"]
    back = client.decrypt(CiphertextBlob=blob, EncryptionContext={"z": "1", "a": "bc"})
    assert back["Plaintext"] == b"secret" and back["KeyId"] == key["Arn"]
    assert back["KeyMaterialId"] == key["CurrentKeyMaterialId"]
    for wrong in ({"ab": "c", "z": "1"}, {"a": "bc"}, {}, {"a": "bC", "z": "1"}):
        with pytest.raises(ClientError) as exc:
            client.decrypt(CiphertextBlob=blob, EncryptionContext=wrong)
        assert code(exc) == "InvalidCiphertextException" and message(exc) == ""
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    with pytest.raises(ClientError) as exc:
        client.decrypt(CiphertextBlob=bytes(tampered), EncryptionContext={"a": "bc", "z": "1"})
    assert code(exc) == "InvalidCiphertextException"
    with pytest.raises(ClientError) as exc:
        client.decrypt(CiphertextBlob=b"garbage" * 10)
    assert code(exc) == "InvalidCiphertextException"
    other = client.create_key()["KeyMetadata"]
    with pytest.raises(ClientError) as exc:
        client.decrypt(CiphertextBlob=blob, KeyId=other["KeyId"], EncryptionContext={"a": "bc", "z": "1"})
    assert code(exc) == "IncorrectKeyException"
    assert message(exc) == "The key ID in the request does not identify a CMK that can perform this operation."
    assert client.decrypt(CiphertextBlob=blob, KeyId=key["Arn"],
                          EncryptionContext={"a": "bc", "z": "1"})["Plaintext"] == b"secret"


def test_size_limits(client, key) -> None:  # type: ignore[no-untyped-def]
    big = client.encrypt(KeyId=key["KeyId"], Plaintext=b"\xff" * 4096)["CiphertextBlob"]
    assert len(big) <= 6144
    with pytest.raises(ClientError) as exc:
        client.encrypt(KeyId=key["KeyId"], Plaintext=b"\xff" * 4097)
    assert code(exc) == "ValidationException"
    assert message(exc) == ("1 validation error detected: Value at 'plaintext' failed to satisfy "
                            "constraint: Member must have length less than or equal to 4096")


def test_re_encrypt(client, key) -> None:  # type: ignore[no-untyped-def]
    dest = client.create_key()["KeyMetadata"]
    blob = client.encrypt(KeyId=key["KeyId"], Plaintext=b"move me", EncryptionContext={"k": "v"})["CiphertextBlob"]
    out = client.re_encrypt(CiphertextBlob=blob, SourceEncryptionContext={"k": "v"},
                            DestinationKeyId=dest["KeyId"], DestinationEncryptionContext={"n": "m"})
    assert out["SourceKeyId"] == key["Arn"] and out["KeyId"] == dest["Arn"]
    assert client.decrypt(CiphertextBlob=out["CiphertextBlob"], EncryptionContext={"n": "m"})["Plaintext"] == b"move me"
    with pytest.raises(ClientError) as exc:
        client.re_encrypt(CiphertextBlob=blob, SourceEncryptionContext={"k": "v"},
                          SourceKeyId=dest["KeyId"], DestinationKeyId=dest["KeyId"])
    assert code(exc) == "IncorrectKeyException"


def test_data_keys(client, key) -> None:  # type: ignore[no-untyped-def]
    dk = client.generate_data_key(KeyId=key["KeyId"], KeySpec="AES_256", EncryptionContext={"p": "q"})
    assert len(dk["Plaintext"]) == 32 and dk["KeyId"] == key["Arn"]
    assert client.decrypt(CiphertextBlob=dk["CiphertextBlob"], EncryptionContext={"p": "q"})["Plaintext"] == dk["Plaintext"]
    assert len(client.generate_data_key(KeyId=key["KeyId"], NumberOfBytes=7)["Plaintext"]) == 7
    nop = client.generate_data_key_without_plaintext(KeyId=key["KeyId"], KeySpec="AES_128")
    assert "Plaintext" not in nop
    assert len(client.decrypt(CiphertextBlob=nop["CiphertextBlob"])["Plaintext"]) == 16
    for kw in ({}, {"KeySpec": "AES_256", "NumberOfBytes": 32}):
        with pytest.raises(ClientError) as exc:
            client.generate_data_key(KeyId=key["KeyId"], **kw)
        assert code(exc) == "ValidationException"
    with pytest.raises(ClientError) as exc:
        client.generate_data_key(KeyId=key["KeyId"], NumberOfBytes=1025)
    assert code(exc) == "ValidationException"


def test_data_key_pairs(client, key) -> None:  # type: ignore[no-untyped-def]
    pair = client.generate_data_key_pair(KeyId=key["KeyId"], KeyPairSpec="ECC_NIST_P256", EncryptionContext={"a": "b"})
    priv = serialization.load_der_private_key(pair["PrivateKeyPlaintext"], None)
    pub = priv.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert pub == pair["PublicKey"] and pair["KeyId"] == key["Arn"]
    back = client.decrypt(CiphertextBlob=pair["PrivateKeyCiphertextBlob"], EncryptionContext={"a": "b"})
    assert back["Plaintext"] == pair["PrivateKeyPlaintext"]
    nop = client.generate_data_key_pair_without_plaintext(KeyId=key["KeyId"], KeyPairSpec="RSA_2048")
    assert "PrivateKeyPlaintext" not in nop and nop["KeyPairSpec"] == "RSA_2048"
    der = client.decrypt(CiphertextBlob=nop["PrivateKeyCiphertextBlob"])["Plaintext"]
    assert serialization.load_der_private_key(der, None).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == nop["PublicKey"]


def test_generate_random(client) -> None:  # type: ignore[no-untyped-def]
    a, b = (client.generate_random(NumberOfBytes=32)["Plaintext"] for _ in range(2))
    assert len(a) == 32 and a != b
    for n in (0, 1025):
        with pytest.raises(ClientError) as exc:
            client.generate_random(NumberOfBytes=n)
        assert code(exc) == "ValidationException"
    with pytest.raises(ClientError) as exc:
        client.generate_random()
    assert code(exc) == "ValidationException"
    with pytest.raises(ClientError) as exc:
        client.generate_random(NumberOfBytes=8, CustomKeyStoreId="cks-00000000000000000")
    assert code(exc) == "CustomKeyStoreNotFoundException"


def test_key_states_and_deletion(client, kms: KmsEndpoint) -> None:  # type: ignore[no-untyped-def]
    k = client.create_key()["KeyMetadata"]
    blob = client.encrypt(KeyId=k["KeyId"], Plaintext=b"x")["CiphertextBlob"]
    client.disable_key(KeyId=k["KeyId"])
    assert client.describe_key(KeyId=k["KeyId"])["KeyMetadata"]["KeyState"] == "Disabled"
    for call in (lambda: client.encrypt(KeyId=k["KeyId"], Plaintext=b"x"),
                 lambda: client.decrypt(CiphertextBlob=blob)):
        with pytest.raises(ClientError) as exc:
            call()
        assert code(exc) == "DisabledException" and message(exc) == f"{k['Arn']} is disabled."
    client.enable_key(KeyId=k["KeyId"])
    assert client.decrypt(CiphertextBlob=blob)["Plaintext"] == b"x"
    with pytest.raises(ClientError) as exc:
        client.schedule_key_deletion(KeyId=k["KeyId"], PendingWindowInDays=6)
    assert code(exc) == "ValidationException"
    with pytest.raises(ClientError) as exc:
        client.enable_key(KeyId="alias/anything")
    assert code(exc) == "NotFoundException"
    with pytest.raises(ClientError) as exc:
        client.cancel_key_deletion(KeyId=k["KeyId"])
    assert code(exc) == "KMSInvalidStateException" and message(exc) == f"{k['Arn']} is not pending deletion."
    out = client.schedule_key_deletion(KeyId=k["KeyId"], PendingWindowInDays=7)
    assert out["KeyState"] == "PendingDeletion" and out["PendingWindowInDays"] == 7 and out["KeyId"] == k["Arn"]
    with pytest.raises(ClientError) as exc:
        client.encrypt(KeyId=k["KeyId"], Plaintext=b"x")
    assert code(exc) == "KMSInvalidStateException" and message(exc) == f"{k['Arn']} is pending deletion."
    with pytest.raises(ClientError) as exc:
        client.create_alias(AliasName="alias/doomed", TargetKeyId=k["KeyId"])
    assert code(exc) == "KMSInvalidStateException"
    client.cancel_key_deletion(KeyId=k["KeyId"])
    assert client.describe_key(KeyId=k["KeyId"])["KeyMetadata"]["KeyState"] == "Disabled"
    client.schedule_key_deletion(KeyId=k["KeyId"], PendingWindowInDays=7)
    advance_clock(kms, 6 * 86400)
    assert client.describe_key(KeyId=k["KeyId"])["KeyMetadata"]["KeyState"] == "PendingDeletion"
    advance_clock(kms, 1 * 86400 + 60)
    with pytest.raises(ClientError) as exc:
        client.describe_key(KeyId=k["KeyId"])
    assert code(exc) == "NotFoundException"
    with pytest.raises(ClientError) as exc:
        client.decrypt(CiphertextBlob=blob)
    assert code(exc) in ("InvalidCiphertextException", "NotFoundException")


@pytest.mark.parametrize("spec,alg,pyhash,pad", [
    ("RSA_2048", "RSASSA_PSS_SHA_256", hashes.SHA256, "pss"),
    ("RSA_2048", "RSASSA_PKCS1_V1_5_SHA_384", hashes.SHA384, "pkcs1"),
    ("ECC_NIST_P256", "ECDSA_SHA_256", hashes.SHA256, "ec"),
    ("ECC_SECG_P256K1", "ECDSA_SHA_256", hashes.SHA256, "ec"),
    ("ECC_NIST_P384", "ECDSA_SHA_384", hashes.SHA384, "ec"),
])
def test_sign_verify(client, spec, alg, pyhash, pad) -> None:  # type: ignore[no-untyped-def]
    k = client.create_key(KeySpec=spec, KeyUsage="SIGN_VERIFY")["KeyMetadata"]
    assert alg in k["SigningAlgorithms"]
    msg = b"message to sign"
    sig = client.sign(KeyId=k["KeyId"], Message=msg, SigningAlgorithm=alg)["Signature"]
    pub = serialization.load_der_public_key(client.get_public_key(KeyId=k["KeyId"])["PublicKey"])
    if pad == "ec":
        pub.verify(sig, msg, ec.ECDSA(pyhash()))  # type: ignore[call-arg,union-attr]
    elif pad == "pss":
        pub.verify(sig, msg, padding.PSS(padding.MGF1(pyhash()), pyhash.digest_size), pyhash())  # type: ignore[call-arg,union-attr]
    else:
        pub.verify(sig, msg, padding.PKCS1v15(), pyhash())  # type: ignore[call-arg,union-attr]
    assert client.verify(KeyId=k["KeyId"], Message=msg, Signature=sig, SigningAlgorithm=alg)["SignatureValid"]
    digest = hashlib.new(pyhash.name, msg).digest()
    sig2 = client.sign(KeyId=k["KeyId"], Message=digest, MessageType="DIGEST", SigningAlgorithm=alg)["Signature"]
    assert client.verify(KeyId=k["KeyId"], Message=msg, Signature=sig2, SigningAlgorithm=alg)["SignatureValid"]
    with pytest.raises(ClientError) as exc:
        client.verify(KeyId=k["KeyId"], Message=msg + b"!", Signature=sig, SigningAlgorithm=alg)
    assert code(exc) == "KMSInvalidSignatureException"
    with pytest.raises(ClientError) as exc:
        client.sign(KeyId=k["KeyId"], Message=b"short", MessageType="DIGEST", SigningAlgorithm=alg)
    assert code(exc) == "ValidationException" and message(exc) == f"Digest is invalid length for algorithm {alg}."
    with pytest.raises(ClientError) as exc:
        client.encrypt(KeyId=k["KeyId"], Plaintext=b"x")
    assert code(exc) == "InvalidKeyUsageException"
    assert message(exc) == f"{k['Arn']} key usage is SIGN_VERIFY which is not valid for Encrypt."


def test_rsa_encryption(client) -> None:  # type: ignore[no-untyped-def]
    k = client.create_key(KeySpec="RSA_2048", KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]
    assert k["EncryptionAlgorithms"] == ["RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256"]
    pub = serialization.load_der_public_key(client.get_public_key(KeyId=k["KeyId"])["PublicKey"])
    ct = pub.encrypt(b"local", padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None))  # type: ignore[union-attr,call-arg]
    assert client.decrypt(CiphertextBlob=ct, KeyId=k["KeyId"],
                          EncryptionAlgorithm="RSAES_OAEP_SHA_256")["Plaintext"] == b"local"
    ct2 = client.encrypt(KeyId=k["KeyId"], Plaintext=b"a" * 190, EncryptionAlgorithm="RSAES_OAEP_SHA_256")
    assert client.decrypt(CiphertextBlob=ct2["CiphertextBlob"], KeyId=k["KeyId"],
                          EncryptionAlgorithm="RSAES_OAEP_SHA_256")["Plaintext"] == b"a" * 190
    with pytest.raises(ClientError) as exc:
        client.encrypt(KeyId=k["KeyId"], Plaintext=b"a" * 191, EncryptionAlgorithm="RSAES_OAEP_SHA_256")
    assert message(exc) == ("Algorithm RSAES_OAEP_SHA_256 and key spec RSA_2048 cannot encrypt "
                            "data larger than 190 bytes.")
    with pytest.raises(ClientError) as exc:
        client.decrypt(CiphertextBlob=ct, KeyId=k["KeyId"], EncryptionAlgorithm="RSAES_OAEP_SHA_1")
    assert code(exc) == "InvalidCiphertextException"


def test_hmac(client) -> None:  # type: ignore[no-untyped-def]
    k = client.create_key(KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")["KeyMetadata"]
    assert k["MacAlgorithms"] == ["HMAC_SHA_256"]
    mac = client.generate_mac(KeyId=k["KeyId"], Message=b"m", MacAlgorithm="HMAC_SHA_256")["Mac"]
    assert len(mac) == 32
    assert client.verify_mac(KeyId=k["KeyId"], Message=b"m", Mac=mac, MacAlgorithm="HMAC_SHA_256")["MacValid"]
    with pytest.raises(ClientError) as exc:
        client.verify_mac(KeyId=k["KeyId"], Message=b"n", Mac=mac, MacAlgorithm="HMAC_SHA_256")
    assert code(exc) == "KMSInvalidMacException"
    with pytest.raises(ClientError) as exc:
        client.generate_mac(KeyId=k["KeyId"], Message=b"m", MacAlgorithm="HMAC_SHA_384")
    assert code(exc) == "InvalidKeyUsageException"
    assert message(exc) == "Algorithm HMAC_SHA_384 is incompatible with key spec HMAC_256."
    with pytest.raises(ClientError) as exc:
        client.get_public_key(KeyId=k["KeyId"])
    assert code(exc) == "UnsupportedOperationException"


def test_rotation(client, kms: KmsEndpoint) -> None:  # type: ignore[no-untyped-def]
    k = client.create_key()["KeyMetadata"]
    old = client.encrypt(KeyId=k["KeyId"], Plaintext=b"before")["CiphertextBlob"]
    assert client.get_key_rotation_status(KeyId=k["KeyId"])["KeyRotationEnabled"] is False
    client.rotate_key_on_demand(KeyId=k["KeyId"])
    md = client.describe_key(KeyId=k["KeyId"])["KeyMetadata"]
    assert md["CurrentKeyMaterialId"] != k["CurrentKeyMaterialId"]
    new = client.encrypt(KeyId=k["KeyId"], Plaintext=b"after")["CiphertextBlob"]
    assert client.decrypt(CiphertextBlob=old)["Plaintext"] == b"before"
    assert client.decrypt(CiphertextBlob=old)["KeyMaterialId"] == k["CurrentKeyMaterialId"]
    assert client.decrypt(CiphertextBlob=new)["KeyMaterialId"] == md["CurrentKeyMaterialId"]
    rot = client.list_key_rotations(KeyId=k["KeyId"])["Rotations"]
    assert [(r["RotationType"], r["KeyMaterialState"]) for r in rot] == [("ON_DEMAND", "CURRENT")]
    client.enable_key_rotation(KeyId=k["KeyId"], RotationPeriodInDays=90)
    st = client.get_key_rotation_status(KeyId=k["KeyId"])
    assert st["KeyRotationEnabled"] and st["RotationPeriodInDays"] == 90 and "NextRotationDate" in st
    with pytest.raises(ClientError) as exc:
        client.enable_key_rotation(KeyId=k["KeyId"], RotationPeriodInDays=89)
    assert code(exc) == "ValidationException"
    advance_clock(kms, 91 * 86400)
    rot = client.list_key_rotations(KeyId=k["KeyId"])["Rotations"]
    assert [r["RotationType"] for r in rot] == ["ON_DEMAND", "AUTOMATIC"]
    assert client.decrypt(CiphertextBlob=old)["Plaintext"] == b"before"
    client.disable_key_rotation(KeyId=k["KeyId"])
    assert client.get_key_rotation_status(KeyId=k["KeyId"])["KeyRotationEnabled"] is False
    asym = client.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]
    for call in (client.enable_key_rotation, client.rotate_key_on_demand):
        with pytest.raises(ClientError) as exc:
            call(KeyId=asym["KeyId"])
        assert code(exc) == "UnsupportedOperationException"


def test_on_demand_rotation_limit(client) -> None:  # type: ignore[no-untyped-def]
    k = client.create_key()["KeyMetadata"]
    for _ in range(25):
        client.rotate_key_on_demand(KeyId=k["KeyId"])
    with pytest.raises(ClientError) as exc:
        client.rotate_key_on_demand(KeyId=k["KeyId"])
    assert code(exc) == "LimitExceededException"
    assert len(client.list_key_rotations(KeyId=k["KeyId"], Limit=1000)["Rotations"]) == 25


def test_policies(client, key, kms: KmsEndpoint) -> None:  # type: ignore[no-untyped-def]
    assert client.list_key_policies(KeyId=key["KeyId"])["PolicyNames"] == ["default"]
    doc = json.dumps({"Version": "2012-10-17", "Statement": [
        {"Sid": "all", "Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{kms.account}:root"},
         "Action": "kms:*", "Resource": "*"},
        {"Sid": "nodelete", "Effect": "Deny", "Principal": "*", "Action": "kms:ScheduleKeyDeletion",
         "Resource": "*"}]})
    client.put_key_policy(KeyId=key["KeyId"], PolicyName="default", Policy=doc)
    assert json.loads(client.get_key_policy(KeyId=key["KeyId"])["Policy"])["Statement"][1]["Sid"] == "nodelete"
    with pytest.raises(ClientError) as exc:
        client.put_key_policy(KeyId=key["KeyId"], Policy='{"Statement": [}')
    assert code(exc) == "MalformedPolicyDocumentException"
    lockout = json.dumps({"Statement": [{"Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::999999999999:root"},
                                         "Action": "kms:*", "Resource": "*"}]})
    with pytest.raises(ClientError) as exc:
        client.put_key_policy(KeyId=key["KeyId"], Policy=lockout)
    assert code(exc) == "MalformedPolicyDocumentException"
    with pytest.raises(ClientError) as exc:
        client.get_key_policy(KeyId=key["KeyId"], PolicyName="other")
    assert code(exc) == "NotFoundException"


def test_grants(client, key, kms: KmsEndpoint) -> None:  # type: ignore[no-untyped-def]
    grantee = f"arn:aws:iam::{kms.account}:role/app"
    g = client.create_grant(KeyId=key["KeyId"], GranteePrincipal=grantee, RetiringPrincipal=grantee,
                            Operations=["Encrypt", "Decrypt"], Name="g1",
                            Constraints={"EncryptionContextSubset": {"t": "1"}})
    assert g["GrantId"] and g["GrantToken"]
    again = client.create_grant(KeyId=key["KeyId"], GranteePrincipal=grantee, RetiringPrincipal=grantee,
                                Operations=["Encrypt", "Decrypt"], Name="g1",
                                Constraints={"EncryptionContextSubset": {"t": "1"}})
    assert again["GrantId"] == g["GrantId"]
    listed = client.list_grants(KeyId=key["KeyId"])["Grants"]
    mine = [x for x in listed if x["GrantId"] == g["GrantId"]]
    assert mine and mine[0]["Operations"] == ["Encrypt", "Decrypt"] and mine[0]["KeyId"] == key["Arn"]
    assert mine[0]["Constraints"] == {"EncryptionContextSubset": {"t": "1"}}
    assert [x["GrantId"] for x in client.list_retirable_grants(RetiringPrincipal=grantee)["Grants"]] == [g["GrantId"]]
    client.retire_grant(GrantToken=g["GrantToken"])
    with pytest.raises(ClientError) as exc:
        client.retire_grant(GrantToken=g["GrantToken"])
    assert code(exc) == "InvalidGrantTokenException"
    g2 = client.create_grant(KeyId=key["KeyId"], GranteePrincipal=grantee, Operations=["Decrypt"])
    client.revoke_grant(KeyId=key["KeyId"], GrantId=g2["GrantId"])
    with pytest.raises(ClientError) as exc:
        client.revoke_grant(KeyId=key["KeyId"], GrantId=g2["GrantId"])
    assert code(exc) == "NotFoundException"
    with pytest.raises(ClientError) as exc:
        client.create_grant(KeyId=key["KeyId"], GranteePrincipal=grantee, Operations=["Fly"])
    assert code(exc) == "ValidationException"
    with pytest.raises(ClientError) as exc:
        client.create_grant(KeyId=key["KeyId"], GranteePrincipal=grantee, Operations=["Decrypt"], DryRun=True)
    assert code(exc) == "DryRunOperationException"


def test_tags(client, key) -> None:  # type: ignore[no-untyped-def]
    client.tag_resource(KeyId=key["KeyId"], Tags=[{"TagKey": "a", "TagValue": "1"}, {"TagKey": "b", "TagValue": "2"}])
    client.untag_resource(KeyId=key["KeyId"], TagKeys=["a"])
    assert client.list_resource_tags(KeyId=key["KeyId"])["Tags"] == [{"TagKey": "b", "TagValue": "2"}]
    for tags, msg in (([{"TagKey": "aws:x", "TagValue": "1"}], "Tags beginning with aws: are reserved"),
                      ([{"TagKey": "d", "TagValue": "1"}, {"TagKey": "d", "TagValue": "2"}], "Duplicate tag keys")):
        with pytest.raises(ClientError) as exc:
            client.tag_resource(KeyId=key["KeyId"], Tags=tags)
        assert code(exc) == "TagException" and message(exc) == msg


def test_dry_run(client, key) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ClientError) as exc:
        client.encrypt(KeyId=key["KeyId"], Plaintext=b"x", GrantTokens=["not-a-token"])
    assert code(exc) == "InvalidGrantTokenException"
    with pytest.raises(ClientError) as exc:
        client.encrypt(KeyId=key["KeyId"], Plaintext=b"x", DryRun=True)
    assert code(exc) == "DryRunOperationException"
    assert message(exc) == "The request would have succeeded, but the DryRun option is set."


def test_key_last_usage(client, kms: KmsEndpoint) -> None:  # type: ignore[no-untyped-def]
    k = client.create_key()["KeyMetadata"]
    out = client.get_key_last_usage(KeyId=k["KeyId"])
    assert out["KeyId"] == k["Arn"] and "KeyLastUsage" not in out and out["KeyCreationDate"] >= out["TrackingStartDate"]
    blob = client.encrypt(KeyId=k["KeyId"], Plaintext=b"x")["CiphertextBlob"]
    rid = client.decrypt(CiphertextBlob=blob)["ResponseMetadata"]["RequestId"]
    client.describe_key(KeyId=k["KeyId"])  # not a cryptographic operation
    usage = client.get_key_last_usage(KeyId=k["KeyId"])["KeyLastUsage"]
    assert usage["Operation"] == "Decrypt" and usage["KmsRequestId"] == rid and len(usage["CloudTrailEventId"]) == 36


def test_unimplemented_operation_is_explicit(client, key) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ClientError) as exc:
        client.replicate_key(KeyId=key["KeyId"], ReplicaRegion="us-west-2")
    assert code(exc) == "UnsupportedOperationException"


def _wrap(params: dict, material: bytes, alg: str) -> bytes:  # type: ignore[type-arg]
    import os
    from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding
    pub = serialization.load_der_public_key(params["PublicKey"])
    sha = hashes.SHA1() if alg.endswith("SHA_1") else hashes.SHA256()
    oaep = padding.OAEP(padding.MGF1(sha), sha, None)
    if alg.startswith("RSAES_OAEP"):
        return pub.encrypt(material, oaep)  # type: ignore[union-attr,call-arg]
    aes = os.urandom(32)
    return pub.encrypt(aes, oaep) + aes_key_wrap_with_padding(aes, material)  # type: ignore[union-attr,call-arg]


@pytest.mark.parametrize("alg", ["RSAES_OAEP_SHA_256", "RSA_AES_KEY_WRAP_SHA_256"])
def test_imported_key_material(client, kms: KmsEndpoint, alg: str) -> None:  # type: ignore[no-untyped-def]
    import os
    k = client.create_key(Origin="EXTERNAL")["KeyMetadata"]
    assert k["KeyState"] == "PendingImport" and k["Origin"] == "EXTERNAL"
    with pytest.raises(ClientError) as exc:
        client.encrypt(KeyId=k["KeyId"], Plaintext=b"x")
    assert code(exc) == "KMSInvalidStateException" and message(exc) == f"{k['Arn']} is pending import."
    material = os.urandom(32)
    params = client.get_parameters_for_import(KeyId=k["KeyId"], WrappingAlgorithm=alg, WrappingKeySpec="RSA_2048")
    assert params["KeyId"] == k["Arn"]
    with pytest.raises(ClientError) as exc:
        client.import_key_material(KeyId=k["KeyId"], ImportToken=b"bogus-token",
                                   EncryptedKeyMaterial=_wrap(params, material, alg))
    assert code(exc) == "InvalidImportTokenException"
    with pytest.raises(ClientError) as exc:
        client.import_key_material(KeyId=k["KeyId"], ImportToken=params["ImportToken"],
                                   EncryptedKeyMaterial=_wrap(params, os.urandom(16), alg))
    assert code(exc) == "IncorrectKeyMaterialException"
    out = client.import_key_material(KeyId=k["KeyId"], ImportToken=params["ImportToken"],
                                     EncryptedKeyMaterial=_wrap(params, material, alg),
                                     ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE")
    md = client.describe_key(KeyId=k["KeyId"])["KeyMetadata"]
    assert md["KeyState"] == "Enabled" and md["CurrentKeyMaterialId"] == out["KeyMaterialId"]
    blob = client.encrypt(KeyId=k["KeyId"], Plaintext=b"imported")["CiphertextBlob"]
    assert client.decrypt(CiphertextBlob=blob)["Plaintext"] == b"imported"
    p2 = client.get_parameters_for_import(KeyId=k["KeyId"], WrappingAlgorithm=alg, WrappingKeySpec="RSA_2048")
    with pytest.raises(ClientError) as exc:
        client.import_key_material(KeyId=k["KeyId"], ImportToken=p2["ImportToken"],
                                   EncryptedKeyMaterial=_wrap(p2, os.urandom(32), alg))
    assert code(exc) == "IncorrectKeyMaterialException"
    client.delete_imported_key_material(KeyId=k["KeyId"])
    assert client.describe_key(KeyId=k["KeyId"])["KeyMetadata"]["KeyState"] == "PendingImport"
    with pytest.raises(ClientError) as exc:
        client.decrypt(CiphertextBlob=blob)
    assert code(exc) == "KMSInvalidStateException"
    # The same material again, expiring: old ciphertexts decrypt, and it goes away when due.
    client.import_key_material(KeyId=k["KeyId"], ImportToken=p2["ImportToken"],
                               EncryptedKeyMaterial=_wrap(p2, material, alg),
                               ExpirationModel="KEY_MATERIAL_EXPIRES", ValidTo=advance_clock(kms, 0) + 3600)
    assert client.decrypt(CiphertextBlob=blob)["Plaintext"] == b"imported"
    advance_clock(kms, 7200)
    assert client.describe_key(KeyId=k["KeyId"])["KeyMetadata"]["KeyState"] == "PendingImport"
    aws_key = client.create_key()["KeyMetadata"]
    with pytest.raises(ClientError) as exc:
        client.get_parameters_for_import(KeyId=aws_key["KeyId"], WrappingAlgorithm=alg, WrappingKeySpec="RSA_2048")
    assert code(exc) == "UnsupportedOperationException"

