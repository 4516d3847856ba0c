"""Access control enforced by the node: the owner / shared user / other CU / CO matrix,
public-key visibility, session-object scope, login lockout, user management, and quotas."""

from __future__ import annotations

from pathlib import Path

import pytest

from hsmsim.pkcs11.constants import RV, Attribute as A, Mechanism as M, UserType
from hsmsim.pkcs11.errors import error_class
from hsmsim.pkcs11.params import GcmParams, MechanismSpec as Spec

from .conftest import _bootstrap
from .nodeproc import PASSWORDS, NodeProc, run, write_secret

GCM = Spec(M.AES_GCM, GcmParams(b"", b""))
P256 = bytes.fromhex("06082a8648ce3d030107")


def test_access_matrix(node_a: NodeProc, handles) -> None:
    async def body() -> None:
        alice, la = await node_a.login("alice")
        bob, lb = await node_a.login("bob")
        carol, lc = await node_a.login("carol")
        admin, lo = await node_a.login("admin")
        k = await alice.generate_key(la, Spec(M.AES_KEY_GEN),
                                     {A.VALUE_LEN: 32, A.TOKEN: True, A.ENCRYPT: True,
                                      A.DECRYPT: True, A.LABEL: "matrix"}, handle=handles())
        w = await alice.generate_key(la, Spec(M.AES_KEY_GEN),
                                     {A.VALUE_LEN: 32, A.TOKEN: True, A.WRAP: True,
                                      A.LABEL: "matrix-kek"}, handle=handles())
        p = handles(); handles()
        pub, priv = await alice.generate_key_pair(
            la, Spec(M.EC_KEY_PAIR_GEN), {A.EC_PARAMS: P256, A.VERIFY: True, A.TOKEN: True,
                                          A.LABEL: "matrix"},
            {A.SIGN: True, A.TOKEN: True, A.LABEL: "matrix"}, public_handle=p, private_handle=p + 1)
        await alice.share_key(la, k, "bob")
        await alice.share_key(la, w, "bob")
        sig = await alice.sign(la, priv, Spec(M.ECDSA_SHA256), b"m")

        # Owner: everything.
        ct = await alice.encrypt(la, k, GCM, b"x")
        assert set(await alice.find_objects(la, {A.LABEL: "matrix"})) == {k, pub, priv}
        # Shared user: use, see; not modify, delete, share, wrap-out.
        assert await bob.decrypt(lb, k, Spec(M.AES_GCM, GcmParams(ct.iv or b"", b"")), ct.data) == b"x"
        assert set(await bob.find_objects(lb, {A.LABEL: "matrix"})) == {k, pub}
        for call in (bob.set_attributes(lb, k, {A.LABEL: "mine"}),
                     bob.destroy_object(lb, k),
                     bob.share_key(lb, k, "carol"),
                     bob.wrap_key(lb, w, Spec(M.AES_KEY_WRAP_PAD), k)):
            with pytest.raises(error_class(RV.ACTION_PROHIBITED)):
                await call
        # Other CU: sees only the public key; the rest does not exist for it.
        assert await carol.find_objects(lc, {A.LABEL: "matrix"}) == [pub]
        await carol.verify(lc, pub, Spec(M.ECDSA_SHA256), b"m", sig)
        with pytest.raises(error_class(RV.KEY_HANDLE_INVALID)):
            await carol.encrypt(lc, k, GCM, b"x")
        with pytest.raises(error_class(RV.KEY_HANDLE_INVALID)):
            await carol.sign(lc, priv, Spec(M.ECDSA_SHA256), b"m")
        for call in (carol.get_attributes(lc, k, [A.LABEL]), carol.destroy_object(lc, k),
                     carol.set_attributes(lc, k, {A.LABEL: "x"})):
            with pytest.raises(error_class(RV.OBJECT_HANDLE_INVALID)):
                await call
        with pytest.raises(error_class(RV.ACTION_PROHIBITED)):
            await carol.destroy_object(lc, pub)  # visible, but not hers
        # Public keys cannot be shared.
        with pytest.raises(error_class(RV.ACTION_PROHIBITED)):
            await alice.share_key(la, pub, "carol")
        # CO: lists keys, cannot use or create them.
        assert k in await admin.find_objects(lo, {A.LABEL: "matrix"})
        with pytest.raises(error_class(RV.USER_TYPE_INVALID)):
            await admin.encrypt(lo, k, GCM, b"x")
        with pytest.raises(error_class(RV.USER_TYPE_INVALID)):
            await admin.generate_key(lo, Spec(M.AES_KEY_GEN), {A.VALUE_LEN: 16},
                                     handle=handles(), session=1)
        # Unshare: bob loses the key.
        await alice.unshare_key(la, k, "bob")
        with pytest.raises(error_class(RV.KEY_HANDLE_INVALID)):
            await bob.encrypt(lb, k, GCM, b"x")
        with pytest.raises(error_class(RV.ARGUMENTS_BAD)):
            await alice.unshare_key(la, k, "bob")
        # A user owning keys cannot be deleted.
        with pytest.raises(error_class(RV.ACTION_PROHIBITED)):
            await admin.delete_user(lo, "alice")
        # Owner deletes.
        await alice.destroy_object(la, k)
        with pytest.raises(error_class(RV.KEY_HANDLE_INVALID)):
            await alice.encrypt(la, k, GCM, b"x")
        # login_ids belong to their connection.
        with pytest.raises(error_class(RV.USER_NOT_LOGGED_IN)):
            await bob.encrypt(la, w, GCM, b"x")
        for c in (alice, bob, carol, admin):
            await c.close()
    run(body)


