"""Ring 2 of the CloudHSMv2 endpoint: raw HTTP against a real daemon, in both wire protocols:
status codes, headers, error codes and messages, authentication and validation."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from hsmsim.cloudhsm import cbor
from hsmsim.testing.cluster import HsmsimCluster

JSON = "application/x-amz-json-1.1"


def post(endpoint: str, body: bytes, headers: dict[str, str], path: str = "/", sign: bool = True,
         region: str = "us-east-1", method: str = "POST") -> tuple[int, dict[str, str], bytes]:
    url = endpoint + path
    if sign:
        req = AWSRequest(method=method, url=url, data=body, headers=headers)
        SigV4Auth(Credentials("AKIDEXAMPLE", "secret"), "cloudhsm", region).add_auth(req)
        headers = dict(req.headers.items())
    r = urllib.request.Request(url, data=body if method == "POST" else None, headers=headers, method=method)
    try:
        with urllib.request.urlopen(r, timeout=60) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers.items()), err.read()


def call_json(endpoint: str, op: str, params: Any, **kw: Any) -> tuple[int, dict[str, str], Any]:
    status, headers, body = post(endpoint, json.dumps(params).encode() if not isinstance(params, bytes) else params,
                                 {"X-Amz-Target": f"BaldrApiService.{op}", "Content-Type": JSON}, **kw)
    return status, headers, json.loads(body)


def test_json_1_1_describe_clusters(endpoint: str, cluster: HsmsimCluster) -> None:
    status, headers, body = call_json(endpoint, "DescribeClusters", {})
    assert status == 200 and headers["Content-Type"] == JSON and headers["x-amzn-RequestId"]
    ours = [c for c in body["Clusters"] if c["ClusterId"] == cluster.cluster_id]
    assert len(ours) == 1 and ours[0]["State"] == "ACTIVE"
    assert isinstance(ours[0]["CreateTimestamp"], float)
    assert {h["HsmId"] for h in ours[0]["Hsms"]} == {h["hsm_id"] for h in cluster.status()["hsms"]}
    # the same account in another Region has no cluster
    status, _, body = call_json(endpoint, "DescribeClusters", {}, region="eu-west-1")
    assert status == 200 and body == {"Clusters": []}


def test_rpc_v2_cbor(endpoint: str, cluster: HsmsimCluster) -> None:
    status, headers, body = post(endpoint, cbor.dumps({"Filters": {"clusterIds": [cluster.cluster_id]}}),
                                 {"Content-Type": "application/cbor", "smithy-protocol": "rpc-v2-cbor"},
                                 path="/service/BaldrApiService/operation/DescribeClusters")
    assert status == 200 and headers["Content-Type"] == "application/cbor"
    assert headers["smithy-protocol"] == "rpc-v2-cbor"
    got = cbor.loads(body)
    assert [c["ClusterId"] for c in got["Clusters"]] == [cluster.cluster_id]
    assert isinstance(got["Clusters"][0]["CreateTimestamp"], float)  # tag 1
    status, _, body = post(endpoint, b"\xa1", {"Content-Type": "application/cbor"},
                           path="/service/BaldrApiService/operation/DescribeClusters")
    assert status == 400 and cbor.loads(body)["__type"] == "SerializationException"
    status, _, body = post(endpoint, cbor.dumps({}), {"Content-Type": "application/cbor"},
                           path="/service/BaldrApiService/operation/Nope")
    assert status == 400 and cbor.loads(body)["__type"] == "UnknownOperationException"


def test_errors(endpoint: str) -> None:
    status, _, body = call_json(endpoint, "DescribeClusters", {}, sign=False)
    assert status == 403 and body["__type"] == "MissingAuthenticationTokenException"
    status, _, body = call_json(endpoint, "CreateKey", {})
    assert status == 400 and body["__type"] == "UnknownOperationException"
    status, _, body = call_json(endpoint, "CreateHsm", {"ClusterId": "cluster-1", "AvailabilityZone": "us-east-1a"})
    assert status == 400 and body["__type"] == "ValidationException"
    assert body["Message"] == ("1 validation error detected: Value 'cluster-1' at 'clusterId' failed to "
                               "satisfy constraint: Member must satisfy regular expression pattern: "
                               "cluster-[2-7a-zA-Z]{11,16}")
    status, _, body = call_json(endpoint, "DescribeClusters", b"{not json")
    assert status == 400 and body["__type"] == "SerializationException"
    status, _, body = call_json(endpoint, "DescribeClusters", {"Filters": {"colour": ["blue"]}})
    assert status == 400 and body["__type"] == "CloudHsmInvalidRequestException"
    status, _, body = call_json(endpoint, "DescribeClusters", {"NextToken": "bm90IGEgdG9rZW4="})
    assert status == 400 and body["__type"] == "CloudHsmInvalidRequestException"
    status, _, body = call_json(endpoint, "DeleteCluster", {"ClusterId": "cluster-aaaaaaaaaaa"})
    assert status == 400 and body["__type"] == "CloudHsmResourceNotFoundException"
    status, _, body = call_json(endpoint, "CreateCluster", {"HsmType": "hsm9.huge", "SubnetIds": ["subnet-0123456789"]})
    assert status == 400 and body["__type"] == "CloudHsmInvalidRequestException"
    status, _, body = call_json(endpoint, "DescribeClusters", b"x" * (300 * 1024))
    assert status == 413 and body["__type"] == "RequestEntityTooLargeException"
    status, _, body = post(endpoint, b"", {}, method="GET", sign=False)
    assert status == 400 and json.loads(body)["__type"] == "UnknownOperationException"


def test_initialize_checks_the_certificate(endpoint: str, cluster: HsmsimCluster) -> None:
    """The daemon's own cluster is initialized already; a new cluster without an HSM cannot
    be; a certificate for another key or from another CA is refused."""
    status, _, body = call_json(endpoint, "InitializeCluster", {
        "ClusterId": cluster.cluster_id, "SignedCert": "x", "TrustAnchor": "y"})
    assert status == 400 and body["__type"] == "CloudHsmInvalidRequestException"
    assert "ACTIVE" in body["Message"]
    status, _, body = call_json(endpoint, "CreateCluster", {"HsmType": "hsm2m.medium",
                                                            "SubnetIds": ["subnet-0a1b2c3d4e5f60001"]})
    cid = body["Cluster"]["ClusterId"]
    status, _, body = call_json(endpoint, "InitializeCluster", {"ClusterId": cid, "SignedCert": "x", "TrustAnchor": "y"})
    assert status == 400 and "no ACTIVE HSM" in body["Message"]
    status, _, body = call_json(endpoint, "CreateHsm", {"ClusterId": cid, "AvailabilityZone": "us-east-1a"})
    hsm = body["Hsm"]["HsmId"]
    import time
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        c = call_json(endpoint, "DescribeClusters", {"Filters": {"clusterIds": [cid]}})[2]["Clusters"][0]
        if [h["State"] for h in c["Hsms"]] == ["ACTIVE"]:
            break
        time.sleep(0.2)
    from .test_boto3 import sign_csr
    signed, anchor = sign_csr(c["Certificates"]["ClusterCsr"])
    _, other_anchor = sign_csr(c["Certificates"]["ClusterCsr"])
    status, _, body = call_json(endpoint, "InitializeCluster", {"ClusterId": cid, "SignedCert": signed,
                                                                "TrustAnchor": other_anchor})
    assert status == 400 and body["Message"] == "SignedCert is not signed by TrustAnchor."
    status, _, body = call_json(endpoint, "InitializeCluster", {"ClusterId": cid, "SignedCert": anchor,
                                                                "TrustAnchor": anchor})
    assert status == 400 and body["Message"] == "SignedCert does not certify the cluster's CSR."
    c = call_json(endpoint, "DescribeClusters", {"Filters": {"clusterIds": [cid]}})[2]["Clusters"][0]
    assert c["State"] == "UNINITIALIZED" and "ClusterCsr" in c["Certificates"]
    status, _, body = call_json(endpoint, "DeleteHsm", {"ClusterId": cid, "HsmId": hsm})
    assert status == 200 and body == {"HsmId": hsm}


def test_down_while_the_last_hsm_is_being_deleted_leaves_no_node(endpoint: str, cluster: HsmsimCluster) -> None:
    """The daemon stops while a hosted cluster's last HSM is being deleted: the node process
    stops too, and the cluster's /tmp link goes. Runs last: it stops this module's daemon."""
    import os
    import time
    from hsmsim.testing.cluster import run_cli
    _, _, body = call_json(endpoint, "CreateCluster", {"HsmType": "hsm2m.medium",
                                                       "SubnetIds": ["subnet-0a1b2c3d4e5f60001"]})
    cid = body["Cluster"]["ClusterId"]
    hsm = call_json(endpoint, "CreateHsm", {"ClusterId": cid, "AvailabilityZone": "us-east-1a"})[2]["Hsm"]["HsmId"]
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        c = call_json(endpoint, "DescribeClusters", {"Filters": {"clusterIds": [cid]}})[2]["Clusters"][0]
        if [h["State"] for h in c["Hsms"]] == ["ACTIVE"]:
            break
        time.sleep(0.2)
    link = f"/tmp/hsmsim-{os.getuid()}/{cid}"
    st = json.loads(run_cli(["status", "--json", "--state", link]).stdout)
    pid = st["hsms"][0]["pid"]
    assert st["hsms"][0]["hsm_id"] == hsm and pid
    assert call_json(endpoint, "DeleteHsm", {"ClusterId": cid, "HsmId": hsm})[0] == 200
    cluster.down()

    def alive() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return b"node" in Path(f"/proc/{pid}/cmdline").read_bytes()
    deadline = time.monotonic() + 30
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive()
    assert not os.path.lexists(link)
