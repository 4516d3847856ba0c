"""CloudHSM's key availability check (reference §2.2): a token key must be on 2 HSMs; a
1-HSM cluster cannot create or use token keys unless the check is disabled."""

from __future__ import annotations

from pathlib import Path

import pytest

from hsmsim.pkcs11.constants import RV, Mechanism
from hsmsim.pkcs11.errors import Pkcs11Error
from hsmsim.pkcs11.params import GcmParams, MechanismSpec

from .conftest import AES_GEN, Harness, aes_template

GCM = MechanismSpec(int(Mechanism.AES_GCM), GcmParams(iv=b"", aad=b"", tag_bits=128))


def test_one_hsm_cluster_refuses_token_keys_but_allows_session_keys(tmp_path: Path) -> None:
    h = Harness(tmp_path / "one", azs=1)
    try:
        login = h.login()
        with pytest.raises(Pkcs11Error) as e:
            h.call(h.cluster.generate_key(login, AES_GEN, aes_template(), 1))
        assert e.value.rv == RV.FUNCTION_FAILED
        assert "at least 2 HSMs" in str(e.value)
        assert h.inventories()[h.hsm_ids[0]] == {}
        s = h.call(h.cluster.generate_key(login, AES_GEN, aes_template(token=False), 1))
        assert h.call(h.cluster.encrypt(login, s, GCM, b"x")).data
    finally:
        h.close()


def test_one_hsm_cluster_with_check_disabled_creates_token_keys(tmp_path: Path) -> None:
    h = Harness(tmp_path / "one", azs=1,
                overrides=(("disable_key_availability_check", True),))
    try:
        login = h.login()
        k = h.call(h.cluster.generate_key(login, AES_GEN, aes_template(), 1))
        assert k in h.inventories()[h.hsm_ids[0]]
        assert h.call(h.cluster.encrypt(login, k, GCM, b"x")).data
    finally:
        h.close()


def test_three_hsm_cluster_with_two_down_refuses_new_token_keys(fresh3: Harness) -> None:
    h = fresh3
    login = h.login()
    for hid in h.hsm_ids[1:]:
        h.call(h.sup.partition(hid))
    with pytest.raises(Pkcs11Error) as e:
        h.call(h.cluster.generate_key(login, AES_GEN, aes_template(), 1))
    assert e.value.rv == RV.FUNCTION_FAILED
    assert h.inventories()[h.hsm_ids[0]] == {} or all(
        h.cluster.directory.is_tombstoned(hd) for hd in h.inventories()[h.hsm_ids[0]])
    for hid in h.hsm_ids[1:]:
        h.call(h.sup.heal(hid))
    h.wait_converged(30)
    k = h.call(h.cluster.generate_key(login, AES_GEN, aes_template(), 1))
    assert len(h.cluster.directory.holders(k)) >= 2


def test_user_creation_needs_two_hsms_too(fresh3: Harness) -> None:
    from hsmsim.pkcs11.constants import UserType
    h = fresh3
    co = h.login("admin", "admin-password-1", UserType.SO)
    for hid in h.hsm_ids[1:]:
        h.call(h.sup.partition(hid))
    with pytest.raises(Pkcs11Error) as e:
        h.call(h.cluster.create_user(co, "henry", "crypto-user", "henry-password"))
    assert e.value.rv == RV.FUNCTION_FAILED
    assert "henry" not in {u["username"] for u in h.call(h.cluster.list_users_cluster())}
    for hid in h.hsm_ids[1:]:
        h.call(h.sup.heal(hid))
    h.wait_converged(30)
    assert "henry" not in {u["username"] for u in h.call(h.cluster.list_users_cluster())}
    h.call(h.cluster.create_user(co, "henry", "crypto-user", "henry-password"))
    users = {u["username"]: u for u in h.call(h.cluster.list_users_cluster())}
    assert users["henry"]["cluster-coverage"] == "full"
