"""A daemon kill -9 between calls loses no acknowledged key, alias, grant, rotation or custom
key store; the store reconnects by itself after the restart and old ciphertexts decrypt."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from .conftest import KmsEndpoint, connected_store, start_real


def _wait_dead(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"daemon {pid} did not die")


def test_kill_9_loses_nothing_acknowledged(tmp_path: Path) -> None:
    ep: KmsEndpoint = start_real(tmp_path / "state")
    cluster = ep.extra
    try:
        c: Any = ep.client()
        store = connected_store(ep, c)
        keys, blobs, grants = [], [], []
        for i in range(3):
            k = c.create_key(Description=f"k{i}")["KeyMetadata"]
            c.create_alias(AliasName=f"alias/persist-{i}", TargetKeyId=k["KeyId"])
            grants.append(c.create_grant(KeyId=k["KeyId"], GranteePrincipal="arn:aws:iam::111122223333:role/r",
                                         Operations=["Decrypt"])["GrantId"])
            blobs.append(c.encrypt(KeyId=f"alias/persist-{i}", Plaintext=b"p%d" % i)["CiphertextBlob"])
            keys.append(k)
        c.rotate_key_on_demand(KeyId=keys[0]["KeyId"])
        c.schedule_key_deletion(KeyId=keys[2]["KeyId"], PendingWindowInDays=9)
        cks = c.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=store)["KeyMetadata"]
        cks_blob = c.encrypt(KeyId=cks["KeyId"], Plaintext=b"in the hsm")["CiphertextBlob"]
        pid = cluster.daemon_pid
        assert pid
        os.kill(pid, signal.SIGKILL)
        _wait_dead(pid)
        cluster.up()
        c = ep.client()
        for i, k in enumerate(keys):
            md = c.describe_key(KeyId=f"alias/persist-{i}")["KeyMetadata"]
            assert md["KeyId"] == k["KeyId"]
            assert [g["GrantId"] for g in c.list_grants(KeyId=k["KeyId"])["Grants"]] == [grants[i]]
        assert c.describe_key(KeyId=keys[2]["KeyId"])["KeyMetadata"]["KeyState"] == "PendingDeletion"
        assert len(c.list_key_rotations(KeyId=keys[0]["KeyId"])["Rotations"]) == 1
        for i in range(2):
            assert c.decrypt(CiphertextBlob=blobs[i])["Plaintext"] == b"p%d" % i
        deadline = time.monotonic() + 30
        while c.describe_custom_key_stores(CustomKeyStoreId=store)["CustomKeyStores"][0]["ConnectionState"] != "CONNECTED":
            assert time.monotonic() < deadline, "store did not reconnect after restart"
            time.sleep(0.05)
        assert c.decrypt(CiphertextBlob=cks_blob)["Plaintext"] == b"in the hsm"
        assert c.describe_key(KeyId=cks["KeyId"])["KeyMetadata"]["KeyState"] == "Enabled"
    finally:
        cluster.down()
