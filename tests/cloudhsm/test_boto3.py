"""Ring 3 of the CloudHSMv2 endpoint: boto3 (which speaks Smithy RPC v2 CBOR to this service)
against a real daemon. The getting-started flow of the CloudHSM guide end to end on real node
processes, then each operation's effect on the state the daemon reports."""

from __future__ import annotations

import datetime
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hsmsim.testing.cluster import HsmsimCluster, run_cli
from .conftest import REGION, describe, hsm_state, wait_for

SUBNETS = ["subnet-0a1b2c3d4e5f60001", "subnet-0a1b2c3d4e5f60002"]


def _code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


def sign_csr(csr_pem: str) -> tuple[str, str]:
    """(signed cluster certificate, trust anchor): a throw-away issuing CA signs the CSR."""
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "customer issuing CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now)
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(csr.subject).issuer_name(name)
            .public_key(csr.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=30))
            .sign(key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return cert.public_bytes(pem).decode(), ca.public_bytes(pem).decode()


def pkcs11_tool(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["pkcs11-tool", "--module", env["HSMSIM_PKCS11_MODULE"], "--login",
                           "--pin", env["HSMSIM_PIN"], "--session-rw", *args],
                          env=env, capture_output=True, text=True, timeout=120)


def cluster_env(home: Path) -> dict[str, str]:
    r = run_cli(["env", "--json", "--state", str(home)])
    assert r.returncode == 0, r.stderr
    import os
    return {**os.environ, **json.loads(r.stdout)}


@pytest.fixture(scope="module")
def new_cluster(client: Any, cluster: HsmsimCluster, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The getting-started flow: create-cluster, create-hsm, initialize-cluster with a CSR
    signed by a local CA, activate, a PKCS#11 client signs through the new HSM, a second HSM
    in another AZ, the key on both."""
    created = client.create_cluster(HsmType="hsm2m.medium", SubnetIds=SUBNETS,
                                    TagList=[{"Key": "env", "Value": "test"}])["Cluster"]
    cid = created["ClusterId"]
    assert created["State"] == "UNINITIALIZED" and created["Hsms"] == []
    assert created["SubnetMapping"] == {"us-east-1a": SUBNETS[0], "us-east-1b": SUBNETS[1]}
    hsm = client.create_hsm(ClusterId=cid, AvailabilityZone="us-east-1a")["Hsm"]
    assert hsm["State"] == "CREATE_IN_PROGRESS" and hsm["SubnetId"] == SUBNETS[0]
    wait_for(lambda: hsm_state(client, cid, hsm["HsmId"]) == "ACTIVE", "the first HSM ACTIVE")
    c = describe(client, cid)
    assert c["State"] == "UNINITIALIZED"
    signed, anchor = sign_csr(c["Certificates"]["ClusterCsr"])
    got = client.initialize_cluster(ClusterId=cid, SignedCert=signed, TrustAnchor=anchor)
    assert got["State"] == "INITIALIZE_IN_PROGRESS"
    wait_for(lambda: describe(client, cid)["State"] == "INITIALIZED", "INITIALIZED")
    c = describe(client, cid)
    assert c["Certificates"]["ClusterCertificate"] == signed and "ClusterCsr" not in c["Certificates"]
    home = cluster.state_dir / "clusters" / cid
    # activation: CloudHSM CLI's `cluster activate` sets the admin's password
    r = run_cli(["user", "change-password", "--username", "admin", "--password", "Admin-Passw0rd",
                 "--state", str(home)])
    assert r.returncode == 0, r.stderr
    assert describe(client, cid)["State"] == "ACTIVE"
    env = cluster_env(home)
    assert env["HSMSIM_SOCKET"] == str(home / "gateway.sock")
    r = pkcs11_tool(env, "--private", "--keypairgen", "--key-type", "rsa:2048", "--label", "gs-rsa", "--id", "07")
    assert r.returncode == 0, r.stderr
    msg = tmp_path_factory.mktemp("gs") / "msg.txt"
    msg.write_text("sign me")
    r = pkcs11_tool(env, "--sign", "-m", "SHA256-RSA-PKCS", "--label", "gs-rsa", "-i", str(msg),
                    "-o", str(msg) + ".sig")
    assert r.returncode == 0, r.stderr
    assert Path(str(msg) + ".sig").stat().st_size == 256
    second = client.create_hsm(ClusterId=cid, AvailabilityZone="us-east-1b")["Hsm"]
    assert second["State"] == "CREATE_IN_PROGRESS" and second["AvailabilityZone"] == "us-east-1b"
    wait_for(lambda: hsm_state(client, cid, second["HsmId"]) == "ACTIVE", "the second HSM ACTIVE")
    return {"id": cid, "home": home, "env": env, "first": hsm["HsmId"], "second": second["HsmId"],
            "msg": msg}


def test_describe_clusters_shows_the_daemons_cluster(client: Any, cluster: HsmsimCluster) -> None:
    st = cluster.status()
    c = describe(client, st["cluster_id"])
    assert c["State"] == "ACTIVE" and c["HsmType"] == "hsm2m.medium" and c["Mode"] == "FIPS"
    assert sorted(h["HsmId"] for h in c["Hsms"]) == sorted(h["hsm_id"] for h in st["hsms"])
    assert {h["AvailabilityZone"] for h in c["Hsms"]} == {h["az"] for h in st["hsms"]}
    assert all(h["State"] == "ACTIVE" and h["EniIp"].count(".") == 3 for h in c["Hsms"])
    # EniIp is where the HSM's direct TLS listener is (Client SDK 5 connects to each HSM's ENI)
    listens = {h["hsm_id"]: h.get("direct_address") for h in st["hsms"]}
    assert all(listens.values()), listens
    assert {h["HsmId"]: f"tls:{h['EniIp']}:" for h in c["Hsms"]} == {
        k: v.rsplit(":", 1)[0] + ":" for k, v in listens.items()}
    assert c["Certificates"]["ClusterCertificate"] == (cluster.state_dir / "ca" / "ca.crt").read_text()


def test_hsm_kill_in_the_daemons_cluster(client: Any, cluster: HsmsimCluster) -> None:
    """`hsmsim hsm kill` makes the HSM DEGRADED and the cluster DEGRADED; started, both are
    ACTIVE again."""
    primary = cluster.status()["cluster_id"]
    hsm = cluster.status()["hsms"][0]["hsm_id"]
    cluster.kill(hsm)
    wait_for(lambda: hsm_state(client, primary, hsm) == "DEGRADED", "DEGRADED after kill")
    assert describe(client, primary)["State"] == "DEGRADED"
    cluster.start(hsm)
    wait_for(lambda: hsm_state(client, primary, hsm) == "ACTIVE", "ACTIVE after start")
    wait_for(lambda: describe(client, primary)["State"] == "ACTIVE", "the cluster ACTIVE again")


def test_getting_started_key_is_on_both_hsms(client: Any, new_cluster: dict[str, Any]) -> None:
    cid = new_cluster["id"]
    c = describe(client, cid)
    assert c["State"] == "ACTIVE"
    assert sorted((h["AvailabilityZone"], h["State"]) for h in c["Hsms"]) == [
        ("us-east-1a", "ACTIVE"), ("us-east-1b", "ACTIVE")]

    def on_both() -> bool:
        r = run_cli(["key", "list", "--json", "--state", str(new_cluster["home"])])
        assert r.returncode == 0, r.stderr
        keys = [k for k in json.loads(r.stdout) if k["label"] == "gs-rsa"]
        assert len(keys) == 2  # the private and the public key
        return all(k["coverage"] == "2/2" for k in keys)
    # the fixture waited for the second HSM to be ACTIVE: ACTIVE means it holds every key
    # already (CloudHSM clones a new HSM from the cluster's backup), no further wait
    assert on_both()
    # the same state for `hsmsim status` of the hosted cluster
    r = run_cli(["status", "--json", "--state", str(new_cluster["home"])])
    st = json.loads(r.stdout)
    assert st["cluster_id"] == cid
    assert sorted(h["hsm_id"] for h in st["hsms"]) == sorted([new_cluster["first"], new_cluster["second"]])
    # each HSM's EniIp is the host its direct TLS listener is on, as for the daemon's cluster
    listens = {h["hsm_id"]: h.get("direct_address") for h in st["hsms"]}
    assert all(listens.values()), listens
    assert {h["HsmId"]: f"tls:{h['EniIp']}:" for h in c["Hsms"]} == {
        k: v.rsplit(":", 1)[0] + ":" for k, v in listens.items()}


def test_hsm_kill_shows_degraded_then_active(client: Any, new_cluster: dict[str, Any]) -> None:
    home, hsm = new_cluster["home"], new_cluster["second"]
    assert run_cli(["hsm", "kill", hsm, "--state", str(home)]).returncode == 0
    wait_for(lambda: hsm_state(client, new_cluster["id"], hsm) == "DEGRADED", "DEGRADED after kill")
    # the key still signs through the other HSM
    msg = new_cluster["msg"]
    r = pkcs11_tool(new_cluster["env"], "--sign", "-m", "SHA256-RSA-PKCS", "--label", "gs-rsa",
                    "-i", str(msg), "-o", str(msg) + ".sig2")
    assert r.returncode == 0, r.stderr
    assert run_cli(["hsm", "start", hsm, "--state", str(home)]).returncode == 0
    wait_for(lambda: hsm_state(client, new_cluster["id"], hsm) == "ACTIVE", "ACTIVE after start")


def test_create_hsm_refusals(client: Any, new_cluster: dict[str, Any]) -> None:
    with pytest.raises(ClientError) as exc:
        client.create_hsm(ClusterId=new_cluster["id"], AvailabilityZone="us-east-1c")
    assert _code(exc) == "CloudHsmInvalidRequestException"
    assert "subnet mapping" in exc.value.response["Error"]["Message"]
    with pytest.raises(ClientError) as exc:
        client.create_hsm(ClusterId="cluster-aaaaaaaaaaa", AvailabilityZone="us-east-1a")
    assert _code(exc) == "CloudHsmResourceNotFoundException"
    with pytest.raises(ClientError) as exc:  # another Region's view has no such cluster
        import boto3
        other = boto3.client("cloudhsmv2", endpoint_url=client.meta.endpoint_url, region_name="eu-west-1",
                             aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="secret")
        other.create_hsm(ClusterId=new_cluster["id"], AvailabilityZone="eu-west-1a")
    assert _code(exc) == "CloudHsmResourceNotFoundException"


def test_tags(client: Any, new_cluster: dict[str, Any]) -> None:
    cid = new_cluster["id"]
    assert client.list_tags(ResourceId=cid)["TagList"] == [{"Key": "env", "Value": "test"}]
    client.tag_resource(ResourceId=cid, TagList=[{"Key": f"k{i:02d}", "Value": str(i)} for i in range(5)])
    page = client.list_tags(ResourceId=cid, MaxResults=4)
    assert [t["Key"] for t in page["TagList"]] == ["env", "k00", "k01", "k02"]
    rest = client.list_tags(ResourceId=cid, MaxResults=4, NextToken=page["NextToken"])
    assert [t["Key"] for t in rest["TagList"]] == ["k03", "k04"] and "NextToken" not in rest
    client.untag_resource(ResourceId=cid, TagKeyList=["k00", "k01", "k02", "k03", "k04"])
    assert describe(client, cid)["TagList"] == [{"Key": "env", "Value": "test"}]
    with pytest.raises(ClientError) as exc:
        client.tag_resource(ResourceId=cid, TagList=[{"Key": f"t{i}", "Value": "x"} for i in range(50)])
    assert _code(exc) == "CloudHsmResourceLimitExceededException"
    with pytest.raises(ClientError) as exc:
        client.tag_resource(ResourceId=cid, TagList=[{"Key": "aws:x", "Value": "x"}])
    assert _code(exc) == "CloudHsmTagException"
    with pytest.raises(ClientError) as exc:
        client.list_tags(ResourceId="backup-aaaaaaaaaaa")
    assert _code(exc) == "CloudHsmResourceNotFoundException"


def test_modify_cluster_retention(client: Any, new_cluster: dict[str, Any]) -> None:
    cid = new_cluster["id"]
    got = client.modify_cluster(ClusterId=cid, BackupRetentionPolicy={"Type": "DAYS", "Value": "30"})
    assert got["Cluster"]["BackupRetentionPolicy"] == {"Type": "DAYS", "Value": "30"}
    assert describe(client, cid)["BackupRetentionPolicy"]["Value"] == "30"
    with pytest.raises(ClientError) as exc:
        client.modify_cluster(ClusterId=cid, BackupRetentionPolicy={"Type": "DAYS", "Value": "5"})
    assert _code(exc) == "CloudHsmInvalidRequestException"
    got = client.modify_cluster(ClusterId=cid, HsmType="hsm1.medium")["Cluster"]
    assert got["HsmType"] == "hsm1.medium" and all(h["HsmType"] == "hsm1.medium" for h in got["Hsms"])
    client.modify_cluster(ClusterId=cid, HsmType="hsm2m.medium")
    with pytest.raises(ClientError) as exc:
        client.modify_cluster(ClusterId=cid, HsmType="hsm9.medium")
    assert _code(exc) == "CloudHsmInvalidRequestException"


def test_a_restart_brings_back_every_cluster(client: Any, cluster: HsmsimCluster,
                                            new_cluster: dict[str, Any]) -> None:
    """The daemon's cluster keeps its id; a hosted cluster comes back with its HSMs and keys."""
    primary = cluster.status()["cluster_id"]
    cluster.down()
    cluster.up("--disable-key-availability-check")  # as the fixture started it
    assert cluster.status()["cluster_id"] == primary
    assert describe(client, primary)["State"] in ("ACTIVE", "DEGRADED")
    cid = new_cluster["id"]
    wait_for(lambda: sorted(h["State"] for h in describe(client, cid)["Hsms"]) == ["ACTIVE", "ACTIVE"],
             "the hosted cluster's HSMs ACTIVE again")
    assert describe(client, cid)["State"] == "ACTIVE"
    msg = new_cluster["msg"]
    r = pkcs11_tool(new_cluster["env"], "--sign", "-m", "SHA256-RSA-PKCS", "--label", "gs-rsa",
                    "-i", str(msg), "-o", str(msg) + ".sig4")
    assert r.returncode == 0, r.stderr


def test_backups_describe_delete_restore_modify_copy_policy(client: Any, cluster: HsmsimCluster) -> None:
    primary = cluster.status()["cluster_id"]
    made = [cluster.control("backup.create")["backup_id"] for _ in range(3)]
    got = client.describe_backups(Filters={"clusterIds": [primary]}, SortAscending=True)["Backups"]
    ids = [b["BackupId"] for b in got]
    assert [i for i in ids if i in made] == made
    assert all(b["BackupState"] == "READY" and b["ClusterId"] == primary for b in got)
    page = client.describe_backups(Filters={"backupIds": made}, MaxResults=2, SortAscending=True)
    assert [b["BackupId"] for b in page["Backups"]] == made[:2]
    rest = client.describe_backups(Filters={"backupIds": made}, MaxResults=2, SortAscending=True,
                                   NextToken=page["NextToken"])
    assert [b["BackupId"] for b in rest["Backups"]] == made[2:] and "NextToken" not in rest
    b = made[0]
    deleted = client.delete_backup(BackupId=b)["Backup"]
    assert deleted["BackupState"] == "PENDING_DELETION"
    assert deleted["DeleteTimestamp"] - datetime.datetime.now(datetime.timezone.utc) > datetime.timedelta(days=6)
    got = client.describe_backups(Filters={"states": ["PENDING_DELETION"]})["Backups"]
    assert [x["BackupId"] for x in got] == [b]
    with pytest.raises(ClientError) as exc:
        client.delete_backup(BackupId=b)
    assert _code(exc) == "CloudHsmInvalidRequestException"
    assert client.restore_backup(BackupId=b)["Backup"]["BackupState"] == "READY"
    with pytest.raises(ClientError) as exc:
        client.restore_backup(BackupId=b)
    assert _code(exc) == "CloudHsmInvalidRequestException"
    assert client.modify_backup_attributes(BackupId=b, NeverExpires=True)["Backup"]["NeverExpires"] is True
    assert [x["BackupId"] for x in client.describe_backups(Filters={"neverExpires": ["true"]})["Backups"]] == [b]
    copy = client.copy_backup_to_region(DestinationRegion="us-west-2", BackupId=b)["DestinationBackup"]
    assert copy["SourceBackup"] == b and copy["SourceRegion"] == REGION and copy["SourceCluster"] == primary
    import boto3
    west = boto3.client("cloudhsmv2", endpoint_url=client.meta.endpoint_url, region_name="us-west-2",
                        aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="secret")
    copies = west.describe_backups(Filters={"sourceBackupIds": [b]})["Backups"]
    assert len(copies) == 1 and copies[0]["SourceRegion"] == REGION and copies[0]["BackupId"] != b
    with pytest.raises(ClientError) as exc:
        client.copy_backup_to_region(DestinationRegion=REGION, BackupId=b)
    assert _code(exc) == "CloudHsmInvalidRequestException"
    # resource policies (backup sharing)
    arn = f"arn:aws:cloudhsm:{REGION}:111122223333:backup/{b}"
    policy = json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::444455556666:root"},
        "Action": ["cloudhsm:CreateCluster", "cloudhsm:DescribeBackups"], "Resource": arn}]})
    assert client.put_resource_policy(ResourceArn=arn, Policy=policy)["Policy"] == policy
    assert client.get_resource_policy(ResourceArn=arn)["Policy"] == policy
    assert client.delete_resource_policy(ResourceArn=arn)["Policy"] == policy
    assert "Policy" not in client.get_resource_policy(ResourceArn=arn)
    with pytest.raises(ClientError) as exc:
        client.delete_resource_policy(ResourceArn=arn)
    assert _code(exc) == "CloudHsmResourceNotFoundException"
    with pytest.raises(ClientError) as exc:
        client.put_resource_policy(ResourceArn=arn, Policy="not json")
    assert _code(exc) == "CloudHsmInvalidRequestException"
    with pytest.raises(ClientError) as exc:
        client.put_resource_policy(ResourceArn=f"arn:aws:cloudhsm:{REGION}:111122223333:cluster/{primary}",
                                   Policy=policy)
    assert _code(exc) == "CloudHsmInvalidRequestException"