def test_session_objects_scope(node_a: NodeProc, handles) -> None:
    async def body() -> None:
        one, l1 = await node_a.login("alice")
        two, l2 = await node_a.login("alice")
        h = await one.generate_key(l1, Spec(M.AES_KEY_GEN), {A.VALUE_LEN: 16, A.ENCRYPT: True,
                                                             A.LABEL: "sess"},
                                   handle=handles(), session=42)
        assert await one.find_objects(l1, {A.LABEL: "sess"}) == [h]
        assert await one.find_objects(l1, {A.LABEL: "sess"}, session=43) == []
        assert await two.find_objects(l2, {A.LABEL: "sess"}) == []  # another application
        with pytest.raises(error_class(RV.ARGUMENTS_BAD)):  # session objects need a session
            await one.generate_key(l1, Spec(M.AES_KEY_GEN), {A.VALUE_LEN: 16}, handle=handles())
        assert await one.close_session(42, l1) == 1
        assert await one.find_objects(l1, {A.LABEL: "sess"}) == []
        # Closing the connection ends the login and its session objects.
        h2 = await one.generate_key(l1, Spec(M.AES_KEY_GEN), {A.VALUE_LEN: 16, A.LABEL: "sess2"},
                                    handle=handles(), session=44)
        before = (await (await node_a.client()).status()).session_objects
        await one.close()
        import asyncio
        for _ in range(50):
            st = await (await node_a.client()).status()
            if st.session_objects < before:
                break
            await asyncio.sleep(0.05)
        assert st.session_objects == before - 1
        assert h2 not in {e.handle for e in await (await node_a.client()).inventory()}
        await two.close()
    run(body)


