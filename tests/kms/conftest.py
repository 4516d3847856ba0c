"""Fixtures of the KMS tests.

* `kms_double`: the real KMS HTTP server (aiohttp, real store, real audit) in a background
  event loop, on a free port, backed by `InMemoryClusterDouble` (ring-1 logic tests only).
* `kms_real`: the KMS of a real daemon with a real cluster (`hsmsim up`), for rings 2 and 3;
  skipped with the reason when the cluster cannot start here.
* `kms`: parametrised over both, for tests that must hold against each."""

from __future__ import annotations

import asyncio
import datetime
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hsmsim.kms.config import KmsConfig
from hsmsim.kms.server import KmsServer, start_kms
from .cluster_double import InMemoryClusterDouble

T = TypeVar("T")


def make_ca_pem(name: str = "hsmsim test CA") -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


class LoopThread:
    """An asyncio loop in a daemon thread; `run(coro)` runs a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


@dataclass
class KmsEndpoint:
    url: str
    state_dir: Path
    kind: str  # "double" | "real"
    cluster_id: str
    ca_pem: str
    region: str = "us-east-1"
    account: str = "111122223333"
    double: InMemoryClusterDouble | None = None
    loop: LoopThread | None = None
    server: KmsServer | None = None
    extra: Any = None

    def client(self, **kw: Any) -> Any:
        import boto3
        return boto3.client("kms", endpoint_url=self.url, region_name=self.region,
                            aws_access_key_id=kw.pop("akid", "AKIDEXAMPLE"),
                            aws_secret_access_key=kw.pop("secret", "secret"), **kw)


def start_double(tmp: Path, config: KmsConfig | None = None,
                 double: InMemoryClusterDouble | None = None) -> KmsEndpoint:
    ca = make_ca_pem()
    double = double or InMemoryClusterDouble(ca_cert_pem=ca)
    (tmp / "secrets").mkdir(parents=True, exist_ok=True)
    (tmp / "secrets" / "admin.password").write_text("adminpw1")
    loop = LoopThread()
    cfg = config or KmsConfig(port=0)
    server = loop.run(start_kms(double, cfg, tmp))  # type: ignore[arg-type]
    return KmsEndpoint(server.url, tmp, "double", double.cluster_id, ca.decode(), double=double,
                       loop=loop, server=server)


def stop_double(ep: KmsEndpoint) -> None:
    assert ep.loop is not None and ep.server is not None
    ep.loop.run(ep.server.close())
    ep.loop.stop()


@pytest.fixture(scope="session")
def kms_double(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KmsEndpoint]:
    ep = start_double(tmp_path_factory.mktemp("kms-double"))
    yield ep
    stop_double(ep)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_real(state_dir: Path, extra_env: dict[str, str] | None = None) -> KmsEndpoint:
    """A real `hsmsim up --detach` cluster with its KMS on a free port."""
    import os
    try:
        from hsmsim.resources import softhsm_library
        softhsm_library()
    except FileNotFoundError as exc:
        pytest.skip(f"hsmsim cluster unavailable: {exc}")
    from hsmsim.testing.cluster import ClusterStartError, start_cluster
    env = {**os.environ, **(extra_env or {})}
    try:
        cluster = start_cluster(state_dir, env=env)
    except ClusterStartError as exc:
        pytest.fail(f"the hsmsim cluster did not start:\n{exc}", pytrace=False)
    ca = (state_dir / "ca" / "ca.crt").read_text()
    return KmsEndpoint(cluster.kms_endpoint, state_dir, "real", cluster.cluster_id, ca, extra=cluster)


@pytest.fixture(scope="session")
def kms_real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KmsEndpoint]:
    ep = start_real(tmp_path_factory.mktemp("kms-real") / "state")
    yield ep
    ep.extra.down()


@pytest.fixture(scope="session", params=["double", "real"])
def kms(request: pytest.FixtureRequest) -> KmsEndpoint:
    """The KMS backed by the cluster double (ring 1) and by a real cluster (ring 3)."""
    return request.getfixturevalue(f"kms_{request.param}")  # type: ignore[no-any-return]


def advance_clock(ep: KmsEndpoint, seconds: float) -> float:
    """Moves the endpoint's KMS clock forward; returns its new time (epoch seconds)."""
    import json
    import urllib.request
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials
    data = json.dumps({"advance_seconds": seconds}).encode()
    signed = AWSRequest(method="POST", url=ep.url + "/_hsmsim/clock", data=data,
                        headers={"Content-Type": "application/json"})
    SigV4Auth(Credentials("AKIDEXAMPLE", "secret"), "kms", ep.region).add_auth(signed)
    req = urllib.request.Request(ep.url + "/_hsmsim/clock", method="POST", data=data,
                                 headers=dict(signed.headers.items()))
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200
        return float(json.loads(r.read())["now"])


def add_cu(ep: KmsEndpoint, username: str, password: str) -> None:
    """Creates a crypto user in the endpoint's cluster (as the admin)."""
    if ep.kind == "double":
        from .cluster_double import _User
        assert ep.double is not None
        ep.double.users[username] = _User("crypto-user", password)
        return
    r = ep.extra.cli("user", "create", "--username", username, "--role", "crypto-user",
                     "--password", password)
    if r.returncode != 0 and "already exists" in r.stderr:
        set_cu_password(ep, username, password)
        return
    assert r.returncode == 0, r.stderr


def set_cu_password(ep: KmsEndpoint, username: str, password: str) -> None:
    """Sets a crypto user's password in the endpoint's cluster (as the admin) and unlocks it."""
    if ep.kind == "double":
        assert ep.double is not None
        ep.double.users[username].password = password
        ep.double.users[username].failed = 0
        return
    r = ep.extra.cli("user", "change-password", "--username", username, "--password", password)
    assert r.returncode == 0, r.stderr


KMSUSER_PASSWORD = "kmsPassw0rd1"


def connected_store(ep: KmsEndpoint, client: Any) -> str:
    """The endpoint's custom key store for its cluster, created (with kmsuser) if needed and
    connected."""
    import time
    stores = [s for s in client.describe_custom_key_stores()["CustomKeyStores"]
              if s["CloudHsmClusterId"] == ep.cluster_id]
    if not stores:
        add_cu(ep, "kmsuser", KMSUSER_PASSWORD)
        sid = client.create_custom_key_store(
            CustomKeyStoreName="shared-store", CloudHsmClusterId=ep.cluster_id,
            TrustAnchorCertificate=ep.ca_pem, KeyStorePassword=KMSUSER_PASSWORD)["CustomKeyStoreId"]
    else:
        sid = stores[0]["CustomKeyStoreId"]
        if stores[0]["ConnectionState"] == "CONNECTED":
            return str(sid)
        if stores[0]["ConnectionState"] != "DISCONNECTED":
            client.disconnect_custom_key_store(CustomKeyStoreId=sid)
    client.connect_custom_key_store(CustomKeyStoreId=sid)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        s = client.describe_custom_key_stores(CustomKeyStoreId=sid)["CustomKeyStores"][0]
        if s["ConnectionState"] in ("CONNECTED", "FAILED"):
            assert s["ConnectionState"] == "CONNECTED", s
            return str(sid)
        time.sleep(0.05)
    raise AssertionError("custom key store did not connect")
