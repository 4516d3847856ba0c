"""Backups: a consistent, encrypted snapshot; restore into a new cluster directory where the
same keys (same handles) work; tampering is detected."""

from __future__ import annotations

from pathlib import Path

import pytest

from hsmsim.cluster.backup import BackupError, create_backup, list_backups, read_backup
from hsmsim.pkcs11.constants import Attribute, Mechanism
from hsmsim.pkcs11.params import GcmParams, MechanismSpec

from .conftest import AES_GEN, Harness, aes_template


def test_backup_then_restore_into_a_new_cluster(cluster3: Harness, tmp_path: Path) -> None:
    h = cluster3
    login = h.login()
    key = h.call(h.cluster.generate_key(login, AES_GEN, aes_template(label="backed-up"), 1))
    ct = h.call(h.cluster.encrypt(login, key, MechanismSpec(int(Mechanism.AES_GCM), GcmParams(
        iv=b"", aad=b"", tag_bits=128)), b"secret data"))
    h.wait_converged()
    meta = h.call(create_backup(h.cluster, h.state, reason="test", progress=None))
    assert meta["objects"] >= 1
    assert any(b["backup_id"] == meta["backup_id"] for b in list_backups(h.state))
    raw = (h.state.backups / f"{meta['backup_id']}.bak").read_bytes()
    assert b"backed-up" not in raw  # encrypted at rest

    target = tmp_path / "restored"
    from hsmsim.cluster.backup import restore_backup
    r = h.call(restore_backup(h.cluster, h.state, meta["backup_id"], str(target), None),
               timeout=120)
    assert r["cluster_id"] != h.cluster.spec.cluster_id
    h2 = Harness(target, new=False)
    try:
        l2 = h2.login()
        found = h2.call(h2.cluster.find_objects(l2, {int(Attribute.LABEL): "backed-up"}, 1))
        assert found == [key]  # same handle in the restored cluster
        dec = MechanismSpec(int(Mechanism.AES_GCM), GcmParams(iv=ct.iv or b"", aad=b"",
                                                                tag_bits=128))
        assert h2.call(h2.cluster.decrypt(l2, key, dec, ct.data)) == b"secret data"
        k2 = h2.call(h2.cluster.generate_key(l2, AES_GEN, aes_template(), 1))
        assert k2 > key
    finally:
        h2.close()
    h.call(h.cluster.logout(login))


def test_tampered_or_unknown_backup_is_refused(cluster3: Harness) -> None:
    h = cluster3
    meta = h.call(create_backup(h.cluster, h.state, reason="test", progress=None))
    path = h.state.backups / f"{meta['backup_id']}.bak"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(BackupError, match="tampered"):
        read_backup(h.state, meta["backup_id"])
    with pytest.raises(BackupError, match="no backup"):
        read_backup(h.state, "backup-aaaaaaaaaaa")
    with pytest.raises(BackupError, match="not a backup id"):
        read_backup(h.state, "../../etc/passwd")


def test_retention_never_deletes_the_last_backup(tmp_path: Path) -> None:
    import json
    from hsmsim.cluster.backup import expire_backups
    from hsmsim.cluster.state import StateDir
    state = StateDir(tmp_path)
    state.backups.mkdir()
    for i, created in enumerate(["2020-01-01T00:00:00Z", "2020-02-01T00:00:00Z",
                                 "2999-01-01T00:00:00Z"]):
        bid = f"backup-aaaaaaaaaa{i}"
        (state.backups / f"{bid}.json").write_text(json.dumps({"backup_id": bid,
                                                                "created": created}))
        (state.backups / f"{bid}.bak").write_bytes(b"x")
    assert expire_backups(state, 90) == ["backup-aaaaaaaaaa0", "backup-aaaaaaaaaa1"]
    assert [b["backup_id"] for b in list_backups(state)] == ["backup-aaaaaaaaaa2"]
    (state.backups / "backup-aaaaaaaaaa2.json").write_text(json.dumps(
        {"backup_id": "backup-aaaaaaaaaa2", "created": "2000-01-01T00:00:00Z"}))
    assert expire_backups(state, 90) == []  # the last backup stays
