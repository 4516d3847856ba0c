"""HSM lifecycle: adding an HSM clones it (masking key, users, every key) and takes a backup
first; removing one keeps every key available; the daemon reopens the same cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from hsmsim.cluster.backup import list_backups
from hsmsim.cluster.supervisor import ClusterOpError
from hsmsim.pkcs11.constants import Mechanism
from hsmsim.pkcs11.params import GcmParams, MechanismSpec

from .conftest import AES_GEN, Harness, aes_template

GCM = MechanismSpec(int(Mechanism.AES_GCM), GcmParams(iv=b"", aad=b"", tag_bits=128))


def test_add_and_remove_hsm(fresh3: Harness) -> None:
    h = fresh3
    login = h.login()
    keys = [h.call(h.cluster.generate_key(login, AES_GEN, aes_template(label=f"a{i}"), 1))
            for i in range(4)]
    h.wait_converged()
    from hsmsim.control.ops import handlers
    ops = handlers(h.daemon.control_context())
    seen: list[tuple[int, int]] = []

    async def progress(done: int, total: int, label: str) -> None:
        seen.append((done, total))

    added = h.call(ops["hsm.add"]({"az": "us-east-1d"}, progress), timeout=120)
    new_id = added["hsm_id"]
    assert new_id in h.cluster.members and len(h.cluster.spec.hsms) == 4
    assert any(b["reason"] == "hsm add" for b in list_backups(h.state))
    assert seen and seen[-1][0] == seen[-1][1] >= 4
    inv = h.inventories()[new_id]
    assert all(k in inv for k in keys)
    # the new HSM serves requests: take the others out and use the keys
    for hid in h.hsm_ids:
        if hid != new_id:
            h.call(h.sup.partition(hid))
    h.cluster.config = type(h.cluster.config)(**{**h.cluster.config.__dict__,
                                                 "disable_key_availability_check": True})
    assert h.call(h.cluster.encrypt(login, keys[0], GCM, b"x")).data
    for hid in h.hsm_ids:
        if hid != new_id:
            h.call(h.sup.heal(hid))
    h.wait_converged()
    victim = h.hsm_ids[0]
    h.call(ops["hsm.remove"]({"hsm_id": victim}, progress), timeout=120)
    assert victim not in h.cluster.members
    assert not h.state.node_dir(victim).exists()
    assert [x.hsm_id for x in h.cluster.spec.hsms] == h.hsm_ids
    for k in keys:
        assert h.call(h.cluster.encrypt(login, k, GCM, b"x")).data
    with pytest.raises(ClusterOpError, match="no HSM"):
        h.call(h.sup.kill("hsm-doesnotexist"))


def test_daemon_restart_reopens_the_same_cluster(tmp_path: Path) -> None:
    h = Harness(tmp_path / "state")
    try:
        login = h.login()
        key = h.call(h.cluster.generate_key(login, AES_GEN, aes_template(label="persist"), 1))
        cid = h.cluster.spec.cluster_id
        h.wait_converged()
    finally:
        h.close()
    h2 = Harness(tmp_path / "state", new=False)
    try:
        assert h2.cluster.spec.cluster_id == cid
        l2 = h2.login()
        assert h2.call(h2.cluster.find_objects(l2, {}, 1)) == [key]
        k2 = h2.call(h2.cluster.generate_key(l2, AES_GEN, aes_template(), 1))
        assert k2 > key
    finally:
        h2.close()
