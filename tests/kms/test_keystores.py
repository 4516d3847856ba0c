"""Custom key stores backed by a cluster: CreateCustomKeyStore's checks, the asynchronous
connection state machine with ConnectionErrorCodes caused by the cluster's state, kmsuser
password rotation, keys made and used in the cluster, Unavailable while disconnected, and the
documented restrictions. Parametrised over the cluster double and a real cluster."""

from __future__ import annotations

import time
from typing import Any

import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from .conftest import KMSUSER_PASSWORD as KMSUSER_PW
from .conftest import KmsEndpoint, add_cu, make_ca_pem, set_cu_password


def code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


def wait_state(client: Any, store_id: str, want: set[str], timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        s = client.describe_custom_key_stores(CustomKeyStoreId=store_id)["CustomKeyStores"][0]
        if s["ConnectionState"] in want or time.monotonic() > deadline:
            return s  # type: ignore[no-any-return]
        time.sleep(0.05)


@pytest.fixture(scope="module")
def client(kms: KmsEndpoint) -> Any:
    return kms.client(config=Config(parameter_validation=False, retries={"total_max_attempts": 1}))


@pytest.fixture(scope="module")
def store(client: Any, kms: KmsEndpoint) -> str:
    add_cu(kms, "kmsuser", KMSUSER_PW)
    existing = [s for s in client.describe_custom_key_stores()["CustomKeyStores"]
                if s["CloudHsmClusterId"] == kms.cluster_id]
    if existing:  # made by another test module on the shared cluster: reuse it, disconnected
        sid = existing[0]["CustomKeyStoreId"]
        if existing[0]["ConnectionState"] != "DISCONNECTED":
            client.disconnect_custom_key_store(CustomKeyStoreId=sid)
        wait_state(client, sid, {"DISCONNECTED"})
        client.update_custom_key_store(CustomKeyStoreId=sid, NewCustomKeyStoreName="store-1",
                                       KeyStorePassword=KMSUSER_PW)
        return str(sid)
    sid = client.create_custom_key_store(CustomKeyStoreName="store-1", CloudHsmClusterId=kms.cluster_id,
                                         TrustAnchorCertificate=kms.ca_pem,
                                         KeyStorePassword=KMSUSER_PW)["CustomKeyStoreId"]
    assert sid.startswith("cks-") and len(sid) == 21
    return str(sid)


def test_create_checks(client: Any, kms: KmsEndpoint, store: str) -> None:
    good = dict(CloudHsmClusterId=kms.cluster_id, TrustAnchorCertificate=kms.ca_pem, KeyStorePassword=KMSUSER_PW)
    with pytest.raises(ClientError) as exc:
        client.create_custom_key_store(CustomKeyStoreName="store-1", **good)
    assert code(exc) == "CustomKeyStoreNameInUseException"
    with pytest.raises(ClientError) as exc:
        client.create_custom_key_store(CustomKeyStoreName="store-2", **good)
    assert code(exc) == "CloudHsmClusterInUseException"
    with pytest.raises(ClientError) as exc:
        client.create_custom_key_store(CustomKeyStoreName="store-3", **{**good, "CloudHsmClusterId": "cluster-zzzzzzzzzzzz"})
    assert code(exc) == "CloudHsmClusterNotFoundException"
    with pytest.raises(ClientError) as exc:
        client.create_custom_key_store(CustomKeyStoreName="store-4", **{**good, "TrustAnchorCertificate": make_ca_pem().decode()})
    assert code(exc) == "IncorrectTrustAnchorException"
    with pytest.raises(ClientError) as exc:
        client.create_custom_key_store(CustomKeyStoreName="store-5", **{**good, "KeyStorePassword": "short"})
    assert code(exc) == "ValidationException"
    for f in (kms.state_dir / "kms").glob("kms.sqlite3*"):  # the password is stored sealed
        assert KMSUSER_PW.encode() not in f.read_bytes()
    d = client.describe_custom_key_stores(CustomKeyStoreId=store)["CustomKeyStores"][0]
    assert d["ConnectionState"] == "DISCONNECTED" and d["CloudHsmClusterId"] == kms.cluster_id
    assert d["CustomKeyStoreType"] == "AWS_CLOUDHSM" and "ConnectionErrorCode" not in d
    assert client.describe_custom_key_stores(CustomKeyStoreName="store-1")["CustomKeyStores"][0]["CustomKeyStoreId"] == store
    with pytest.raises(ClientError) as exc:
        client.describe_custom_key_stores(CustomKeyStoreId="cks-11111111111111111")
    assert code(exc) == "CustomKeyStoreNotFoundException"


def test_disconnected_store_rules(client: Any, store: str) -> None:
    with pytest.raises(ClientError) as exc:
        client.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=store)
    assert code(exc) == "CustomKeyStoreInvalidStateException"
    with pytest.raises(ClientError) as exc:
        client.generate_random(NumberOfBytes=8, CustomKeyStoreId=store)
    assert code(exc) == "CustomKeyStoreInvalidStateException"
    with pytest.raises(ClientError) as exc:
        client.disconnect_custom_key_store(CustomKeyStoreId=store)
    assert code(exc) == "CustomKeyStoreInvalidStateException"


