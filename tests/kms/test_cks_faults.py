"""Custom-key-store faults caused in a real cluster: the backing key deleted from the HSMs, and
every HSM gone. The KMS answers with the documented KMSInvalidStateException and recovers."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from .conftest import (KMSUSER_PASSWORD, KmsEndpoint, add_cu, advance_clock, connected_store, set_cu_password,
                       start_real)


def _key_reference(ep: KmsEndpoint, arn: str, password: str) -> str:
    r = ep.extra.cli("key", "list", "--user", "kmsuser", "--login-user", "kmsuser",
                     "--login-password", password, "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    refs = [row["key_reference"] for row in rows if row.get("label") == arn]
    assert len(refs) == 1, rows
    return str(refs[0])


def test_backing_key_deleted_in_cluster(kms_real: KmsEndpoint) -> None:
    c = kms_real.client(config=Config(retries={"total_max_attempts": 1}))
    store = connected_store(kms_real, c)
    key = c.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=store)["KeyMetadata"]
    blob = c.encrypt(KeyId=key["KeyId"], Plaintext=b"x")["CiphertextBlob"]
    # The cluster's admin resets kmsuser's password (KMS stays logged in) and deletes the key.
    set_cu_password(kms_real, "kmsuser", KMSUSER_PASSWORD)
    ref = _key_reference(kms_real, key["Arn"], KMSUSER_PASSWORD)
    r = kms_real.extra.cli("key", "delete", ref, "--login-user", "kmsuser", "--login-password", KMSUSER_PASSWORD)
    assert r.returncode == 0, r.stderr
    for call in (lambda: c.encrypt(KeyId=key["KeyId"], Plaintext=b"x"), lambda: c.decrypt(CiphertextBlob=blob)):
        with pytest.raises(ClientError) as exc:
            call()
        assert exc.value.response["Error"]["Code"] == "KMSInvalidStateException"
        assert "key material was not found" in exc.value.response["Error"]["Message"]
    # Deleting a KMS key deletes its key in the cluster when the waiting period ends.
    doomed = c.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=store)["KeyMetadata"]
    _key_reference(kms_real, doomed["Arn"], KMSUSER_PASSWORD)  # present in the HSMs
    c.schedule_key_deletion(KeyId=doomed["KeyId"], PendingWindowInDays=7)
    advance_clock(kms_real, 7 * 86400 + 60)
    r = kms_real.extra.cli("key", "list", "--user", "kmsuser", "--login-user", "kmsuser",
                           "--login-password", KMSUSER_PASSWORD, "--json")
    assert r.returncode == 0 and doomed["Arn"] not in r.stdout
    # Leave the store usable for other tests: tell it the password the admin set.
    c.disconnect_custom_key_store(CustomKeyStoreId=store)
    c.update_custom_key_store(CustomKeyStoreId=store, KeyStorePassword=KMSUSER_PASSWORD)
    c.schedule_key_deletion(KeyId=key["KeyId"], PendingWindowInDays=7)


def test_all_hsms_gone(tmp_path: Any) -> None:
    ep = start_real(tmp_path / "state")
    cluster = ep.extra
    try:
        c = ep.client(config=Config(retries={"total_max_attempts": 1}))
        # No kmsuser in the cluster yet: the connection fails with USER_NOT_FOUND.
        sid = c.create_custom_key_store(CustomKeyStoreName="early", CloudHsmClusterId=ep.cluster_id,
                                        TrustAnchorCertificate=ep.ca_pem, KeyStorePassword=KMSUSER_PASSWORD)["CustomKeyStoreId"]
        c.connect_custom_key_store(CustomKeyStoreId=sid)
        deadline = time.monotonic() + 30
        while (st := c.describe_custom_key_stores(CustomKeyStoreId=sid)["CustomKeyStores"][0])["ConnectionState"] \
                not in ("FAILED", "CONNECTED"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert st["ConnectionState"] == "FAILED" and st["ConnectionErrorCode"] == "USER_NOT_FOUND", st
        add_cu(ep, "kmsuser", KMSUSER_PASSWORD)
        store = connected_store(ep, c)
        assert store == sid
        cks = c.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=store)["KeyMetadata"]
        fleet = c.create_key()["KeyMetadata"]
        fleet_blob = c.encrypt(KeyId=fleet["KeyId"], Plaintext=b"fleet")["CiphertextBlob"]
        deadline = time.monotonic() + 20  # every HSM holds every key before two of them die
        while any(h.get("sync_lag") for h in cluster.status()["hsms"]):
            assert time.monotonic() < deadline, cluster.status()
            time.sleep(0.1)
        for hsm in cluster.hsm_ids[:2]:
            cluster.kill(hsm)
        # One active HSM left: existing keys work, new keys need two AZs.
        assert c.decrypt(CiphertextBlob=c.encrypt(KeyId=cks["KeyId"], Plaintext=b"1")["CiphertextBlob"])["Plaintext"] == b"1"
        with pytest.raises(ClientError) as exc:
            c.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=store)
        assert exc.value.response["Error"]["Code"] == "CloudHsmClusterInvalidConfigurationException"
        cluster.kill(cluster.hsm_ids[2])
        with pytest.raises(ClientError) as exc:
            c.encrypt(KeyId=cks["KeyId"], Plaintext=b"x")
        assert exc.value.response["Error"]["Code"] == "KMSInvalidStateException"
        with pytest.raises(ClientError) as exc:
            c.generate_random(NumberOfBytes=8, CustomKeyStoreId=store)
        assert exc.value.response["Error"]["Code"] == "KMSInvalidStateException"
        # AWS_KMS keys already in use keep working: their material is unsealed in the daemon.
        assert c.decrypt(CiphertextBlob=fleet_blob)["Plaintext"] == b"fleet"
        # Reconnecting without an active HSM fails with INSUFFICIENT_CLOUDHSM_HSMS.
        c.disconnect_custom_key_store(CustomKeyStoreId=store)
        c.connect_custom_key_store(CustomKeyStoreId=store)
        deadline = time.monotonic() + 30
        while (st := c.describe_custom_key_stores(CustomKeyStoreId=store)["CustomKeyStores"][0])["ConnectionState"] \
                not in ("FAILED", "CONNECTED"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert st.get("ConnectionErrorCode") == "INSUFFICIENT_CLOUDHSM_HSMS", st
        c.disconnect_custom_key_store(CustomKeyStoreId=store)
        for hsm in cluster.hsm_ids:
            cluster.start(hsm)
        assert connected_store(ep, c) == store
        deadline = time.monotonic() + 30
        while True:
            try:
                out = c.encrypt(KeyId=cks["KeyId"], Plaintext=b"back")
                break
            except ClientError:
                assert time.monotonic() < deadline, "custom key store key did not come back"
                time.sleep(0.2)
        assert c.decrypt(CiphertextBlob=out["CiphertextBlob"])["Plaintext"] == b"back"
    finally:
        cluster.down()
