"""Masked export/import between two real nodes of one cluster (B cloned from A): identical
handles, attributes and results; tampered or foreign blobs rejected; user records synced."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hsmsim.node.client import NodeClient
from hsmsim.pkcs11.constants import RV, Attribute as A, KeyType, Mechanism as M, ObjectClass
from hsmsim.pkcs11.errors import error_class
from hsmsim.pkcs11.params import GcmParams, MechanismSpec as Spec

from .nodeproc import PASSWORDS, NodeProc, run, write_secret

ATTRS = [A.CLASS, A.KEY_TYPE, A.LABEL, A.ID, A.TOKEN, A.PRIVATE, A.SENSITIVE, A.EXTRACTABLE,
         A.ENCRYPT, A.DECRYPT, A.SIGN, A.VERIFY, A.WRAP, A.UNWRAP, A.DERIVE, A.LOCAL,
         A.ALWAYS_SENSITIVE, A.NEVER_EXTRACTABLE, A.VALUE_LEN, A.MODULUS, A.PUBLIC_EXPONENT,
         A.MODULUS_BITS, A.EC_PARAMS, A.EC_POINT, A.KEY_GEN_MECHANISM, A.VALUE]
P256 = bytes.fromhex("06082a8648ce3d030107")


async def _make_objects(c: NodeClient, lid: int, handles) -> dict[str, int]:
    t = {A.TOKEN: True, A.LABEL: "masked", A.ID: b"\x07"}
    out = {"aes": await c.generate_key(lid, Spec(M.AES_KEY_GEN), {**t, A.VALUE_LEN: 32,
                                                                  A.ENCRYPT: True, A.DECRYPT: True},
                                       handle=handles())}
    out["generic"] = await c.create_object(lid, {**t, A.CLASS: ObjectClass.SECRET_KEY,
                                                 A.KEY_TYPE: KeyType.GENERIC_SECRET,
                                                 A.VALUE: os.urandom(37), A.SIGN: True,
                                                 A.VERIFY: True, A.SENSITIVE: False},
                                           handle=handles())
    h = handles(); handles()
    out["rsa_pub"], out["rsa_priv"] = await c.generate_key_pair(
        lid, Spec(M.RSA_PKCS_KEY_PAIR_GEN), {**t, A.MODULUS_BITS: 2048, A.VERIFY: True},
        {**t, A.SIGN: True}, public_handle=h, private_handle=h + 1)
    h = handles(); handles()
    out["ec_pub"], out["ec_priv"] = await c.generate_key_pair(
        lid, Spec(M.EC_KEY_PAIR_GEN), {**t, A.EC_PARAMS: P256, A.VERIFY: True},
        {**t, A.SIGN: True}, public_handle=h, private_handle=h + 1)
    out["data"] = await c.create_object(lid, {A.CLASS: ObjectClass.DATA, A.TOKEN: True,
                                              A.LABEL: "masked", A.VALUE: b"opaque data"},
                                        handle=handles())
    await c.share_key(lid, out["aes"], "bob")
    return out


def test_export_import_identical(node_a: NodeProc, node_b: NodeProc, handles) -> None:
    async def body() -> None:
        a, la = await node_a.login("alice", cluster=True)
        b, lb = await node_b.login("alice", cluster=True)
        objs = await _make_objects(a, la, handles)
        for name, h in objs.items():
            blob = await a.export_masked(h)
            assert await b.import_masked(blob) == h, name
            ra = await a.get_attributes(la, h, ATTRS)
            rb = await b.get_attributes(lb, h, ATTRS)
            assert ra == rb, name
        inv_a = {e.handle: e.fingerprint for e in await a.inventory()}
        inv_b = {e.handle: e.fingerprint for e in await b.inventory()}
        for h in objs.values():
            assert inv_a[h] == inv_b[h]
        # The same key: encrypt on A, decrypt on B; sign on B, verify on A.
        enc = await a.encrypt(la, objs["aes"], Spec(M.AES_GCM, GcmParams(b"", b"x")), b"payload")
        assert await b.decrypt(lb, objs["aes"], Spec(M.AES_GCM, GcmParams(enc.iv or b"", b"x")),
                               enc.data) == b"payload"
        for pub, priv, mech in (("rsa_pub", "rsa_priv", M.SHA256_RSA_PKCS),
                                ("ec_pub", "ec_priv", M.ECDSA_SHA256)):
            sig = await b.sign(lb, objs[priv], Spec(mech), b"signed on B")
            await a.verify(la, objs[pub], Spec(mech), b"signed on B", sig)
        mac_a = await a.sign(la, objs["generic"], Spec(M.SHA256_HMAC), b"m")
        assert mac_a == await b.sign(lb, objs["generic"], Spec(M.SHA256_HMAC), b"m")
        # Sharing travelled with the key.
        bob, lbob = await node_b.login("bob")
        assert objs["aes"] in await bob.find_objects(lbob, {A.LABEL: "masked"})
        await bob.close()
        # A duplicate handle is refused, replace=True replaces.
        blob = await a.export_masked(objs["aes"])
        with pytest.raises(error_class(RV.TEMPLATE_INCONSISTENT)):
            await b.import_masked(blob)
        assert await b.import_masked(blob, replace=True) == objs["aes"]
        assert await b.decrypt(lb, objs["aes"], Spec(M.AES_GCM, GcmParams(enc.iv or b"", b"x")),
                               enc.data) == b"payload"
        # The cluster principal destroys by handle (replicated deletion).
        await b.destroy_object(None, objs["data"])
        assert objs["data"] not in {e.handle for e in await b.inventory()}
        audit = [r.event for r in await b.audit_read(0, 10000)]
        assert "masked_insert" in audit
        assert "masked_extract" in [r.event for r in await a.audit_read(0, 10000)]
        await a.close()
        await b.close()
    run(body)


def test_tampered_blob_rejected(node_a: NodeProc, node_b: NodeProc, handles) -> None:
    async def body() -> None:
        a, la = await node_a.login("alice", cluster=True)
        b = await node_b.client()
        h = await a.generate_key(la, Spec(M.AES_KEY_GEN), {A.VALUE_LEN: 16, A.TOKEN: True},
                                 handle=handles())
        blob = await a.export_masked(h)
        before = await b.status()
        for pos in (0, 5, len(blob) // 2, len(blob) - 20, len(blob) - 1):
            bad = blob[:pos] + bytes([blob[pos] ^ 0x01]) + blob[pos + 1:]
            with pytest.raises(error_class(RV.WRAPPED_KEY_INVALID)):
                await b.import_masked(bad)
        for junk in (b"", b"\x93", blob[:-1], blob + b"\0", os.urandom(200)):
            with pytest.raises(error_class(RV.WRAPPED_KEY_INVALID)):
                await b.import_masked(junk)
        after = await b.status()
        assert after.token_objects == before.token_objects
        assert h not in {e.handle for e in await b.inventory()}
        # Users blobs are not object blobs.
        with pytest.raises(error_class(RV.WRAPPED_KEY_INVALID)):
            await b.import_masked(await a.export_users())
        # Without the cluster principal, no masking ops.
        plain = await node_a.client(cluster=False)
        with pytest.raises(error_class(RV.USER_NOT_LOGGED_IN)):
            await plain.export_masked(h)
        await plain.close()
        await a.close()
        await b.close()
    run(body)


def test_foreign_cluster_blob_rejected(node_a: NodeProc, handles, tmp_path: Path) -> None:
    other = NodeProc(tmp_path, "hsm-ccccccccccc", "us-east-1c",
                     write_secret(tmp_path / "secrets" / "cluster.secret"), "new").start()
    try:
        async def body() -> None:
            a, la = await node_a.login("alice", cluster=True)
            h = await a.generate_key(la, Spec(M.AES_KEY_GEN), {A.VALUE_LEN: 16, A.TOKEN: True},
                                     handle=handles())
            c = await other.client()
            with pytest.raises(error_class(RV.WRAPPED_KEY_INVALID)):
                await c.import_masked(await a.export_masked(h))
            with pytest.raises(error_class(RV.WRAPPED_KEY_INVALID)):
                await c.import_users(await a.export_users())
            assert (await c.status()).token_objects == 0
            await a.close()
            await c.close()
        run(body)
    finally:
        other.stop()


def test_users_synced_and_clone_guarded(node_a: NodeProc, node_b: NodeProc) -> None:
    async def body() -> None:
        a, b = await node_a.client(), await node_b.client()
        # The same credentials (and versions); failure counts and lockout are per HSM.
        assert [(u.username, u.role, u.version) for u in await a.list_users()] == \
            [(u.username, u.role, u.version) for u in await b.list_users()]
        for name in ("alice", "bob", "admin"):
            c, _ = await node_b.login(name)
            await c.close()
        # Import is idempotent: nothing newer, nothing changed.
        assert await b.import_users(await a.export_users()) == 0
        # A node with a masking key refuses to be cloned again.
        with pytest.raises(error_class(RV.ACTION_PROHIBITED)):
            await b.clone_offer()
        with pytest.raises(error_class(RV.PUBLIC_KEY_INVALID)):
            await a.clone_export(b"not a key")
        st = await b.status()
        assert st.has_masking_key and st.users == len(PASSWORDS)
        await a.close()
        await b.close()
    run(body)


def test_uncloned_node(tmp_path: Path) -> None:
    node = NodeProc(tmp_path, "hsm-eeeeeeeeeee", "us-east-1e",
                    write_secret(tmp_path / "secrets" / "cluster.secret"), "clone").start()
    try:
        async def body() -> None:
            c = await node.client()
            st = await c.status()
            assert not st.has_masking_key and st.users == 0
            with pytest.raises(error_class(RV.DEVICE_ERROR)):
                await c.export_users()
            with pytest.raises(error_class(RV.DEVICE_ERROR)):
                await c.import_masked(b"\x93\x00\x00\x00")
            with pytest.raises(error_class(RV.OPERATION_NOT_INITIALIZED)):
                await c.clone_accept(b"x" * 384)
            pub = await c.clone_offer()
            with pytest.raises(error_class(RV.WRAPPED_KEY_INVALID)):
                await c.clone_accept(os.urandom(384))
            assert not (await c.status()).has_masking_key
            assert len(pub) > 300
            await c.close()
        run(body)
        node.restart()  # still waiting for its masking key after a restart
        async def after() -> None:
            c = await node.client()
            assert not (await c.status()).has_masking_key
            await c.close()
        run(after)
    finally:
        node.stop()
