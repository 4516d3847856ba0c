"""An HSM that refused an application's login earlier is still a holder of its keys: CloudHSM
fails over to any HSM holding the key, so once the others are lost the request goes there
(the login is sent once more), but a refusal that stands costs at most that one attempt.

Cause of the flake in tests/pkcs11/test_multipart.py::test_an_hsm_lost_mid_operation_costs_nothing
(CKR_DEVICE_ERROR right after an HSM was killed): routing left out an HSM in
`Member.login_refused`, so with the other holder just killed no HSM was left."""

from __future__ import annotations

from hsmsim.cluster.api import Login
from hsmsim.cluster.members import Member
from hsmsim.pkcs11.constants import RV, Mechanism, UserType
from hsmsim.pkcs11.errors import Pkcs11Error
from hsmsim.pkcs11.params import MechanismSpec, RawParams

from .conftest import AES_GEN, Harness, aes_template

CBC = MechanismSpec(int(Mechanism.AES_CBC_PAD), RawParams(b"\x00" * 16))


def _refused_earlier(h: Harness, m: Member, login: Login) -> None:
    """`m` holds the state a refusal leaves: no node login for the application, the refusal
    remembered (here the refusal is stale: the user's record is the same on every HSM)."""
    async def refuse() -> None:
        lid = m.logins.pop(login.login_id)
        m.login_refused.add(login.login_id)
        await m.connection().logout(lid)
    h.call(refuse())


def _failed_logins(h: Harness, m: Member, username: str) -> int:
    async def count() -> int:
        users = await m.connection().list_users(None)
        return next(u.failed_logins for u in users if u.username == username)
    return h.call(count())


def test_a_key_fails_over_to_an_hsm_that_refused_the_login_earlier(fresh3: Harness) -> None:
    h = fresh3
    login = h.login()
    key = h.call(h.cluster.generate_key(login, AES_GEN, aes_template(label="refused"), 1))
    h.wait_converged()
    a, b, c = h.hsm_ids
    ma = h.cluster.members[a]
    _refused_earlier(h, ma, login)
    h.call(h.sup.kill(b))
    h.call(h.sup.kill(c))
    # the key's other holders are lost: the HSM that refused is the one left
    ct = h.call(h.cluster.encrypt(login, key, CBC, b"x" * 32))
    assert h.call(h.cluster.decrypt(login, key, CBC, ct.data)) == b"x" * 32
    assert login.login_id in ma.logins and login.login_id not in ma.login_refused
    assert _failed_logins(h, ma, "crypto_user") == 0


def test_a_refusal_that_stands_costs_one_more_attempt_only(fresh3: Harness) -> None:
    h = fresh3
    login = h.login()
    key = h.call(h.cluster.generate_key(login, AES_GEN, aes_template(label="stands"), 1))
    h.wait_converged()
    a, b, c = h.hsm_ids
    ma = h.cluster.members[a]
    h.call(h.sup.kill(b))
    h.call(h.sup.kill(c))

    async def new_password_on_a_only() -> None:
        node = ma.connection()
        admin = await node.login(UserType.SO, "admin", "admin-password-1")
        await node.change_password(admin.login_id, "crypto_user", "another-password-1")
        await node.logout(admin.login_id)
    h.call(new_password_on_a_only())
    _refused_earlier(h, ma, login)
    for _ in range(3):
        try:
            h.call(h.cluster.encrypt(login, key, CBC, b"x" * 32))
            raise AssertionError("encrypt succeeded with a password the HSM refuses")
        except Pkcs11Error as exc:
            assert exc.rv == RV.DEVICE_ERROR
    # one login attempt was sent for all three requests, and it counted as one failure
    assert _failed_logins(h, ma, "crypto_user") == 1
    assert login.login_id in ma.login_refused
