"""Server features on the real HTTP server with the cluster double (ring 1): strict SigV4,
access-key principals with key-policy and grant enforcement, token-bucket quotas, the audit
trail (no secrets), and state surviving a server restart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from hsmsim.kms import audit
from hsmsim.kms.config import KmsConfig

from .cluster_double import InMemoryClusterDouble
from .conftest import KmsEndpoint, make_ca_pem, start_double, stop_double

NO_RETRY = Config(retries={"total_max_attempts": 1})
ALICE = "arn:aws:iam::111122223333:user/alice"
BOB = "arn:aws:iam::111122223333:user/bob"


def code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


@pytest.fixture
def strict(tmp_path: Path) -> Any:
    ep = start_double(tmp_path, KmsConfig(port=0, strict_sigv4=True, enforce_policies=True,
                                          principals=(f"AKIDALICE={ALICE}=alicesecret", f"AKIDBOB={BOB}=bobsecret")))
    yield ep
    stop_double(ep)


def test_strict_sigv4(strict: KmsEndpoint) -> None:
    alice = strict.client(akid="AKIDALICE", secret="alicesecret", config=NO_RETRY)
    assert alice.list_keys()["Keys"] == []
    with pytest.raises(ClientError) as exc:
        strict.client(akid="AKIDALICE", secret="wrong", config=NO_RETRY).list_keys()
    assert code(exc) == "InvalidSignatureException"
    with pytest.raises(ClientError) as exc:
        strict.client(akid="AKIDNOBODY", secret="x", config=NO_RETRY).list_keys()
    assert code(exc) == "UnrecognizedClientException"
    assert exc.value.response["Error"]["Message"] == "The security token included in the request is invalid."


def test_policy_and_grant_enforcement(strict: KmsEndpoint) -> None:
    alice = strict.client(akid="AKIDALICE", secret="alicesecret", config=NO_RETRY)
    bob = strict.client(akid="AKIDBOB", secret="bobsecret", config=NO_RETRY)
    policy = json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"AWS": ALICE}, "Action": "kms:*", "Resource": "*"}]})
    key = alice.create_key(Policy=policy)["KeyMetadata"]
    blob = alice.encrypt(KeyId=key["KeyId"], Plaintext=b"p", EncryptionContext={"t": "1"})["CiphertextBlob"]
    with pytest.raises(ClientError) as exc:
        bob.decrypt(CiphertextBlob=blob, EncryptionContext={"t": "1"})
    assert code(exc) == "AccessDeniedException"
    assert exc.value.response["Error"]["Message"] == (
        f"User: {BOB} is not authorized to perform: kms:Decrypt on resource: {key['Arn']} because no "
        "resource-based policy allows the kms:Decrypt action")
    grant = alice.create_grant(KeyId=key["KeyId"], GranteePrincipal=BOB, Operations=["Decrypt"],
                               Constraints={"EncryptionContextEquals": {"t": "1"}})
    assert bob.decrypt(CiphertextBlob=blob, EncryptionContext={"t": "1"},
                       GrantTokens=[grant["GrantToken"]])["Plaintext"] == b"p"
    blob2 = alice.encrypt(KeyId=key["KeyId"], Plaintext=b"p", EncryptionContext={"t": "2"})["CiphertextBlob"]
    with pytest.raises(ClientError) as exc:
        bob.decrypt(CiphertextBlob=blob2, EncryptionContext={"t": "2"})
    assert code(exc) == "AccessDeniedException"
    with pytest.raises(ClientError) as exc:
        bob.encrypt(KeyId=key["KeyId"], Plaintext=b"p", EncryptionContext={"t": "1"})
    assert code(exc) == "AccessDeniedException"
    deny = json.dumps({"Statement": [
        {"Effect": "Allow", "Principal": {"AWS": ALICE}, "Action": "kms:*", "Resource": "*"},
        {"Effect": "Deny", "Principal": {"AWS": ALICE}, "Action": "kms:Encrypt", "Resource": "*"}]})
    alice.put_key_policy(KeyId=key["KeyId"], Policy=deny)
    with pytest.raises(ClientError) as exc:
        alice.encrypt(KeyId=key["KeyId"], Plaintext=b"p")
    assert code(exc) == "AccessDeniedException"
    alice.revoke_grant(KeyId=key["KeyId"], GrantId=grant["GrantId"])
    with pytest.raises(ClientError) as exc:
        bob.decrypt(CiphertextBlob=blob, EncryptionContext={"t": "1"})
    assert code(exc) == "AccessDeniedException"


def test_quotas_throttle(tmp_path: Path) -> None:
    ep = start_double(tmp_path, KmsConfig(port=0, quotas=True))
    assert ep.server is not None
    now = [1000.0]
    ep.server.service.quota_clock = lambda: now[0]  # frozen: the machine's speed cannot refill
    try:
        c = ep.client(config=NO_RETRY)
        key = c.create_key()["KeyMetadata"]["KeyId"]
        outcomes = []
        for _ in range(12):  # UpdateKeyDescription: 5 requests/s
            try:
                c.update_key_description(KeyId=key, Description="q")
                outcomes.append("ok")
            except ClientError as exc:
                outcomes.append(exc.response["Error"]["Code"])
                assert exc.response["ResponseMetadata"]["HTTPStatusCode"] == 400
                assert exc.response["Error"]["Message"] == ("You have exceeded the rate at which you may "
                                                            "call KMS. Reduce the frequency of your calls.")
        assert outcomes == ["ok"] * 5 + ["ThrottlingException"] * 7
        now[0] += 1.0  # one second later: 5 more
        c.update_key_description(KeyId=key, Description="q")
    finally:
        stop_double(ep)


def test_audit_trail_has_no_secrets(tmp_path: Path) -> None:
    ep = start_double(tmp_path)
    try:
        c = ep.client(config=NO_RETRY)
        key = c.create_key()["KeyMetadata"]
        secret = b"TOP-SECRET-PLAINTEXT"
        blob = c.encrypt(KeyId=key["KeyId"], Plaintext=secret, EncryptionContext={"purpose": "audit"})["CiphertextBlob"]
        c.decrypt(CiphertextBlob=blob, EncryptionContext={"purpose": "audit"})
        with pytest.raises(ClientError):
            c.decrypt(CiphertextBlob=blob)
        with pytest.raises(ClientError):
            c.create_custom_key_store(CustomKeyStoreName="s", CloudHsmClusterId=ep.cluster_id,
                                      TrustAnchorCertificate=make_ca_pem().decode(), KeyStorePassword="Sup3rSecretPw")
        records = list(audit.read(tmp_path))
        names = [r["eventName"] for r in records]
        assert names == ["CreateKey", "Encrypt", "Decrypt", "Decrypt", "CreateCustomKeyStore"]
        enc = records[1]
        assert enc["requestParameters"] == {"keyId": key["KeyId"], "encryptionContext": {"purpose": "audit"}}
        assert enc["resources"] == [{"accountId": "111122223333", "type": "AWS::KMS::Key", "ARN": key["Arn"]}]
        assert enc["eventSource"] == "kms.amazonaws.com" and enc["readOnly"] is True
        assert records[0]["readOnly"] is False and records[0]["managementEvent"] is True
        assert records[2]["requestParameters"]["encryptionAlgorithm"] == "SYMMETRIC_DEFAULT"
        assert records[3]["errorCode"] == "InvalidCiphertextException"
        assert records[4]["errorCode"] == "IncorrectTrustAnchorException"
        line = audit.summary(records[1])
        assert " Encrypt OK by=arn:aws:iam::111122223333:root on=" + key["Arn"] in line
        assert "InvalidCiphertextException" in audit.summary(records[3])
        raw = (tmp_path / "kms" / "audit.jsonl").read_text()
        for needle in ("TOP-SECRET", "VE9QLVNFQ1JFVC", "Sup3rSecretPw", "BEGIN CERTIFICATE"):
            assert needle not in raw
        assert (tmp_path / "kms" / "audit.jsonl").stat().st_mode & 0o777 == 0o600
        assert (tmp_path / "kms" / "kms.sqlite3").stat().st_mode & 0o777 == 0o600
    finally:
        stop_double(ep)


def test_state_survives_restart(tmp_path: Path) -> None:
    double = InMemoryClusterDouble(ca_cert_pem=make_ca_pem())
    ep = start_double(tmp_path, double=double)
    c = ep.client(config=NO_RETRY)
    key = c.create_key(Description="persisted")["KeyMetadata"]
    c.create_alias(AliasName="alias/persisted", TargetKeyId=key["KeyId"])
    grant = c.create_grant(KeyId=key["KeyId"], GranteePrincipal=ALICE, Operations=["Decrypt"])
    blob = c.encrypt(KeyId="alias/persisted", Plaintext=b"survive")["CiphertextBlob"]
    c.rotate_key_on_demand(KeyId=key["KeyId"])
    stop_double(ep)
    ep2 = start_double(tmp_path, double=double)
    try:
        c2 = ep2.client(config=NO_RETRY)
        assert c2.describe_key(KeyId="alias/persisted")["KeyMetadata"]["Description"] == "persisted"
        assert c2.get_key_last_usage(KeyId=key["KeyId"])["KeyLastUsage"]["Operation"] == "Encrypt"
        assert c2.decrypt(CiphertextBlob=blob)["Plaintext"] == b"survive"
        assert [g["GrantId"] for g in c2.list_grants(KeyId=key["KeyId"])["Grants"]] == [grant["GrantId"]]
        assert len(c2.list_key_rotations(KeyId=key["KeyId"])["Rotations"]) == 1
    finally:
        stop_double(ep2)


def test_concurrent_requests_are_safe(kms_double: KmsEndpoint) -> None:
    """Many clients at once: aliases are unique, rotations are counted, nothing fails."""
    from concurrent.futures import ThreadPoolExecutor
    c = kms_double.client(config=NO_RETRY)
    key = c.create_key()["KeyMetadata"]["KeyId"]

    def worker(i: int) -> list[str]:
        cl = kms_double.client(config=NO_RETRY)
        outcomes = []
        for j in range(10):
            blob = cl.encrypt(KeyId=key, Plaintext=b"%d-%d" % (i, j), EncryptionContext={"i": str(i)})["CiphertextBlob"]
            assert cl.decrypt(CiphertextBlob=blob, EncryptionContext={"i": str(i)})["Plaintext"] == b"%d-%d" % (i, j)
            try:
                cl.create_alias(AliasName=f"alias/race-{j}", TargetKeyId=key)
                outcomes.append("created")
            except ClientError as exc:
                outcomes.append(exc.response["Error"]["Code"])
        cl.rotate_key_on_demand(KeyId=key)
        return outcomes

    with ThreadPoolExecutor(8) as pool:
        results = [o for r in pool.map(worker, range(8)) for o in r]
    assert results.count("created") == 10 and results.count("AlreadyExistsException") == 70
    assert len(c.list_key_rotations(KeyId=key)["Rotations"]) == 8
    assert len([a for a in c.list_aliases(KeyId=key)["Aliases"]]) == 10


def test_corrupt_store_is_a_clear_error(tmp_path: Path) -> None:
    from hsmsim.kms.store import Store, StoreError
    db = tmp_path / "kms" / "kms.sqlite3"
    db.parent.mkdir()
    db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError) as exc:
        Store(db)
    assert str(db) in str(exc.value)


def test_policy_conditions_on_encryption_context(strict: KmsEndpoint) -> None:
    alice = strict.client(akid="AKIDALICE", secret="alicesecret", config=NO_RETRY)
    bob = strict.client(akid="AKIDBOB", secret="bobsecret", config=NO_RETRY)
    policy = json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"AWS": ALICE}, "Action": "kms:*", "Resource": "*"},
        {"Effect": "Allow", "Principal": {"AWS": BOB}, "Action": ["kms:Encrypt", "kms:Decrypt"], "Resource": "*",
         "Condition": {"StringEquals": {"kms:EncryptionContext:tenant": "bob"}}},
        {"Effect": "Deny", "Principal": "*", "Action": "kms:Decrypt", "Resource": "*",
         "Condition": {"StringLike": {"kms:EncryptionContext:tenant": "evil*"}}}]})
    key = alice.create_key(Policy=policy)["KeyMetadata"]["KeyId"]
    blob = bob.encrypt(KeyId=key, Plaintext=b"b", EncryptionContext={"tenant": "bob"})["CiphertextBlob"]
    assert bob.decrypt(CiphertextBlob=blob, EncryptionContext={"tenant": "bob"})["Plaintext"] == b"b"
    for ctx in ({"tenant": "alice"}, {}):
        with pytest.raises(ClientError) as exc:
            bob.encrypt(KeyId=key, Plaintext=b"b", EncryptionContext=ctx)
        assert code(exc) == "AccessDeniedException"
    evil = alice.encrypt(KeyId=key, Plaintext=b"e", EncryptionContext={"tenant": "evil-corp"})["CiphertextBlob"]
    with pytest.raises(ClientError) as exc:
        alice.decrypt(CiphertextBlob=evil, EncryptionContext={"tenant": "evil-corp"})
    assert code(exc) == "AccessDeniedException" and "explicit deny" in exc.value.response["Error"]["Message"]


def test_first_use_concurrency_makes_one_domain_key(tmp_path: Path) -> None:
    """Concurrent first uses of the KMS fleet create one fleet user and one domain key, and
    all material sealed meanwhile opens again later."""
    import asyncio

    from hsmsim.kms.material import Fleet
    double = InMemoryClusterDouble(ca_cert_pem=make_ca_pem())
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "admin.password").write_text("adminpw1")
    (tmp_path / "kms").mkdir()

    async def scenario() -> None:
        fleet = Fleet(double, tmp_path)  # type: ignore[arg-type]
        sealed = await asyncio.gather(*(fleet.seal_secret(f"c{i}", b"s%d" % i) for i in range(8)))
        await fleet.close()
        again = Fleet(double, tmp_path)  # type: ignore[arg-type]
        for i, blob in enumerate(sealed):
            assert await again.unseal_secret(f"c{i}", blob) == b"s%d" % i
        await again.close()

    asyncio.run(scenario())
    assert [o["label"] for o in double.objects.values()].count("hsmsim-kms-domain-key") == 1
