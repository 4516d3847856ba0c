"""Failover and reconciliation with real node faults: a crashed node is restarted and caught
up, a partitioned or paused node is routed around and reconciled (missing keys copied,
deleted keys removed), session objects die with their node."""

from __future__ import annotations

import time

import pytest

from hsmsim.pkcs11.constants import RV, Mechanism
from hsmsim.pkcs11.errors import Pkcs11Error
from hsmsim.pkcs11.params import GcmParams, MechanismSpec

from .conftest import AES_GEN, Harness, aes_template

GCM = MechanismSpec(int(Mechanism.AES_GCM), GcmParams(iv=b"", aad=b"", tag_bits=128))


def _roundtrip(h: Harness, login: object, handle: int) -> None:
    ct = h.call(h.cluster.encrypt(login, handle, GCM, b"payload"))  # type: ignore[arg-type]
    dec = MechanismSpec(int(Mechanism.AES_GCM), GcmParams(iv=ct.iv or b"", aad=b"", tag_bits=128))
    assert h.call(h.cluster.decrypt(login, handle, dec, ct.data)) == b"payload"  # type: ignore[arg-type]


def test_partitioned_node_catches_up_and_applies_tombstones(fresh3: Harness) -> None:
    h = fresh3
    login = h.login()
    doomed = h.call(h.cluster.generate_key(login, AES_GEN, aes_template(label="old"), 1))
    h.wait_converged()
    victim = h.hsm_ids[2]
    h.call(h.sup.partition(victim))
    new = [h.call(h.cluster.generate_key(login, AES_GEN, aes_template(label=f"n{i}"), 1))
           for i in range(5)]
    h.call(h.cluster.destroy_object(login, doomed))
    for k in new:
        _roundtrip(h, login, k)
        assert victim not in h.cluster.directory.holders(k)
    st = {m.hsm_id: h.cluster.sync_lag(m) for m in h.cluster.members.values()}
    assert st[victim] == 5
    h.call(h.sup.heal(victim))
    h.wait_converged(30)
    inv = h.inventories()[victim]
    assert all(k in inv for k in new)
    assert doomed not in inv
    h.call(h.cluster.logout(login))


def test_crashed_node_is_restarted_and_session_objects_die_with_it(fresh3: Harness) -> None:
    h = fresh3
    login = h.login()
    token = h.call(h.cluster.generate_key(login, AES_GEN, aes_template(), 1))
    sess = h.call(h.cluster.generate_key(login, AES_GEN, aes_template(token=False), 9))
    home = next(iter(h.cluster.directory.holders(sess)))
    restarts = h.cluster.members[home].restarts
    h.crash(home)
    # operations on the token key keep working while the node is down
    for _ in range(5):
        _roundtrip(h, login, token)
    deadline = time.monotonic() + 30
    while h.cluster.members[home].restarts == restarts or not h.cluster.members[home].usable:
        assert time.monotonic() < deadline, "crashed node was not restarted"
        time.sleep(0.05)
    h.wait_converged(30)
    with pytest.raises(Pkcs11Error) as e:
        h.call(h.cluster.encrypt(login, sess, GCM, b"x"))
    assert e.value.rv == RV.KEY_HANDLE_INVALID
    _roundtrip(h, login, token)
    h.call(h.cluster.logout(login))


def test_paused_node_does_not_block_the_others(fresh3: Harness) -> None:
    h = fresh3
    login = h.login()
    keys = [h.call(h.cluster.generate_key(login, AES_GEN, aes_template(), 1)) for _ in range(3)]
    h.wait_converged()
    victim = h.hsm_ids[0]
    h.call(h.sup.pause(victim))
    try:
        # every operation completes (routed to the two others) and new keys are acknowledged
        for k in keys:
            _roundtrip(h, login, k)
        k2 = h.call(h.cluster.generate_key(login, AES_GEN, aes_template(), 1))
        assert victim not in h.cluster.directory.holders(k2)
        assert len(h.cluster.directory.holders(k2)) >= 2
    finally:
        h.call(h.sup.resume(victim))
    h.wait_converged(30)
    assert k2 in h.inventories()[victim]
    h.call(h.cluster.logout(login))


