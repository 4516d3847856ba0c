"""KMS across Regions: each request's Region is its SigV4 credential scope's; keys, aliases,
grants, custom key stores and the audit trail are per Region; a store made before Regions
(schema 1) migrates to the configured default Region. Ring 1 (the cluster double) and ring 3
(boto3 against the real daemon)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from hsmsim.kms.config import KmsConfig
from .conftest import KmsEndpoint, start_double, stop_double

NO_RETRY = Config(parameter_validation=False, retries={"total_max_attempts": 1})


def code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


def regional(ep: KmsEndpoint, region: str, **kw: Any) -> Any:
    import boto3
    return boto3.client("kms", endpoint_url=ep.url, region_name=region, aws_access_key_id="AKIDREGION",
                        aws_secret_access_key="secret", config=NO_RETRY, **kw)


def test_two_regions_are_two_kms(kms: KmsEndpoint) -> None:
    east, west = regional(kms, "us-east-1"), regional(kms, "eu-west-3")
    ke = east.create_key(Description="east")["KeyMetadata"]
    kw = west.create_key(Description="west")["KeyMetadata"]
    assert ke["Arn"] == f"arn:aws:kms:us-east-1:{kms.account}:key/{ke['KeyId']}"
    assert kw["Arn"] == f"arn:aws:kms:eu-west-3:{kms.account}:key/{kw['KeyId']}"
    assert kw["KeyId"] not in [k["KeyId"] for k in east.list_keys(Limit=1000)["Keys"]]
    assert [k["KeyId"] for k in west.list_keys(Limit=1000)["Keys"]] == [kw["KeyId"]]
    # a key id, a key ARN and an alias of one Region name nothing in another
    for ref in (kw["KeyId"], kw["Arn"]):
        with pytest.raises(ClientError) as exc:
            east.describe_key(KeyId=ref)
        assert code(exc) == "NotFoundException"
    west.create_alias(AliasName="alias/regional", TargetKeyId=kw["KeyId"])
    east.create_alias(AliasName="alias/regional", TargetKeyId=ke["KeyId"])  # same name, other Region
    assert west.describe_key(KeyId="alias/regional")["KeyMetadata"]["KeyId"] == kw["KeyId"]
    assert east.describe_key(KeyId="alias/regional")["KeyMetadata"]["KeyId"] == ke["KeyId"]
    arns = [a["AliasArn"] for a in west.list_aliases()["Aliases"] if a["AliasName"] == "alias/regional"]
    assert arns == [f"arn:aws:kms:eu-west-3:{kms.account}:alias/regional"]
    with pytest.raises(ClientError) as exc:
        east.describe_key(KeyId=f"arn:aws:kms:eu-west-3:{kms.account}:alias/regional")
    assert code(exc) == "NotFoundException"
    assert exc.value.response["Error"]["Message"] == f"Alias arn:aws:kms:eu-west-3:{kms.account}:alias/regional is not found."
    # ciphertext of one Region does not decrypt in another (its key is not there)
    blob = west.encrypt(KeyId=kw["KeyId"], Plaintext=b"west")["CiphertextBlob"]
    assert west.decrypt(CiphertextBlob=blob)["Plaintext"] == b"west"
    with pytest.raises(ClientError) as exc:
        east.decrypt(CiphertextBlob=blob)
    assert code(exc) == "InvalidCiphertextException"
    # grants are per Region
    g = west.create_grant(KeyId=kw["KeyId"], GranteePrincipal="arn:aws:iam::111122223333:role/r",
                          Operations=["Decrypt"], RetiringPrincipal="arn:aws:iam::111122223333:role/ret")
    assert [x["GrantId"] for x in west.list_retirable_grants(
        RetiringPrincipal="arn:aws:iam::111122223333:role/ret")["Grants"]] == [g["GrantId"]]
    assert east.list_retirable_grants(RetiringPrincipal="arn:aws:iam::111122223333:role/ret")["Grants"] == []
    with pytest.raises(ClientError) as exc:
        east.retire_grant(GrantToken=g["GrantToken"])
    assert code(exc) == "InvalidGrantTokenException"


def test_custom_key_store_cluster_is_in_the_default_region(kms: KmsEndpoint) -> None:
    west = regional(kms, "eu-west-3")
    with pytest.raises(ClientError) as exc:
        west.create_custom_key_store(CustomKeyStoreName="west-store", CloudHsmClusterId=kms.cluster_id,
                                     TrustAnchorCertificate=kms.ca_pem, KeyStorePassword="kmsPassw0rd1")
    assert code(exc) == "CloudHsmClusterNotFoundException"
    assert west.describe_custom_key_stores()["CustomKeyStores"] == []


@pytest.mark.parametrize("region,want", [
    ("xx-nowhere-9", "InvalidSignatureException"),  # not a Region: a scope no endpoint accepts
    ("cn-north-1", "UnrecognizedClientException"),  # an AWS Region this endpoint does not serve
])
def test_unserved_region_is_refused(kms_double: KmsEndpoint, region: str, want: str) -> None:
    with pytest.raises(ClientError) as exc:
        regional(kms_double, region).list_keys()
    assert code(exc) == want


def test_configured_region_list(tmp_path: Path) -> None:
    ep = start_double(tmp_path, KmsConfig(port=0, region="eu-central-1", regions=("eu-central-1", "local-1")))
    try:
        local = regional(ep, "local-1")
        assert local.create_key()["KeyMetadata"]["Arn"].startswith("arn:aws:kms:local-1:")
        with pytest.raises(ClientError) as exc:
            regional(ep, "us-east-1").list_keys()
        assert code(exc) == "UnrecognizedClientException"
    finally:
        stop_double(ep)


def test_audit_records_carry_the_region(kms_double: KmsEndpoint) -> None:
    west = regional(kms_double, "ap-south-2")
    arn = west.create_key(Description="audited west")["KeyMetadata"]["Arn"]
    records = [json.loads(line) for line in (kms_double.state_dir / "kms" / "audit.jsonl").read_text().splitlines()]
    mine = [r for r in records if any(x["ARN"] == arn for x in r.get("resources") or [])]
    assert mine and all(r["awsRegion"] == "ap-south-2" for r in mine)


def _to_schema_1(db: Path) -> None:
    """Rewrites a store to the layout hsmsim had before Regions (schema 1)."""
    con = sqlite3.connect(str(db), isolation_level=None)
    con.executescript("""
    BEGIN;
    CREATE TABLE k1 (key_id TEXT PRIMARY KEY, data TEXT NOT NULL);
    INSERT INTO k1 SELECT key_id, data FROM keys; DROP TABLE keys; ALTER TABLE k1 RENAME TO keys;
    CREATE TABLE a1 (name TEXT PRIMARY KEY, data TEXT NOT NULL);
    INSERT INTO a1 SELECT name, data FROM aliases; DROP TABLE aliases; ALTER TABLE a1 RENAME TO aliases;
    DROP INDEX grants_key;
    CREATE TABLE g1 (grant_id TEXT PRIMARY KEY, key_id TEXT NOT NULL, data TEXT NOT NULL);
    INSERT INTO g1 SELECT grant_id, key_id, data FROM grants; DROP TABLE grants; ALTER TABLE g1 RENAME TO grants;
    CREATE INDEX grants_key ON grants(key_id);
    CREATE TABLE s1 (store_id TEXT PRIMARY KEY, data TEXT NOT NULL);
    INSERT INTO s1 SELECT store_id, data FROM stores; DROP TABLE stores; ALTER TABLE s1 RENAME TO stores;
    CREATE TABLE u1 (key_id TEXT PRIMARY KEY, data TEXT NOT NULL);
    INSERT INTO u1 SELECT key_id, data FROM last_usage; DROP TABLE last_usage; ALTER TABLE u1 RENAME TO last_usage;
    DELETE FROM meta WHERE k = 'schema_version';
    COMMIT;
    """)
    con.close()


def test_schema_1_store_migrates_to_the_default_region(tmp_path: Path) -> None:
    ep = start_double(tmp_path, KmsConfig(port=0))
    c = ep.client(config=NO_RETRY)
    key = c.create_key(Description="before regions")["KeyMetadata"]
    c.create_alias(AliasName="alias/old", TargetKeyId=key["KeyId"])
    grant = c.create_grant(KeyId=key["KeyId"], GranteePrincipal="arn:aws:iam::111122223333:role/r",
                           Operations=["Decrypt"])["GrantId"]
    blob = c.encrypt(KeyId="alias/old", Plaintext=b"kept")["CiphertextBlob"]
    double = ep.double
    stop_double(ep)
    db = tmp_path / "kms" / "kms.sqlite3"
    _to_schema_1(db)
    cols = [r[1] for r in sqlite3.connect(str(db)).execute("PRAGMA table_info(keys)")]
    assert cols == ["key_id", "data"]

    ep = start_double(tmp_path, KmsConfig(port=0, region="eu-west-2"), double=double)
    try:
        west = regional(ep, "eu-west-2")
        md = west.describe_key(KeyId="alias/old")["KeyMetadata"]
        assert md["KeyId"] == key["KeyId"] and md["Description"] == "before regions"
        assert md["Arn"] == f"arn:aws:kms:eu-west-2:{ep.account}:key/{key['KeyId']}"
        assert west.decrypt(CiphertextBlob=blob)["Plaintext"] == b"kept"
        assert [g["GrantId"] for g in west.list_grants(KeyId=key["KeyId"])["Grants"]] == [grant]
        with pytest.raises(ClientError) as exc:
            regional(ep, "us-east-1").describe_key(KeyId=key["KeyId"])
        assert code(exc) == "NotFoundException"
    finally:
        stop_double(ep)
    con = sqlite3.connect(str(db))
    assert con.execute("SELECT v FROM meta WHERE k = 'schema_version'").fetchone() == ("2",)
    assert con.execute("SELECT DISTINCT region FROM keys").fetchall() == [("eu-west-2",)]


def test_http_region_from_the_credential_scope(kms_real: KmsEndpoint) -> None:
    """Ring 2: raw signed requests; the Region is the credential scope's, nothing else."""
    import http.client
    from urllib.parse import urlsplit

    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    def send(region: str, target: str, body: dict[str, Any]) -> tuple[int, Any]:
        data = json.dumps(body).encode()
        req = AWSRequest(method="POST", url=kms_real.url + "/", data=data,
                         headers={"X-Amz-Target": f"TrentService.{target}",
                                  "Content-Type": "application/x-amz-json-1.1"})
        SigV4Auth(Credentials("AKIDRAW", "raw-secret"), "kms", region).add_auth(req)
        u = urlsplit(kms_real.url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        try:
            conn.request("POST", "/", body=data, headers=dict(req.headers.items()))
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    status, body = send("eu-north-1", "CreateKey", {"Description": "raw north"})
    assert status == 200
    arn = body["KeyMetadata"]["Arn"]
    assert arn.split(":")[3] == "eu-north-1"
    status, body = send("us-east-1", "DescribeKey", {"KeyId": body["KeyMetadata"]["KeyId"]})
    assert status == 400 and body["__type"] == "NotFoundException"
    status, body = send("eu-north-1", "DescribeKey", {"KeyId": arn})
    assert status == 200 and body["KeyMetadata"]["Arn"] == arn
    status, body = send("moon-base-1", "ListKeys", {})
    assert status == 400 and body["__type"] == "InvalidSignatureException"


def test_hsmsim_env_exports_the_default_region(tmp_path: Path) -> None:
    from hsmsim.cli.cluster import client_env
    from hsmsim.cluster.state import StateDir
    state = StateDir(tmp_path)
    (tmp_path / "hsmsim.toml").write_text('[kms]\nregion = "eu-west-2"\n')
    state.secrets.mkdir(mode=0o700)
    state.cu_password.write_text("cupassword1")
    state.cu_password.chmod(0o600)
    env = client_env(state, endpoints={"kms": "http://127.0.0.1:1"}, base={})
    assert env["AWS_DEFAULT_REGION"] == "eu-west-2"
    assert client_env(state, endpoints={"kms": "http://127.0.0.1:1"},
                      base={"AWS_DEFAULT_REGION": "ap-south-1"}).get("AWS_DEFAULT_REGION") is None


def test_quotas_are_per_region(tmp_path: Path) -> None:
    ep = start_double(tmp_path, KmsConfig(port=0, quotas=True))
    try:
        east, west = regional(ep, "us-east-1"), regional(ep, "eu-west-1")
        codes = []
        for _ in range(12):  # DescribeCustomKeyStores: 5 requests/s
            try:
                east.describe_custom_key_stores()
                codes.append("ok")
            except ClientError as exc:
                codes.append(str(exc.response["Error"]["Code"]))
        assert "ThrottlingException" in codes
        assert west.describe_custom_key_stores()["CustomKeyStores"] == []  # its own bucket
    finally:
        stop_double(ep)


def test_multi_region_key_survives_restart(tmp_path: Path) -> None:
    ep = start_double(tmp_path, KmsConfig(port=0))
    east, west = regional(ep, "us-east-1"), regional(ep, "eu-west-1")
    kid = east.create_key(MultiRegion=True)["KeyMetadata"]["KeyId"]
    east.replicate_key(KeyId=kid, ReplicaRegion="eu-west-1", Description="west copy")
    blob = east.encrypt(KeyId=kid, Plaintext=b"after restart")["CiphertextBlob"]
    west.create_alias(AliasName="alias/west-only", TargetKeyId=kid)
    double = ep.double
    stop_double(ep)
    ep = start_double(tmp_path, KmsConfig(port=0), double=double)
    try:
        west = regional(ep, "eu-west-1")
        md = west.describe_key(KeyId="alias/west-only")["KeyMetadata"]
        assert md["Description"] == "west copy" and md["MultiRegionConfiguration"]["MultiRegionKeyType"] == "REPLICA"
        assert west.decrypt(CiphertextBlob=blob)["Plaintext"] == b"after restart"
        with pytest.raises(ClientError) as exc:
            regional(ep, "us-east-1").describe_key(KeyId="alias/west-only")
        assert code(exc) == "NotFoundException"
    finally:
        stop_double(ep)


def test_strict_sigv4_verifies_each_regions_scope(tmp_path: Path) -> None:
    import boto3
    ep = start_double(tmp_path, KmsConfig(port=0, strict_sigv4=True,
                                          principals=("AKIDALICE=arn:aws:iam::111122223333:user/alice=alicesecret",)))
    try:
        def client(region: str, secret: str = "alicesecret") -> Any:
            return boto3.client("kms", endpoint_url=ep.url, region_name=region, aws_access_key_id="AKIDALICE",
                                aws_secret_access_key=secret, config=NO_RETRY)
        arn = client("eu-west-1").create_key()["KeyMetadata"]["Arn"]
        assert arn.split(":")[3] == "eu-west-1"
        assert client("us-east-1").list_keys()["Keys"] == []
        with pytest.raises(ClientError) as exc:
            client("eu-west-1", "wrong").list_keys()
        assert code(exc) == "InvalidSignatureException"
    finally:
        stop_double(ep)
