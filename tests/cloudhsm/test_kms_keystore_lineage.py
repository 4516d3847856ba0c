"""KMS custom key stores on clusters the CloudHSMv2 API made, the two paths after a cluster is
lost (issue 18): UpdateCustomKeyStore moves a disconnected store only to a cluster sharing its
cluster's backup history (CloudHsmClusterNotRelatedException otherwise, even for a cluster whose
certificate the same CA signed), and a store whose cluster lost every HSM, then was deleted,
is DISCONNECTED and fails to connect with the connection error codes AWS documents
(INSUFFICIENT_CLOUDHSM_HSMS, then CLUSTER_NOT_FOUND). boto3 against a real daemon."""

from __future__ import annotations

import datetime
import json
from typing import Any

import pytest
from botocore.exceptions import ClientError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hsmsim.testing.cluster import HsmsimCluster, run_cli
from .conftest import REGION, describe, hsm_state, wait_for
from .test_boto3 import SUBNETS

KMSUSER_PASSWORD = "kmsuser-Passw0rd"


class Ca:
    """A customer issuing CA that signs cluster CSRs (one CA may sign several clusters')."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "customer issuing CA")])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(self.name).issuer_name(self.name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=30))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM).decode()

    def sign(self, csr_pem: str) -> str:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(csr.subject).issuer_name(self.name)
                .public_key(csr.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=30))
                .sign(self.key, hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.PEM).decode()


def _code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


@pytest.fixture(scope="module")
def kms(cluster: HsmsimCluster) -> Any:
    import boto3
    return boto3.client("kms", endpoint_url=str(cluster.status()["endpoints"]["kms"]), region_name=REGION,
                        aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="secret")


def _store(kms: Any, store_id: str) -> dict[str, Any]:
    return dict(kms.describe_custom_key_stores(CustomKeyStoreId=store_id)["CustomKeyStores"][0])


def _settled(kms: Any, store_id: str) -> dict[str, Any]:
    return dict(wait_for(lambda: (s := _store(kms, store_id))["ConnectionState"] in ("CONNECTED", "FAILED") and s,
                         "the store's connection settled"))


def _add_hsm(client: Any, cid: str, az: str) -> str:
    hsm_id = str(client.create_hsm(ClusterId=cid, AvailabilityZone=az)["Hsm"]["HsmId"])
    wait_for(lambda: hsm_state(client, cid, hsm_id) == "ACTIVE", f"{hsm_id} ACTIVE")
    return hsm_id


def _make_cluster(client: Any, cluster: HsmsimCluster, ca: Ca | None = None,
                  source_backup: str | None = None) -> str:
    """A cluster with two ACTIVE HSMs (us-east-1a, -1b): a new one initialized with a CSR `ca`
    signed, activated, with kmsuser; or one created from `source_backup` (ACTIVE as made)."""
    extra = {"SourceBackupId": source_backup} if source_backup else {}
    cid = str(client.create_cluster(HsmType="hsm2m.medium", SubnetIds=SUBNETS, **extra)["Cluster"]["ClusterId"])
    _add_hsm(client, cid, "us-east-1a")
    if ca is not None:
        signed = ca.sign(describe(client, cid)["Certificates"]["ClusterCsr"])
        client.initialize_cluster(ClusterId=cid, SignedCert=signed, TrustAnchor=ca.pem)
        wait_for(lambda: describe(client, cid)["State"] == "INITIALIZED", "INITIALIZED")
        home = cluster.state_dir / "clusters" / cid
        for args in (["user", "change-password", "--username", "admin", "--password", "Admin-Passw0rd"],
                     ["user", "create", "--username", "kmsuser", "--role", "crypto-user",
                      "--password", KMSUSER_PASSWORD]):
            r = run_cli([*args, "--state", str(home)])
            assert r.returncode == 0, r.stderr
    _add_hsm(client, cid, "us-east-1b")
    assert describe(client, cid)["State"] == "ACTIVE"
    return cid


def test_update_moves_a_store_only_to_a_cluster_of_the_same_backup_history(
        client: Any, kms: Any, cluster: HsmsimCluster) -> None:
    ca = Ca()
    origin = _make_cluster(client, cluster, ca)
    store_id = kms.create_custom_key_store(CustomKeyStoreName="lineage", CloudHsmClusterId=origin,
                                           TrustAnchorCertificate=ca.pem,
                                           KeyStorePassword=KMSUSER_PASSWORD)["CustomKeyStoreId"]
    assert _store(kms, store_id)["ConnectionState"] == "DISCONNECTED"

    # a cluster the same CA initialized, but of another backup history: not related
    stranger = _make_cluster(client, cluster, ca)
    with pytest.raises(ClientError) as exc:
        kms.update_custom_key_store(CustomKeyStoreId=store_id, CloudHsmClusterId=stranger)
    assert _code(exc) == "CloudHsmClusterNotRelatedException"
    assert _store(kms, store_id)["CloudHsmClusterId"] == origin

    # a cluster made from a backup of the store's cluster: related, it has the same certificate
    r = run_cli(["backup", "create", "--json", "--state", str(cluster.state_dir / "clusters" / origin)])
    assert r.returncode == 0, r.stderr
    backup = client.describe_backups(Filters={"clusterIds": [origin]}, SortAscending=False)["Backups"][0]["BackupId"]
    restored = _make_cluster(client, cluster, source_backup=backup)
    assert (describe(client, restored)["Certificates"]["ClusterCertificate"]
            == describe(client, origin)["Certificates"]["ClusterCertificate"])
    kms.update_custom_key_store(CustomKeyStoreId=store_id, CloudHsmClusterId=restored)
    assert _store(kms, store_id)["CloudHsmClusterId"] == restored
    # ... and the store connects there (kmsuser came with the backup)
    kms.connect_custom_key_store(CustomKeyStoreId=store_id)
    got = _settled(kms, store_id)
    assert (got["ConnectionState"], got.get("ConnectionErrorCode")) == ("CONNECTED", None)
    key = kms.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=store_id)["KeyMetadata"]
    assert key["CloudHsmClusterId"] == restored
    kms.disconnect_custom_key_store(CustomKeyStoreId=store_id)
    # back to the original: related too (the restored cluster descends from it)
    kms.update_custom_key_store(CustomKeyStoreId=store_id, CloudHsmClusterId=origin)
    assert _store(kms, store_id)["CloudHsmClusterId"] == origin


def test_a_store_whose_cluster_lost_every_hsm_then_was_deleted(
        client: Any, kms: Any, cluster: HsmsimCluster) -> None:
    ca = Ca()
    cid = _make_cluster(client, cluster, ca)
    store_id = kms.create_custom_key_store(CustomKeyStoreName="doomed", CloudHsmClusterId=cid,
                                           TrustAnchorCertificate=ca.pem,
                                           KeyStorePassword=KMSUSER_PASSWORD)["CustomKeyStoreId"]
    kms.connect_custom_key_store(CustomKeyStoreId=store_id)
    assert _settled(kms, store_id)["ConnectionState"] == "CONNECTED"

    for h in describe(client, cid)["Hsms"]:
        client.delete_hsm(ClusterId=cid, HsmId=h["HsmId"])
        wait_for(lambda: h["HsmId"] not in {x["HsmId"] for x in describe(client, cid)["Hsms"]},
                 f"{h['HsmId']} deleted")
    # KMS lost the cluster's HSMs: the store is disconnected (an error code only comes with FAILED)
    got = wait_for(lambda: (s := _store(kms, store_id))["ConnectionState"] == "DISCONNECTED" and s,
                   "the store DISCONNECTED")
    assert "ConnectionErrorCode" not in got
    # the cluster exists, with no HSM: the connection starts and fails for want of HSMs
    kms.connect_custom_key_store(CustomKeyStoreId=store_id)
    got = _settled(kms, store_id)
    assert (got["ConnectionState"], got.get("ConnectionErrorCode")) == ("FAILED", "INSUFFICIENT_CLOUDHSM_HSMS")

    kms.disconnect_custom_key_store(CustomKeyStoreId=store_id)
    assert client.delete_cluster(ClusterId=cid)["Cluster"]["State"] == "DELETED"
    # the cluster is gone: ConnectCustomKeyStore (whose errors do not include
    # CloudHsmClusterNotFoundException) starts, and the connection fails with CLUSTER_NOT_FOUND
    kms.connect_custom_key_store(CustomKeyStoreId=store_id)
    got = _settled(kms, store_id)
    assert (got["ConnectionState"], got.get("ConnectionErrorCode")) == ("FAILED", "CLUSTER_NOT_FOUND")
    # and it cannot be moved to the deleted cluster's id again, nor to an unknown one
    kms.disconnect_custom_key_store(CustomKeyStoreId=store_id)
    with pytest.raises(ClientError) as exc:
        kms.update_custom_key_store(CustomKeyStoreId=store_id, CloudHsmClusterId="cluster-234abcdefgh")
    assert _code(exc) == "CloudHsmClusterNotFoundException"
    kms.delete_custom_key_store(CustomKeyStoreId=store_id)