def test_pause_detected_by_health_check_when_paused_behind_our_back(fresh3: Harness) -> None:
    import os
    import signal
    h = fresh3
    login = h.login()
    key = h.call(h.cluster.generate_key(login, AES_GEN, aes_template(), 1))
    h.wait_converged()
    victim = h.cluster.members[h.hsm_ids[1]]
    assert victim.pid is not None
    os.kill(victim.pid, signal.SIGSTOP)
    try:
        for _ in range(6):  # some land on the frozen node first and fail over
            _roundtrip(h, login, key)
    finally:
        os.kill(victim.pid, signal.SIGCONT)
    h.wait_converged(30)
    h.call(h.cluster.logout(login))


def test_throttled_node_is_retried_with_backoff(fresh3: Harness) -> None:
    h = fresh3
    login = h.login()
    key = h.call(h.cluster.generate_key(login, AES_GEN, aes_template(), 1))
    h.wait_converged()
    for hid in h.hsm_ids:
        h.call(h.sup.set_fault(hid, throttle_rps=1))
    try:
        errors = 0
        for _ in range(8):
            try:
                _roundtrip(h, login, key)
            except Pkcs11Error as exc:
                assert exc.rv == RV.FUNCTION_FAILED  # CloudHSM's busy error after 3 retries
                errors += 1
        assert errors < 8
    finally:
        for hid in h.hsm_ids:
            h.call(h.sup.set_fault(hid, throttle_rps=0))
    h.call(h.cluster.logout(login))


def test_user_changes_reach_a_node_that_was_away(fresh3: Harness) -> None:
    from hsmsim.pkcs11.constants import UserType
    h = fresh3
    co = h.login("admin", "admin-password-1", UserType.SO)
    h.call(h.cluster.create_user(co, "dave", "crypto-user", "dave-password"))
    h.call(h.cluster.create_user(co, "erin", "crypto-user", "erin-password"))
    victim = h.hsm_ids[1]
    h.call(h.sup.partition(victim))
    h.call(h.cluster.delete_user(co, "dave"))
    h.call(h.cluster.change_password(co, "erin", "erin-new-password"))
    h.call(h.cluster.create_user(co, "frank", "crypto-user", "frank-password"))
    users = {u["username"]: u for u in h.call(h.cluster.list_users_cluster())}
    assert "dave" not in users and users["frank"]["cluster-coverage"] == "full"
    h.call(h.sup.heal(victim))
    h.wait_converged(30)
    m = h.cluster.members[victim]
    names = {u.username for u in h.call(m.client.list_users(None))}  # type: ignore[union-attr]
    assert "frank" in names and "dave" not in names
    # erin's new password works on the returning HSM
    info = h.call(m.client.login(UserType.USER, "erin", "erin-new-password"))  # type: ignore[union-attr]
    assert info.login_id
    h.call(h.cluster.logout(co))


def test_one_call_path_answers_and_fails_over_from_a_frozen_node(fresh3: Harness) -> None:
    """The daemon's single awaiting path (no fast path beside it, issue 12): an HSM's own
    answer (a wrong tag) is not retried elsewhere; a frozen HSM is marked down and the call
    completes on another."""
    import os
    import signal

    h = fresh3
    login = h.login()
    key = h.call(h.cluster.generate_key(login, AES_GEN, aes_template(), 1))
    _roundtrip(h, login, key)
    h.wait_converged()
    ct = h.call(h.cluster.encrypt(login, key, GCM, b"one path"))
    dec = MechanismSpec(int(Mechanism.AES_GCM), GcmParams(iv=ct.iv or b"", aad=b"", tag_bits=128))
    assert h.call(h.cluster.decrypt(login, key, dec, ct.data)) == b"one path"
    with pytest.raises(Pkcs11Error) as e:
        h.call(h.cluster.decrypt(login, key, dec, b"\x00" * len(ct.data)))
    assert e.value.rv == RV.ENCRYPTED_DATA_INVALID
    assert all(m.usable for m in h.cluster.members.values())
    victim = h.cluster.members[h.hsm_ids[0]]
    assert victim.pid is not None
    os.kill(victim.pid, signal.SIGSTOP)
    try:
        for _ in range(4):  # round-robin reaches the frozen HSM within three calls
            assert h.call(h.cluster.encrypt(login, key, GCM, b"x")).data
        assert not victim.usable
    finally:
        os.kill(victim.pid, signal.SIGCONT)
    h.wait_converged(30)
    h.call(h.cluster.logout(login))