def test_connect_use_disconnect(client: Any, kms: KmsEndpoint, store: str) -> None:
    assert client.connect_custom_key_store(CustomKeyStoreId=store)["ResponseMetadata"]["HTTPStatusCode"] == 200
    s = wait_state(client, store, {"CONNECTED", "FAILED"})
    assert s["ConnectionState"] == "CONNECTED", s
    md = client.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=store, Description="in the HSM")["KeyMetadata"]
    assert md["Origin"] == "AWS_CLOUDHSM" and md["CustomKeyStoreId"] == store
    assert md["CloudHsmClusterId"] == kms.cluster_id and "CurrentKeyMaterialId" not in md
    out = client.encrypt(KeyId=md["KeyId"], Plaintext=b"cks data", EncryptionContext={"a": "bc"})
    assert out["KeyId"] == md["Arn"]
    assert client.decrypt(CiphertextBlob=out["CiphertextBlob"], EncryptionContext={"a": "bc"})["Plaintext"] == b"cks data"
    with pytest.raises(ClientError) as exc:
        client.decrypt(CiphertextBlob=out["CiphertextBlob"], EncryptionContext={"ab": "c"})
    assert code(exc) == "InvalidCiphertextException"
    dk = client.generate_data_key(KeyId=md["KeyId"], KeySpec="AES_256")
    assert client.decrypt(CiphertextBlob=dk["CiphertextBlob"])["Plaintext"] == dk["Plaintext"]
    aws_key = client.create_key()["KeyMetadata"]
    re = client.re_encrypt(CiphertextBlob=out["CiphertextBlob"], SourceEncryptionContext={"a": "bc"},
                           DestinationKeyId=aws_key["KeyId"])
    assert client.decrypt(CiphertextBlob=re["CiphertextBlob"])["Plaintext"] == b"cks data"
    assert len(client.generate_random(NumberOfBytes=16, CustomKeyStoreId=store)["Plaintext"]) == 16
    # Restrictions of custom key stores.
    for call, want in (
            (lambda: client.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=store, KeySpec="RSA_2048",
                                       KeyUsage="SIGN_VERIFY"), "UnsupportedOperationException"),
            (lambda: client.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=store, MultiRegion=True),
             "UnsupportedOperationException"),
            (lambda: client.enable_key_rotation(KeyId=md["KeyId"]), "UnsupportedOperationException"),
            (lambda: client.rotate_key_on_demand(KeyId=md["KeyId"]), "UnsupportedOperationException"),
            (lambda: client.generate_data_key_pair(KeyId=md["KeyId"], KeyPairSpec="ECC_NIST_P256"),
             "UnsupportedOperationException")):
        with pytest.raises(ClientError) as exc:
            call()
        assert code(exc) == want
    # Store rules while connected.
    with pytest.raises(ClientError) as exc:
        client.update_custom_key_store(CustomKeyStoreId=store, KeyStorePassword="anotherPass1")
    assert code(exc) == "CustomKeyStoreInvalidStateException"
    client.update_custom_key_store(CustomKeyStoreId=store, NewCustomKeyStoreName="store-1b")
    with pytest.raises(ClientError) as exc:
        client.delete_custom_key_store(CustomKeyStoreId=store)
    assert code(exc) == "CustomKeyStoreInvalidStateException"
    # Disconnect: keys become Unavailable, then come back with their previous state.
    client.disable_key(KeyId=md["KeyId"])
    client.disconnect_custom_key_store(CustomKeyStoreId=store)
    assert wait_state(client, store, {"DISCONNECTED"})["ConnectionState"] == "DISCONNECTED"
    assert client.describe_key(KeyId=md["KeyId"])["KeyMetadata"]["KeyState"] == "Unavailable"
    with pytest.raises(ClientError) as exc:
        client.decrypt(CiphertextBlob=out["CiphertextBlob"], EncryptionContext={"a": "bc"})
    assert code(exc) == "KMSInvalidStateException"
    assert exc.value.response["Error"]["Message"] == f"{md['Arn']} is unavailable."
    client.enable_key(KeyId=md["KeyId"])  # takes effect on reconnect
    assert client.describe_key(KeyId=md["KeyId"])["KeyMetadata"]["KeyState"] == "Unavailable"
    with pytest.raises(ClientError) as exc:
        client.delete_custom_key_store(CustomKeyStoreId=store)
    assert code(exc) == "CustomKeyStoreHasCMKsException"
    client.connect_custom_key_store(CustomKeyStoreId=store)
    assert wait_state(client, store, {"CONNECTED", "FAILED"})["ConnectionState"] == "CONNECTED"
    assert client.describe_key(KeyId=md["KeyId"])["KeyMetadata"]["KeyState"] == "Enabled"
    assert client.decrypt(CiphertextBlob=out["CiphertextBlob"], EncryptionContext={"a": "bc"})["Plaintext"] == b"cks data"
    # Pending deletion survives a disconnect; the key is deleted (and its HSM key destroyed).
    client.schedule_key_deletion(KeyId=md["KeyId"], PendingWindowInDays=7)
    client.disconnect_custom_key_store(CustomKeyStoreId=store)
    wait_state(client, store, {"DISCONNECTED"})
    assert client.describe_key(KeyId=md["KeyId"])["KeyMetadata"]["KeyState"] == "PendingDeletion"
    client.cancel_key_deletion(KeyId=md["KeyId"])
    assert client.describe_key(KeyId=md["KeyId"])["KeyMetadata"]["KeyState"] == "Unavailable"