def test_cluster_from_backup_has_the_keys(client: Any, cluster: HsmsimCluster, new_cluster: dict[str, Any]) -> None:
    """CreateCluster with SourceBackupId: the first HSM holds the backup's keys and users."""
    home = new_cluster["home"]
    r = run_cli(["backup", "create", "--json", "--state", str(home)])
    assert r.returncode == 0, r.stderr
    bid = json.loads(r.stdout)["backup_id"]
    assert client.describe_backups(Filters={"backupIds": [bid]})["Backups"][0]["ClusterId"] == new_cluster["id"]
    restored = client.create_cluster(HsmType="hsm2m.medium", SubnetIds=SUBNETS, SourceBackupId=bid)["Cluster"]
    rid = restored["ClusterId"]
    assert restored["SourceBackupId"] == bid
    hsm = client.create_hsm(ClusterId=rid, AvailabilityZone="us-east-1b")["Hsm"]
    wait_for(lambda: hsm_state(client, rid, hsm["HsmId"]) == "ACTIVE", "the restored HSM ACTIVE")
    assert describe(client, rid)["State"] == "ACTIVE"
    rhome = cluster.state_dir / "clusters" / rid
    env = cluster_env(rhome)
    msg = new_cluster["msg"]
    r = pkcs11_tool(env, "--sign", "-m", "SHA256-RSA-PKCS", "--label", "gs-rsa", "-i", str(msg),
                    "-o", str(msg) + ".sig3")
    assert r.returncode == 0, r.stderr
    # the last HSM goes, then the cluster
    client.delete_hsm(ClusterId=rid, HsmId=hsm["HsmId"])
    wait_for(lambda: not describe(client, rid)["Hsms"], "no HSMs left")
    assert client.delete_cluster(ClusterId=rid)["Cluster"]["State"] == "DELETED"


