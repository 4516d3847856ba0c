"""Ring 3 with real clients against the real daemon: aws-encryption-sdk (1 MiB with an
encryption context, with an AWS_KMS key and with a custom-key-store key, endpoint taken from
AWS_ENDPOINT_URL_KMS as `hsmsim env` prints it) and aws-cli (`aws kms encrypt/decrypt` with
fileb:// blobs)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import KmsEndpoint, connected_store

AWS_CLI = Path(sys.executable).with_name("aws")


@pytest.fixture(scope="module")
def client(kms_real: KmsEndpoint) -> Any:
    return kms_real.client()


@pytest.mark.parametrize("origin", ["AWS_KMS", "AWS_CLOUDHSM"])
def test_encryption_sdk_1mib(kms_real: KmsEndpoint, client: Any, origin: str,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    aws_encryption_sdk = pytest.importorskip("aws_encryption_sdk")
    import botocore.session
    from aws_encryption_sdk.identifiers import CommitmentPolicy

    if origin == "AWS_CLOUDHSM":
        store = connected_store(kms_real, client)
        arn = client.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=store)["KeyMetadata"]["Arn"]
    else:
        arn = client.create_key()["KeyMetadata"]["Arn"]
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", kms_real.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDESDK")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "esdk-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", kms_real.region)
    sdk = aws_encryption_sdk.EncryptionSDKClient(commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT)
    provider = aws_encryption_sdk.StrictAwsKmsMasterKeyProvider(key_ids=[arn],
                                                                 botocore_session=botocore.session.Session())
    data = os.urandom(1 << 20)
    context = {"tenant": "acme", "purpose": "esdk-test"}
    ct, header = sdk.encrypt(source=data, key_provider=provider, encryption_context=context)
    assert len(ct) > len(data) and [k.key_provider.key_info for k in header.encrypted_data_keys] == [arn.encode()]
    pt, dheader = sdk.decrypt(source=ct, key_provider=provider)
    assert pt == data
    assert all(dheader.encryption_context[k] == v for k, v in context.items())
    tampered = bytearray(ct)
    tampered[len(ct) // 2] ^= 1
    with pytest.raises(Exception):
        sdk.decrypt(source=bytes(tampered), key_provider=provider)


def test_aws_cli_encrypt_decrypt(kms_real: KmsEndpoint, client: Any, tmp_path: Path) -> None:
    if not AWS_CLI.exists():
        pytest.skip(f"aws-cli not installed next to {sys.executable}")
    key = client.create_key()["KeyMetadata"]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "AKIDCLI", "AWS_SECRET_ACCESS_KEY": "cli-secret",
           "AWS_DEFAULT_REGION": kms_real.region, "AWS_CONFIG_FILE": str(tmp_path / "none"),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"\x00binary\xffpayload\n")

    def aws(*args: str) -> dict[str, Any]:
        r = subprocess.run([str(AWS_CLI), "--endpoint-url", kms_real.url, "--output", "json", "kms", *args],
                           capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)  # type: ignore[no-any-return]

    out = aws("encrypt", "--key-id", key["KeyId"], "--plaintext", f"fileb://{plain}",
              "--encryption-context", "app=cli")
    assert out["KeyId"] == key["Arn"]
    blob = tmp_path / "blob.bin"
    blob.write_bytes(base64.b64decode(out["CiphertextBlob"]))
    back = aws("decrypt", "--ciphertext-blob", f"fileb://{blob}", "--encryption-context", "app=cli")
    assert base64.b64decode(back["Plaintext"]) == plain.read_bytes() and back["KeyId"] == key["Arn"]
    r = subprocess.run([str(AWS_CLI), "--endpoint-url", kms_real.url, "kms", "decrypt", "--ciphertext-blob",
                        f"fileb://{blob}", "--encryption-context", "app=other"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode != 0 and "InvalidCiphertextException" in r.stderr


def test_hsmsim_audit_kms_shows_the_trail(kms_real: KmsEndpoint, client: Any) -> None:
    key = client.create_key(Description="audited")["KeyMetadata"]
    client.encrypt(KeyId=key["KeyId"], Plaintext=b"never logged", EncryptionContext={"why": "audit"})
    r = kms_real.extra.cli("audit", "--kms", "--json")
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    mine = [x for x in records if any(res["ARN"] == key["Arn"] for res in x.get("resources") or [])]
    assert [x["eventName"] for x in mine][:2] == ["CreateKey", "Encrypt"]
    assert mine[1]["requestParameters"]["encryptionContext"] == {"why": "audit"}
    assert "never logged" not in r.stdout and base64.b64encode(b"never logged").decode() not in r.stdout
