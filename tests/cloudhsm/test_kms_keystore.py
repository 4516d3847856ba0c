"""KMS custom key stores on a cluster the CloudHSMv2 API made (issue 18, "the same state
everywhere"): CreateCustomKeyStore checks that cluster through the plane's model (its id, its
trust anchor = the certificate given to InitializeCluster, ACTIVE HSMs in two AZs), and the
store's kmsuser login and key material are in THAT cluster. boto3 against a real daemon."""

from __future__ import annotations

import json
from typing import Any

import pytest
from botocore.exceptions import ClientError

from hsmsim.testing.cluster import HsmsimCluster, run_cli
from .conftest import REGION, describe, hsm_state, wait_for
from .test_boto3 import SUBNETS, sign_csr

KMSUSER_PASSWORD = "kmsuser-Passw0rd"


def _code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


def _kms_client(cluster: HsmsimCluster, region: str) -> Any:
    import boto3
    return boto3.client("kms", endpoint_url=str(cluster.status()["endpoints"]["kms"]), region_name=region,
                        aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="secret")


@pytest.fixture(scope="module")
def kms(cluster: HsmsimCluster) -> Any:
    return _kms_client(cluster, REGION)


def _keys(home: Any, user: str) -> list[dict[str, Any]]:
    r = run_cli(["key", "list", "--json", "--user", user, "--state", str(home)])
    assert r.returncode == 0, r.stderr
    return list(json.loads(r.stdout))


def _store_state(kms: Any, store_id: str) -> dict[str, Any]:
    return dict(kms.describe_custom_key_stores(CustomKeyStoreId=store_id)["CustomKeyStores"][0])


@pytest.fixture(scope="module")
def hosted(client: Any, cluster: HsmsimCluster) -> dict[str, Any]:
    """A cluster made through the API (create, one HSM, initialize, activate) with kmsuser."""
    cid = client.create_cluster(HsmType="hsm2m.medium", SubnetIds=SUBNETS)["Cluster"]["ClusterId"]
    hsm = client.create_hsm(ClusterId=cid, AvailabilityZone="us-east-1a")["Hsm"]
    wait_for(lambda: hsm_state(client, cid, hsm["HsmId"]) == "ACTIVE", "the first HSM ACTIVE")
    signed, anchor = sign_csr(describe(client, cid)["Certificates"]["ClusterCsr"])
    client.initialize_cluster(ClusterId=cid, SignedCert=signed, TrustAnchor=anchor)
    wait_for(lambda: describe(client, cid)["State"] == "INITIALIZED", "INITIALIZED")
    home = cluster.state_dir / "clusters" / cid
    r = run_cli(["user", "change-password", "--username", "admin", "--password", "Admin-Passw0rd",
                 "--state", str(home)])
    assert r.returncode == 0, r.stderr
    assert describe(client, cid)["State"] == "ACTIVE"
    r = run_cli(["user", "create", "--username", "kmsuser", "--role", "crypto-user",
                 "--password", KMSUSER_PASSWORD, "--state", str(home)])
    assert r.returncode == 0, r.stderr
    return {"id": cid, "home": home, "anchor": anchor}


def test_custom_key_store_on_a_created_cluster(client: Any, kms: Any, cluster: HsmsimCluster,
                                               hosted: dict[str, Any]) -> None:
    cid, home, anchor = hosted["id"], hosted["home"], hosted["anchor"]
    args = {"CloudHsmClusterId": cid, "TrustAnchorCertificate": anchor, "KeyStorePassword": KMSUSER_PASSWORD}
    # one ACTIVE HSM: two in different AZs are needed
    with pytest.raises(ClientError) as exc:
        kms.create_custom_key_store(CustomKeyStoreName="hosted-store", **args)
    assert _code(exc) == "CloudHsmClusterInvalidConfigurationException"
    second = client.create_hsm(ClusterId=cid, AvailabilityZone="us-east-1b")["Hsm"]
    wait_for(lambda: hsm_state(client, cid, second["HsmId"]) == "ACTIVE", "the second HSM ACTIVE")
    # the trust anchor must be the one given to InitializeCluster (not the first cluster's CA)
    with pytest.raises(ClientError) as exc:
        kms.create_custom_key_store(CustomKeyStoreName="hosted-store", **{
            **args, "TrustAnchorCertificate": (cluster.state_dir / "ca" / "ca.crt").read_text()})
    assert _code(exc) == "IncorrectTrustAnchorException"
    # a cluster of another Region is not found there
    west = _kms_client(cluster, "us-west-2")
    with pytest.raises(ClientError) as exc:
        west.create_custom_key_store(CustomKeyStoreName="hosted-store", **args)
    assert _code(exc) == "CloudHsmClusterNotFoundException"

    store_id = kms.create_custom_key_store(CustomKeyStoreName="hosted-store", **args)["CustomKeyStoreId"]
    assert _store_state(kms, store_id)["CloudHsmClusterId"] == cid
    kms.connect_custom_key_store(CustomKeyStoreId=store_id)
    got = wait_for(lambda: (s := _store_state(kms, store_id))["ConnectionState"] in ("CONNECTED", "FAILED") and s,
                   "the store connected")
    assert (got["ConnectionState"], got.get("ConnectionErrorCode")) == ("CONNECTED", None)
    key = kms.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=store_id)["KeyMetadata"]
    assert key["Origin"] == "AWS_CLOUDHSM" and key["CloudHsmClusterId"] == cid
    blob = kms.encrypt(KeyId=key["KeyId"], Plaintext=b"on the new cluster")["CiphertextBlob"]
    assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"on the new cluster"
    # the backing key is on the created cluster's HSMs (both), not on the first cluster's
    backing = [k for k in _keys(home, "kmsuser") if k["label"] == key["Arn"]]
    assert len(backing) == 1 and backing[0]["coverage"] == "2/2", backing
    # (kmsfleet: the KMS's own user in the first cluster, which sealed the kmsuser password)
    assert not [k for k in _keys(cluster.state_dir, "kmsfleet") if k["label"] == key["Arn"]]

    # the daemon restarts: the store reconnects once the plane serves its cluster again
    cluster.down()
    cluster.up()
    kms = _kms_client(cluster, REGION)
    got = wait_for(lambda: (s := _store_state(kms, store_id))["ConnectionState"] in ("CONNECTED", "FAILED") and s,
                   "the store reconnected after the restart")
    assert (got["ConnectionState"], got.get("ConnectionErrorCode")) == ("CONNECTED", None)
    assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"on the new cluster"

    # the created cluster stops: the store is disconnected, its keys unavailable
    r = run_cli(["down", "--state", str(home)])
    assert r.returncode == 0, r.stderr
    wait_for(lambda: _store_state(kms, store_id)["ConnectionState"] == "DISCONNECTED", "DISCONNECTED")
    assert kms.describe_key(KeyId=key["KeyId"])["KeyMetadata"]["KeyState"] == "Unavailable"
    with pytest.raises(ClientError) as exc:
        kms.encrypt(KeyId=key["KeyId"], Plaintext=b"x")
    assert _code(exc) == "KMSInvalidStateException"
    # the cluster exists, with none of its HSMs running: the connection starts and fails
    # (ConnectCustomKeyStore has no CloudHsmClusterNotFoundException)
    kms.connect_custom_key_store(CustomKeyStoreId=store_id)
    got = wait_for(lambda: (s := _store_state(kms, store_id))["ConnectionState"] in ("CONNECTED", "FAILED") and s,
                   "the connection failed")
    assert (got["ConnectionState"], got.get("ConnectionErrorCode")) == ("FAILED", "INSUFFICIENT_CLOUDHSM_HSMS")