def test_delete_hsm_by_eni_ip_then_delete_cluster_refused_while_hsms(client: Any, new_cluster: dict[str, Any]) -> None:
    cid = new_cluster["id"]
    with pytest.raises(ClientError) as exc:
        client.delete_cluster(ClusterId=cid)
    assert _code(exc) == "CloudHsmInvalidRequestException"
    ip = next(h["EniIp"] for h in describe(client, cid)["Hsms"] if h["HsmId"] == new_cluster["first"])
    assert client.delete_hsm(ClusterId=cid, EniIp=ip)["HsmId"] == new_cluster["first"]
    assert hsm_state(client, cid, new_cluster["first"]) in ("DELETE_IN_PROGRESS", None)
    wait_for(lambda: hsm_state(client, cid, new_cluster["first"]) is None, "the HSM gone")
    r = run_cli(["status", "--json", "--state", str(new_cluster["home"])])
    assert [h["hsm_id"] for h in json.loads(r.stdout)["hsms"]] == [new_cluster["second"]]
    # the last HSM: the cluster stays with no HSM, then can be deleted
    client.delete_hsm(ClusterId=cid, HsmId=new_cluster["second"])
    wait_for(lambda: not describe(client, cid)["Hsms"], "no HSMs left")
    assert describe(client, cid)["State"] == "ACTIVE"
    got = client.delete_cluster(ClusterId=cid)["Cluster"]
    assert got["State"] == "DELETED"
    with pytest.raises(ClientError) as exc:
        client.create_hsm(ClusterId=cid, AvailabilityZone="us-east-1a")
    assert _code(exc) == "CloudHsmInvalidRequestException"


def test_the_daemons_last_hsm_cannot_be_deleted(client: Any, cluster: HsmsimCluster) -> None:
    primary = cluster.status()["cluster_id"]
    with pytest.raises(ClientError) as exc:
        client.delete_cluster(ClusterId=primary)
    assert _code(exc) == "CloudHsmInvalidRequestException"
