"""User records converge across HSMs (issue 14 defect 2): a credential changed while some HSMs
were down reaches them when they return (the newest record wins, by the version the cluster
keeps with each user), and a login never silently fails on some HSMs while succeeding on
others. Real daemon (`hsmsim up`), real nodes and SoftHSM2 tokens, KMS through boto3."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from hsmsim.pkcs11.constants import UserType
from hsmsim.pkcs11.errors import Pkcs11Error
from tests.kms.conftest import KMSUSER_PASSWORD, start_real

from .conftest import Harness


def _store(client: Any, sid: str) -> dict[str, Any]:
    return dict(client.describe_custom_key_stores(CustomKeyStoreId=sid)["CustomKeyStores"][0])


def _settle(client: Any, sid: str, timeout: float = 90.0) -> dict[str, Any]:
    """The store once it is no longer CONNECTING (or DISCONNECTING)."""
    deadline = time.monotonic() + timeout
    s = _store(client, sid)
    while time.monotonic() < deadline:
        s = _store(client, sid)
        if s["ConnectionState"] not in ("CONNECTING", "DISCONNECTING"):
            return s
        time.sleep(0.1)
    raise AssertionError(f"store stuck in {s['ConnectionState']}")


def _connect(client: Any, sid: str) -> dict[str, Any]:
    client.connect_custom_key_store(CustomKeyStoreId=sid)
    return _settle(client, sid)


def _disconnect(client: Any, sid: str) -> dict[str, Any]:
    client.disconnect_custom_key_store(CustomKeyStoreId=sid)
    return _settle(client, sid)


def _kmsuser_failures(cluster: Any) -> Counter[str]:
    """Failed kmsuser logins recorded in each HSM's audit log."""
    recs = cluster.control("audit.read", since={}, limit=10_000)
    return Counter(r["hsm_id"] for r in recs
                   if r["event"] == "login_failed" and r.get("username") == "kmsuser")


def _kmsuser_row(cluster: Any) -> dict[str, Any]:
    return next(dict(u) for u in cluster.control("user.list") if u["username"] == "kmsuser")


def _same_version(cluster: Any, row: dict[str, Any]) -> bool:
    versions = row.get("versions") or {}
    return row["cluster-coverage"] == "full" and len(versions) == len(cluster.hsm_ids) \
        and len(set(versions.values())) == 1


def _wait_users_converged(cluster: Any, timeout: float = 30.0) -> dict[str, Any]:
    """kmsuser's row of `user list` once every HSM holds the same version of its record (or
    as it is when `timeout` runs out: the caller asserts)."""
    deadline = time.monotonic() + timeout
    cluster.wait_converged(timeout=60)
    row = _kmsuser_row(cluster)
    while time.monotonic() < deadline and not _same_version(cluster, row):
        time.sleep(0.2)
        row = _kmsuser_row(cluster)
    return row


def test_kmsuser_rotated_on_one_survivor_converges_and_never_locks_out(tmp_path: Path) -> None:
    ep = start_real(tmp_path / "state")
    cluster = ep.extra
    try:
        hsm1, hsm2, hsm3 = cluster.hsm_ids
        kms = ep.client()
        r = cluster.cli("user", "create", "--username", "kmsuser", "--role", "crypto-user",
                        "--password", KMSUSER_PASSWORD)
        assert r.returncode == 0, r.stderr
        sid = kms.create_custom_key_store(
            CustomKeyStoreName="convergence", CloudHsmClusterId=ep.cluster_id,
            TrustAnchorCertificate=ep.ca_pem, KeyStorePassword=KMSUSER_PASSWORD)["CustomKeyStoreId"]
        assert _connect(kms, sid)["ConnectionState"] == "CONNECTED"
        key_id = kms.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=sid)["KeyMetadata"]["KeyId"]
        assert _disconnect(kms, sid)["ConnectionState"] == "DISCONNECTED"

        # The scenario: two HSMs down, connect (kmsuser's password rotates on hsm1 only).
        cluster.kill(hsm2)
        cluster.kill(hsm3)
        s = _connect(kms, sid)
        print(f"\nconnect with {hsm1} alone: {s['ConnectionState']}")
        assert s["ConnectionState"] == "CONNECTED", s
        assert _disconnect(kms, sid)["ConnectionState"] == "DISCONNECTED"
        cluster.kill(hsm1)
        # The two HSMs with the older record come back first.
        cluster.start(hsm2)
        cluster.start(hsm3)
        cluster.wait_converged(timeout=60)
        cluster.start(hsm1)
        row = _wait_users_converged(cluster)
        print(f"after the HSMs returned: kmsuser {row}")
        converged_on_return = _same_version(cluster, row)
        before = _kmsuser_failures(cluster)
        print(f"failed kmsuser logins before the reconnects: {dict(before)}")

        for i in (1, 2):
            s = _connect(kms, sid)
            print(f"reconnect {i}: {s['ConnectionState']} {s.get('ConnectionErrorCode', '')}")
            assert s["ConnectionState"] == "CONNECTED", s
            assert _disconnect(kms, sid)["ConnectionState"] == "DISCONNECTED"
        row2 = _wait_users_converged(cluster, timeout=5)
        after_reconnects = _kmsuser_failures(cluster)
        print(f"after two reconnects: kmsuser {row2}; failed kmsuser logins per HSM: "
              f"{dict(after_reconnects)}")

        # A daemon restart: the store connects and its key works.
        s = _connect(kms, sid)
        assert s["ConnectionState"] == "CONNECTED", s
        cluster.down()
        cluster.up()
        s = _settle(kms, sid)
        print(f"after a daemon restart: {s['ConnectionState']} {s.get('ConnectionErrorCode', '')}")
        if s["ConnectionState"] != "CONNECTED":
            if s["ConnectionState"] == "FAILED":
                _disconnect(kms, sid)
            s = _connect(kms, sid)
            print(f"connect after the restart: {s['ConnectionState']} "
                  f"{s.get('ConnectionErrorCode', '')}")
        meta = kms.describe_key(KeyId=key_id)["KeyMetadata"]
        print(f"key {key_id}: {meta['KeyState']}")
        assert s["ConnectionState"] == "CONNECTED", s
        assert meta["KeyState"] == "Enabled"
        ct = kms.encrypt(KeyId=key_id, Plaintext=b"converged")["CiphertextBlob"]
        assert kms.decrypt(CiphertextBlob=ct)["Plaintext"] == b"converged"
        failures = _kmsuser_failures(cluster)
        print(f"after the restart: failed kmsuser logins per HSM: {dict(failures)}")
        assert failures == Counter(), failures
        assert converged_on_return, row
        assert _same_version(cluster, row2), row2  # a password change leaves one version
        assert row["locked"] == row2["locked"] == "false"
        assert before == after_reconnects == Counter()
    finally:
        cluster.down()