def test_connect_failures(client: Any, kms: KmsEndpoint, store: str) -> None:
    """A wrong password fails the connection with INVALID_CREDENTIALS; Update fixes it; the
    kmsuser password is rotated on every connect (the old one stops working)."""
    wait_state(client, store, {"DISCONNECTED"})
    client.update_custom_key_store(CustomKeyStoreId=store, KeyStorePassword="wrongPassw0rd")
    client.connect_custom_key_store(CustomKeyStoreId=store)
    s = wait_state(client, store, {"FAILED", "CONNECTED"})
    assert s["ConnectionState"] == "FAILED" and s["ConnectionErrorCode"] == "INVALID_CREDENTIALS"
    with pytest.raises(ClientError) as exc:
        client.connect_custom_key_store(CustomKeyStoreId=store)
    assert code(exc) == "CustomKeyStoreInvalidStateException"
    client.disconnect_custom_key_store(CustomKeyStoreId=store)
    wait_state(client, store, {"DISCONNECTED"})
    if kms.kind == "real":
        # Five failed logins lock kmsuser out in the HSMs: the next connect says USER_LOCKED_OUT.
        codes = []
        for _ in range(6):
            client.connect_custom_key_store(CustomKeyStoreId=store)
            codes.append(wait_state(client, store, {"FAILED", "CONNECTED"}).get("ConnectionErrorCode"))
            client.disconnect_custom_key_store(CustomKeyStoreId=store)
            wait_state(client, store, {"DISCONNECTED"})
            if codes[-1] == "USER_LOCKED_OUT":
                break
        assert codes[-1] == "USER_LOCKED_OUT" and set(codes[:-1]) == {"INVALID_CREDENTIALS"}, codes
        r = kms.extra.cli("user", "unlock", "--username", "kmsuser")
        assert r.returncode == 0, r.stderr
    # Reset kmsuser in the cluster (as its admin would) and tell the store; connect works again.
    set_cu_password(kms, "kmsuser", KMSUSER_PW)
    client.update_custom_key_store(CustomKeyStoreId=store, KeyStorePassword=KMSUSER_PW)
    client.connect_custom_key_store(CustomKeyStoreId=store)
    assert wait_state(client, store, {"FAILED", "CONNECTED"})["ConnectionState"] == "CONNECTED"
    client.disconnect_custom_key_store(CustomKeyStoreId=store)
    wait_state(client, store, {"DISCONNECTED"})
    if kms.kind == "double":
        assert kms.double is not None
        kms.double.users["kmsuser"].failed = 0
        rotated = kms.double.users["kmsuser"].password
        assert rotated != KMSUSER_PW and len(rotated) == 32  # rotated by the earlier connects
        client.update_custom_key_store(CustomKeyStoreId=store, KeyStorePassword=rotated)
        client.connect_custom_key_store(CustomKeyStoreId=store)
        assert wait_state(client, store, {"FAILED", "CONNECTED"})["ConnectionState"] == "CONNECTED"
        client.disconnect_custom_key_store(CustomKeyStoreId=store)
        wait_state(client, store, {"DISCONNECTED"})
        # kmsuser removed from the cluster: USER_NOT_FOUND
        saved = kms.double.users.pop("kmsuser")
        client.connect_custom_key_store(CustomKeyStoreId=store)
        s = wait_state(client, store, {"FAILED", "CONNECTED"})
        assert s["ConnectionErrorCode"] == "USER_NOT_FOUND"
        client.disconnect_custom_key_store(CustomKeyStoreId=store)
        kms.double.users["kmsuser"] = saved
        saved.failed = 5
        client.connect_custom_key_store(CustomKeyStoreId=store)
        s = wait_state(client, store, {"FAILED", "CONNECTED"})
        assert s["ConnectionErrorCode"] == "USER_LOCKED_OUT"
        client.disconnect_custom_key_store(CustomKeyStoreId=store)
        saved.failed = 0
        saved.external_logins = 1  # another application is logged in as kmsuser
        client.connect_custom_key_store(CustomKeyStoreId=store)
        s = wait_state(client, store, {"FAILED", "CONNECTED"})
        assert s["ConnectionErrorCode"] == "USER_LOGGED_IN"
        client.disconnect_custom_key_store(CustomKeyStoreId=store)
        saved.external_logins = 0
        hsms = list(kms.double.hsms)
        kms.double.hsms = [h.__class__(h.hsm_id, h.az, "DELETED", 0, 0, None) for h in hsms]
        client.connect_custom_key_store(CustomKeyStoreId=store)
        s = wait_state(client, store, {"FAILED", "CONNECTED"})
        assert s["ConnectionErrorCode"] == "INSUFFICIENT_CLOUDHSM_HSMS"
        client.disconnect_custom_key_store(CustomKeyStoreId=store)
        kms.double.hsms = hsms
        real_id = kms.double.cluster_id  # the cluster the store names is gone
        kms.double.cluster_id = "cluster-otherclust234"
        # ConnectCustomKeyStore has no CloudHsmClusterNotFoundException (botocore's model): the
        # connection starts and fails with CLUSTER_NOT_FOUND
        client.connect_custom_key_store(CustomKeyStoreId=store)
        s = wait_state(client, store, {"FAILED", "CONNECTED"})
        assert (s["ConnectionState"], s["ConnectionErrorCode"]) == ("FAILED", "CLUSTER_NOT_FOUND")
        client.disconnect_custom_key_store(CustomKeyStoreId=store)
        kms.double.cluster_id = real_id


