"""Fixtures of the CloudHSMv2 control-plane tests: a real daemon (`hsmsim up`, real nodes)
whose CloudHSMv2 endpoint the tests call through raw HTTP, boto3 and aws-cli."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from hsmsim.testing.cluster import ClusterStartError, HsmsimCluster, free_port, start_cluster

REGION = "us-east-1"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HsmsimCluster]:
    try:
        from hsmsim.resources import softhsm_library
        softhsm_library()
    except FileNotFoundError as exc:
        pytest.skip(f"hsmsim cluster unavailable: {exc}")
    state = tmp_path_factory.mktemp("cloudhsm") / "state"
    port = free_port()  # several test daemons run at once; a restart keeps the port
    try:
        c = start_cluster(state, azs=2, extra_args=["--disable-key-availability-check"],
                          env={**os.environ, "HSMSIM_CLOUDHSM_PORT": str(port)})
    except ClusterStartError as exc:
        pytest.fail(f"the hsmsim cluster did not start:\n{exc}", pytrace=False)
    with (state / "hsmsim.toml").open("a") as f:
        f.write(f"\n[cloudhsm]\nport = {port}\n")
    yield c
    c.down()


@pytest.fixture(scope="module")
def endpoint(cluster: HsmsimCluster) -> str:
    return str(cluster.status()["endpoints"]["cloudhsm"])


@pytest.fixture(scope="module")
def client(endpoint: str) -> Any:
    import boto3
    return boto3.client("cloudhsmv2", endpoint_url=endpoint, region_name=REGION,
                        aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="secret")


def wait_for(check: Callable[[], Any], what: str, timeout: float = 180.0) -> Any:
    """Polls `check` until it returns a true value (returned)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def describe(client: Any, cid: str) -> dict[str, Any]:
    got = client.describe_clusters(Filters={"clusterIds": [cid]})["Clusters"]
    assert len(got) == 1
    return dict(got[0])


def hsm_state(client: Any, cid: str, hsm_id: str) -> str | None:
    for h in describe(client, cid).get("Hsms", []):
        if h["HsmId"] == hsm_id:
            return str(h["State"])
    return None