def _node_versions(h: Harness, username: str) -> dict[str, int]:
    async def versions() -> dict[str, int]:
        out = {}
        for x in h.cluster.members.values():
            assert x.client is not None
            out[x.hsm_id] = next(u.version for u in await x.client.list_users(None)
                                 if u.username == username)
        return out
    return h.call(versions())


def _login_everywhere(h: Harness, username: str, password: str) -> None:
    """A login on each HSM directly (not through the cluster)."""
    for x in h.cluster.members.values():
        assert x.client is not None
        info = h.call(x.client.login(UserType.USER, username, password))
        h.call(x.client.logout(info.login_id))


def test_password_changed_while_an_hsm_is_down_reaches_it(fresh3: Harness) -> None:
    """The HSM that missed a password change had counted failed logins meanwhile: its own
    failure count must not make its stale credential look newer."""
    h = fresh3
    c = h.cluster
    admin = h.login("admin", "admin-password-1", UserType.SO)
    h.call(c.create_user(admin, "alice", "crypto-user", "alice-password-1"))
    down = h.hsm_ids[2]
    m = c.members[down]
    for _ in range(2):  # two failed logins on that HSM only (per-node counts)
        with pytest.raises(Pkcs11Error):
            h.call(m.client.login(UserType.USER, "alice", "wrong-password"))  # type: ignore[union-attr]
    h.call(h.sup.kill(down))
    h.call(c.change_password(admin, "alice", "alice-password-2"))
    h.call(h.sup.start_hsm(down))
    h.wait_converged()
    _login_everywhere(h, "alice", "alice-password-2")
    versions = _node_versions(h, "alice")
    assert len(set(versions.values())) == 1, versions


def test_newer_record_on_the_last_hsm_back_reaches_the_others(fresh3: Harness) -> None:
    """The survivor changed the password alone, then the other two came back first."""
    h = fresh3
    c = h.cluster
    admin = h.login("admin", "admin-password-1", UserType.SO)
    h.call(c.create_user(admin, "bob", "crypto-user", "bob-password-1"))
    first, a, b = h.hsm_ids
    h.call(h.sup.kill(a))
    h.call(h.sup.kill(b))
    h.call(c.change_password(admin, "bob", "bob-password-2"))
    h.call(c.logout(admin))
    h.call(h.sup.kill(first))
    h.call(h.sup.start_hsm(a))
    h.call(h.sup.start_hsm(b))
    h.call(h.sup.start_hsm(first))
    h.wait_converged()
    _login_everywhere(h, "bob", "bob-password-2")
    versions = _node_versions(h, "bob")
    assert len(set(versions.values())) == 1, versions
    # and the cluster login reports no HSM refusing it
    login = h.login("bob", "bob-password-2")
    assert all(login.login_id in x.logins for x in c.members.values())


def test_login_converges_a_divergent_user_first(fresh3: Harness, caplog: pytest.LogCaptureFixture) -> None:
    """A record that differs when an application logs in (here: changed on one HSM behind the
    daemon's back, as by an HSM that missed the change and is not reconciled yet) is converged
    before the password is tried: no HSM counts a failed login, and the daemon says so."""
    h = fresh3
    c = h.cluster
    admin = h.login("admin", "admin-password-1", UserType.SO)
    h.call(c.create_user(admin, "carol", "crypto-user", "carol-password-1"))
    one = c.members[h.hsm_ids[1]]
    assert one.client is not None

    async def change_on_one() -> None:
        assert one.client is not None
        info = await one.client.login(UserType.SO, "admin", "admin-password-1")
        await one.client.change_password(info.login_id, "carol", "carol-password-2")
        await one.client.logout(info.login_id)
    h.call(change_on_one())
    caplog.set_level("INFO", logger="hsmsim")
    login = h.login("carol", "carol-password-2")
    assert all(login.login_id in x.logins for x in c.members.values())
    assert "user carol differs across HSMs" in caplog.text

    async def failures() -> dict[str, int]:
        out = {}
        for x in c.members.values():
            assert x.client is not None
            recs = await x.client.audit_read(0, 10000)
            out[x.hsm_id] = sum(1 for r in recs if r.event == "login_failed"
                                and r.fields.get("username") == "carol")
        return out
    assert set(h.call(failures()).values()) == {0}
    versions = _node_versions(h, "carol")
    assert len(set(versions.values())) == 1, versions
