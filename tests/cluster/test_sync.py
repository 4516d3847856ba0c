"""Key sync through the cluster: token objects on every HSM with the same handle and
attributes, session objects on one HSM only, deletions with tombstones, routing and errors."""

from __future__ import annotations

import time

import pytest

from hsmsim.pkcs11.constants import RV, Attribute, Mechanism, UserType
from hsmsim.pkcs11.errors import Pkcs11Error
from hsmsim.pkcs11.params import GcmParams, MechanismSpec

from .conftest import AES_GEN, Harness, aes_template

GCM = MechanismSpec(int(Mechanism.AES_GCM), GcmParams(iv=b"", aad=b"aad", tag_bits=128))


def _wait_on_all(h: Harness, handle: int, timeout: float = 10.0) -> dict[str, bytes]:
    deadline = time.monotonic() + timeout
    fps: dict[str, bytes] = {}
    while time.monotonic() < deadline:
        invs = h.inventories()
        fps = {hid: inv[handle] for hid, inv in invs.items() if handle in inv}
        if len(fps) == len(h.hsm_ids):
            return fps
        time.sleep(0.05)
    raise AssertionError(f"handle {handle} is on {sorted(fps)} only")


def test_token_key_is_on_every_hsm_with_the_same_handle_and_attributes(cluster3: Harness) -> None:
    h = cluster3
    login = h.login()
    handle = h.call(h.cluster.generate_key(login, AES_GEN, aes_template(label="sync-1"), 1))
    # acknowledged => at least 2 HSMs hold it right now
    holders = h.cluster.directory.holders(handle)
    assert len(holders) >= 2
    fps = _wait_on_all(h, handle)
    assert len(set(fps.values())) == 1, "fingerprints differ between HSMs"
    # usable from every HSM: encrypt, then decrypt repeatedly (round-robin spreads the calls)
    ct = h.call(h.cluster.encrypt(login, handle, GCM, b"hello cluster"))
    assert ct.iv is not None and len(ct.iv) == 12
    dec = MechanismSpec(int(Mechanism.AES_GCM), GcmParams(iv=ct.iv, aad=b"aad", tag_bits=128))
    for _ in range(6):
        assert h.call(h.cluster.decrypt(login, handle, dec, ct.data)) == b"hello cluster"
    label = h.call(h.cluster.get_attributes(login, handle, [int(Attribute.LABEL)]))
    assert label[0].value == "sync-1"
    h.call(h.cluster.logout(login))


def test_a_new_token_key_is_found_at_once(cluster3: Harness) -> None:
    """The copy to the third HSM is asynchronous; a search right after the acknowledgement
    must still find the key, whichever HSM round-robin would pick."""
    h = cluster3
    login = h.login()

    async def create_then_find(i: int) -> tuple[int, list[int]]:
        label = f"found-at-once-{i}"
        handle = await h.cluster.generate_key(login, AES_GEN, aes_template(label=label), 1)
        return handle, await h.cluster.find_objects(login, {int(Attribute.LABEL): label}, 1)

    for i in range(6):
        handle, found = h.call(create_then_find(i))
        assert found == [handle], f"round {i}: key {handle} not found right after its creation"
    h.call(h.cluster.logout(login))


def test_session_key_lives_on_one_hsm_only(cluster3: Harness) -> None:
    h = cluster3
    login = h.login()
    handle = h.call(h.cluster.generate_key(login, AES_GEN, aes_template(token=False), 7))
    assert len(h.cluster.directory.holders(handle)) == 1
    for inv in h.inventories().values():
        assert handle not in inv
    assert handle in h.call(h.cluster.find_objects(login, {}, 7))
    h.call(h.cluster.close_session(login, 7))
    with pytest.raises(Pkcs11Error) as e:
        h.call(h.cluster.encrypt(login, handle, GCM, b"x"))
    assert e.value.rv == RV.KEY_HANDLE_INVALID
    h.call(h.cluster.logout(login))


def test_destroy_replicates_and_tombstones(cluster3: Harness) -> None:
    h = cluster3
    login = h.login()
    handle = h.call(h.cluster.generate_key(login, AES_GEN, aes_template(label="doomed"), 1))
    _wait_on_all(h, handle)
    h.call(h.cluster.destroy_object(login, handle))
    assert h.cluster.directory.is_tombstoned(handle)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if all(handle not in inv for inv in h.inventories().values()):
            break
        time.sleep(0.05)
    else:
        raise AssertionError("destroyed key still on some HSM")
    with pytest.raises(Pkcs11Error) as e:
        h.call(h.cluster.destroy_object(login, handle))
    assert e.value.rv == RV.OBJECT_HANDLE_INVALID
    assert handle not in h.call(h.cluster.find_objects(login, {int(Attribute.LABEL): "doomed"}, 1))
    h.call(h.cluster.logout(login))