def test_lockout_and_user_management(node_a: NodeProc) -> None:
    async def body() -> None:
        admin, lo = await node_a.login("admin")
        await admin.create_user(lo, "dave", "crypto-user", "davepass1")
        c = await node_a.client(cluster=False)
        for i in range(5):
            with pytest.raises(error_class(RV.PIN_INCORRECT)):
                await c.login(UserType.USER, "dave", "wrongpass")
        users = {u.username: u for u in await admin.list_users(lo)}
        assert users["dave"].locked and users["dave"].failed_logins == 5
        with pytest.raises(error_class(RV.PIN_LOCKED)):
            await c.login(UserType.USER, "dave", "davepass1")
        # A CU cannot unlock; an admin can.
        alice, la = await node_a.login("alice")
        with pytest.raises(error_class(RV.USER_TYPE_INVALID)):
            await alice.unlock_user(la, "dave")
        with pytest.raises(error_class(RV.USER_TYPE_INVALID)):
            await alice.create_user(la, "eve", "crypto-user", "evepass11")
        await admin.unlock_user(lo, "dave")
        li = await c.login(UserType.USER, "dave", "davepass1")
        assert li.username == "dave"
        # Four failures then success resets the count.
        for _ in range(4):
            with pytest.raises(error_class(RV.PIN_INCORRECT)):
                await c.login(UserType.USER, "dave", "wrongpass")
        await c.login(UserType.USER, "dave", "davepass1")
        assert {u.username: u for u in await admin.list_users(lo)}["dave"].failed_logins == 0
        # Wrong role, unknown user, bad inputs.
        with pytest.raises(error_class(RV.PIN_INCORRECT)):
            await c.login(UserType.SO, "dave", "davepass1")
        with pytest.raises(error_class(RV.PIN_INCORRECT)):
            await c.login(UserType.USER, "nobody", "whatever1")
        with pytest.raises(error_class(RV.USER_TYPE_INVALID)):
            await c.login(7, "dave", "davepass1")
        with pytest.raises(error_class(RV.PIN_LEN_RANGE)):
            await admin.create_user(lo, "frank", "crypto-user", "short")
        with pytest.raises(error_class(RV.ARGUMENTS_BAD)):
            await admin.create_user(lo, "bad name!", "crypto-user", "longenough")
        with pytest.raises(error_class(RV.ARGUMENTS_BAD)):
            await admin.create_user(lo, "frank", "superuser", "longenough")
        # Own password change; admin password reset; delete.
        dave = await c.login(UserType.USER, "dave", "davepass1")
        await c.change_password(dave.login_id, "dave", "davepass2")
        with pytest.raises(error_class(RV.USER_TYPE_INVALID)):
            await c.change_password(dave.login_id, "alice", "hijacked1")
        await admin.change_password(lo, "dave", "davepass3")
        await c.login(UserType.USER, "dave", "davepass3")
        await admin.delete_user(lo, "dave")
        with pytest.raises(error_class(RV.PIN_INCORRECT)):
            await c.login(UserType.USER, "dave", "davepass3")
        with pytest.raises(error_class(RV.ACTION_PROHIBITED)):
            await admin.delete_user(lo, "admin")
        # initialize_users works only once.
        cl = await node_a.client()
        with pytest.raises(error_class(RV.ACTION_PROHIBITED)):
            await cl.initialize_users("newadmin1", "newuser01")
        for x in (admin, c, alice, cl):
            await x.close()
        audit = (node_a.dir / "audit.jsonl").read_text()
        for pw in ("davepass1", "davepass2", "davepass3", "wrongpass", PASSWORDS["admin"]):
            assert pw not in audit
    run(body)


def test_quotas(tmp_path: Path) -> None:
    (tmp_path / "hsmsim.toml").write_text(
        "[node]\nmax_keys = 3\nmax_asymmetric_keys = 2\nmax_users = 6\n")
    node = NodeProc(tmp_path, "hsm-qqqqqqqqqqq", "us-east-1a",
                    write_secret(tmp_path / "secrets" / "cluster.secret"), "new").start()
    try:
        run(_bootstrap, node)

        async def body() -> None:
            c, lid = await node.login("alice", cluster=True)
            await c.generate_key_pair(lid, Spec(M.EC_KEY_PAIR_GEN), {A.EC_PARAMS: P256, A.TOKEN: True},
                                      {A.TOKEN: True}, public_handle=1, private_handle=2)
            before = await c.status()
            with pytest.raises(error_class(RV.DEVICE_MEMORY)):
                await c.generate_key_pair(lid, Spec(M.EC_KEY_PAIR_GEN), {A.EC_PARAMS: P256},
                                          {}, public_handle=3, private_handle=4, session=1)
            await c.generate_key(lid, Spec(M.AES_KEY_GEN), {A.VALUE_LEN: 16, A.TOKEN: True},
                                 handle=5)
            with pytest.raises(error_class(RV.DEVICE_MEMORY)):
                await c.generate_key(lid, Spec(M.AES_KEY_GEN), {A.VALUE_LEN: 16, A.TOKEN: True},
                                     handle=6)
            after = await c.status()
            assert after.token_objects == before.token_objects + 1
            assert after.asymmetric_objects == before.asymmetric_objects == 2
            assert {e.handle for e in await c.inventory()} == {1, 2, 5}
            admin, lo = await node.login("admin")
            with pytest.raises(error_class(RV.DEVICE_MEMORY)):
                await admin.create_user(lo, "zed", "crypto-user", "zedpass11")
            # Deleting frees quota.
            await c.destroy_object(lid, 5)
            await c.generate_key(lid, Spec(M.AES_KEY_GEN), {A.VALUE_LEN: 16, A.TOKEN: True},
                                 handle=6)
            await c.close()
            await admin.close()
        run(body)
    finally:
        node.stop()