def test_cluster_configuration_checks(tmp_path: Any) -> None:
    """Two active HSMs in different AZs for CreateCustomKeyStore and CreateKey; an inactive
    cluster cannot take a store (cluster double: the states are set directly)."""
    from .conftest import start_double, stop_double
    ep = start_double(tmp_path)
    try:
        assert ep.double is not None
        c = ep.client(config=Config(retries={"total_max_attempts": 1}))
        add_cu(ep, "kmsuser", KMSUSER_PW)
        args = dict(CustomKeyStoreName="s", CloudHsmClusterId=ep.cluster_id, TrustAnchorCertificate=ep.ca_pem,
                    KeyStorePassword=KMSUSER_PW)
        hsms = list(ep.double.hsms)
        ep.double.hsms = [h.__class__(h.hsm_id, "us-east-1a", h.state, 0, 0, None) for h in hsms]
        with pytest.raises(ClientError) as exc:
            c.create_custom_key_store(**args)
        assert code(exc) == "CloudHsmClusterInvalidConfigurationException"
        ep.double.state = "UNINITIALIZED"
        with pytest.raises(ClientError) as exc:
            c.create_custom_key_store(**args)
        assert code(exc) == "CloudHsmClusterNotActiveException"
        ep.double.state, ep.double.hsms = "ACTIVE", hsms
        sid = c.create_custom_key_store(**args)["CustomKeyStoreId"]
        c.connect_custom_key_store(CustomKeyStoreId=sid)
        assert wait_state(c, sid, {"CONNECTED", "FAILED"})["ConnectionState"] == "CONNECTED"
        ep.double.hsms = hsms[:1]  # one HSM left: no new keys, existing ones still work
        with pytest.raises(ClientError) as exc:
            c.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=sid)
        assert code(exc) == "CloudHsmClusterInvalidConfigurationException"
        ep.double.hsms = hsms
        key = c.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=sid)["KeyMetadata"]
        ep.double.hsms = hsms[:1]
        blob = c.encrypt(KeyId=key["KeyId"], Plaintext=b"one hsm is enough")["CiphertextBlob"]
        assert c.decrypt(CiphertextBlob=blob)["Plaintext"] == b"one hsm is enough"
    finally:
        stop_double(ep)