def test_handles_are_never_reused(cluster3: Harness) -> None:
    h = cluster3
    login = h.login()
    a = h.call(h.cluster.generate_key(login, AES_GEN, aes_template(token=False), 3))
    h.call(h.cluster.destroy_object(login, a))
    b = h.call(h.cluster.generate_key(login, AES_GEN, aes_template(token=False), 3))
    assert b > a
    h.call(h.cluster.close_session(login, 3))
    h.call(h.cluster.logout(login))


def test_bad_input_gets_precise_errors_and_changes_nothing(cluster3: Harness) -> None:
    h = cluster3
    with pytest.raises(Pkcs11Error) as e:
        h.login(password="wrong-password")
    assert e.value.rv == RV.PIN_INCORRECT
    login = h.login()
    before = {hid: dict(inv) for hid, inv in h.inventories().items()}
    with pytest.raises(Pkcs11Error) as e:
        h.call(h.cluster.encrypt(login, 0x7FFF_FFFF_FFFF, GCM, b"x"))
    assert e.value.rv == RV.KEY_HANDLE_INVALID
    with pytest.raises(Pkcs11Error) as e:
        h.call(h.cluster.get_attributes(login, 0x7FFF_FFFF_FFFF, [int(Attribute.LABEL)]))
    assert e.value.rv == RV.OBJECT_HANDLE_INVALID
    with pytest.raises(Pkcs11Error):  # AES key of 7 bytes
        bad = aes_template()
        bad[int(Attribute.VALUE_LEN)] = 7
        h.call(h.cluster.generate_key(login, AES_GEN, bad, 1))
    assert {hid: dict(inv) for hid, inv in h.inventories().items()} == before
    h.call(h.cluster.logout(login))
    with pytest.raises(Pkcs11Error) as e:
        h.call(h.cluster.encrypt(login, 1, GCM, b"x"))
    assert e.value.rv == RV.USER_NOT_LOGGED_IN


def test_users_sync_to_every_hsm(cluster3: Harness) -> None:
    h = cluster3
    co = h.login("admin", "admin-password-1", UserType.SO)
    h.call(h.cluster.create_user(co, "alice", "crypto-user", "alice-password"))
    users = h.call(h.cluster.list_users_cluster())
    alice = [u for u in users if u["username"] == "alice"]
    assert alice and alice[0]["cluster-coverage"] == "full"
    a = h.login("alice", "alice-password")
    h.call(h.cluster.logout(a))
    h.call(h.cluster.delete_user(co, "alice"))
    assert not [u for u in h.call(h.cluster.list_users_cluster()) if u["username"] == "alice"]
    h.call(h.cluster.logout(co))


def test_sharing_and_attribute_changes_reach_every_hsm(cluster3: Harness) -> None:
    h = cluster3
    co = h.login("admin", "admin-password-1", UserType.SO)
    h.call(h.cluster.create_user(co, "grace", "crypto-user", "grace-password"))
    login = h.login()
    handle = h.call(h.cluster.generate_key(login, AES_GEN, aes_template(label="shared"), 1))
    before = _wait_on_all(h, handle)
    h.call(h.cluster.share_key(login, handle, "grace"))
    h.call(h.cluster.set_attributes(login, handle, {int(Attribute.LABEL): "renamed"}))
    after = _wait_on_all(h, handle)
    assert len(set(after.values())) == 1 and set(after.values()) != set(before.values())
    g = h.login("grace", "grace-password")
    # grace may use the key on any HSM, but not delete it (CloudHSM sharing rules)
    for _ in range(3):
        assert h.call(h.cluster.encrypt(g, handle, GCM, b"x")).data
    with pytest.raises(Pkcs11Error):
        h.call(h.cluster.destroy_object(g, handle))
    assert h.call(h.cluster.get_attributes(g, handle, [int(Attribute.LABEL)]))[0].value == "renamed"
    h.call(h.cluster.unshare_key(login, handle, "grace"))
    with pytest.raises(Pkcs11Error):
        h.call(h.cluster.encrypt(g, handle, GCM, b"x"))
    for lg in (g, login, co):
        h.call(h.cluster.logout(lg))
