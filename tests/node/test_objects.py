"""Object lifecycle details: copy, session-to-token promotion, data objects, vendor
mechanisms, TCP listening and the connection limit."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hsmsim.node.client import NodeClient, NodeUnavailable
from hsmsim.pkcs11.constants import RV, Attribute as A, KeyType, Mechanism as M, ObjectClass
from hsmsim.pkcs11.errors import error_class
from hsmsim.pkcs11.params import GcmParams, MechanismSpec as Spec

from .nodeproc import NodeProc, run, write_secret

GCM = Spec(M.AES_GCM, GcmParams(b"", b""))


def test_copy_and_promote(node_a: NodeProc, handles) -> None:
    value = os.urandom(32)

    async def body() -> None:
        c, lid = await node_a.login("alice", cluster=True)
        h = await c.create_object(lid, {A.CLASS: ObjectClass.SECRET_KEY, A.KEY_TYPE: KeyType.AES,
                                        A.VALUE: value, A.ENCRYPT: True, A.DECRYPT: True,
                                        A.LABEL: "orig"}, handle=handles(), session=11)
        # Copy with a new label: same key material.
        h2 = await c.copy_object(lid, h, {A.LABEL: "copy"}, new_handle=handles(), session=11)
        enc = await c.encrypt(lid, h2, GCM, b"copied")
        assert AESGCM(value).decrypt(enc.iv, enc.data, b"") == b"copied"
        assert (await c.get_attributes(lid, h2, [A.LABEL]))[0].value == "copy"
        with pytest.raises(error_class(RV.ATTRIBUTE_READ_ONLY)):
            await c.copy_object(lid, h, {A.KEY_TYPE: KeyType.GENERIC_SECRET},
                                new_handle=handles(), session=11)
        # Session -> token: the object becomes a token object under the same handle.
        assert h not in {e.handle for e in await c.inventory()}
        await c.set_attributes(lid, h, {A.TOKEN: True})
        assert h in {e.handle for e in await c.inventory()}
        enc = await c.encrypt(lid, h, GCM, b"promoted")
        assert AESGCM(value).decrypt(enc.iv, enc.data, b"") == b"promoted"
        with pytest.raises(error_class(RV.ATTRIBUTE_READ_ONLY)):
            await c.set_attributes(lid, h, {A.TOKEN: False})
        # It survives close_session (it is a token object now); the copy does not.
        assert await c.close_session(11, lid) == 1
        assert await c.find_objects(lid, {A.LABEL: "orig"}) == [h]
        # Data objects: value stored in the token, attributes in the index.
        d = await c.create_object(lid, {A.CLASS: ObjectClass.DATA, A.LABEL: "blob",
                                        A.APPLICATION: b"app", A.VALUE: b"\x00data\xff"},
                                  handle=handles(), session=12)
        res = await c.get_attributes(lid, d, [A.VALUE, A.APPLICATION, A.CLASS])
        assert [r.value for r in res] == [b"\x00data\xff", b"app", ObjectClass.DATA]
        # The CloudHSM vendor AES-GCM mechanism behaves as CKM_AES_GCM.
        enc = await c.encrypt(lid, h, Spec(M.CLOUDHSM_AES_GCM, GcmParams(b"", b"v")), b"vendor")
        assert AESGCM(value).decrypt(enc.iv, enc.data, b"v") == b"vendor"
        await c.destroy_object(lid, h)
        await c.close_session(12, lid)
        await c.close()
    run(body)


def test_tcp_and_connection_limit(tmp_path: Path) -> None:
    (tmp_path / "hsmsim.toml").write_text("[node]\nmax_connections = 2\n")
    node = NodeProc(tmp_path, "hsm-ttttttttttt", "us-east-1b",
                    write_secret(tmp_path / "secrets" / "cluster.secret"), "new")
    node.address = "tcp:127.0.0.1:0"
    node.start()
    try:
        async def body() -> None:
            addr = node.bound
            assert addr.startswith("tcp:127.0.0.1:") and not addr.endswith(":0")
            secret = node.secret
            a = await NodeClient.connect(addr, cluster_secret=secret)
            b = await NodeClient.connect(addr, cluster_secret=secret)
            with pytest.raises(NodeUnavailable):
                await NodeClient.connect(addr, cluster_secret=secret)
            await a.close()
            # The closed slot is free once the node has seen the close: poll for it.
            deadline = asyncio.get_running_loop().time() + 30
            while True:
                try:
                    c = await NodeClient.connect(addr, cluster_secret=secret)
                    break
                except NodeUnavailable:
                    assert asyncio.get_running_loop().time() < deadline, "the slot never freed"
                    await asyncio.sleep(0.05)
            assert (await c.status()).connections == 2
            await b.close()
            await c.close()
        run(body)
    finally:
        node.stop()


def test_cli_errors(tmp_path: Path) -> None:
    import subprocess
    import sys
    secret = write_secret(tmp_path / "secrets" / "cluster.secret")
    base = [sys.executable, "-m", "hsmsim", "node", "serve", "--state", str(tmp_path),
            "--az", "us-east-1a", "--listen", f"unix:{tmp_path}/n.sock",
            "--cluster-secret-file", str(secret)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HSMSIM_")}
    for extra, message in (
        (["--hsm-id", "hsm-BAD"], "--hsm-id must look like"),
        (["--hsm-id", "hsm-aaaaaaaaaaa"], "pass --init new or --init clone"),
        (["--hsm-id", "hsm-aaaaaaaaaaa", "--init", "new", "--cluster-secret-file",
          str(tmp_path / "missing")], "cannot read the cluster secret file"),
    ):
        out = subprocess.run(base + extra, capture_output=True, text=True, env=env, timeout=60)
        assert out.returncode == 1, out
        assert message in out.stderr and "Traceback" not in out.stderr, out.stderr
    out = subprocess.run(base + ["--hsm-id", "hsm-aaaaaaaaaaa", "--init", "bogus"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 2 and "invalid choice" in out.stderr
    # A second process on the same node refuses to start.
    node = NodeProc(tmp_path, "hsm-aaaaaaaaaaa", "us-east-1a", secret, "new").start()
    try:
        out = subprocess.run(base + ["--hsm-id", "hsm-aaaaaaaaaaa"], capture_output=True,
                             text=True, env=env, timeout=60)
        assert out.returncode == 1 and "already running" in out.stderr
    finally:
        node.stop()
    # A wrong cluster secret cannot open the token.
    write_secret(secret)
    out = subprocess.run(base + ["--hsm-id", "hsm-aaaaaaaaaaa"], capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode == 1 and "wrong cluster secret" in out.stderr


def test_trusted_wrapping_and_allowed_mechanisms(node_a: NodeProc, handles) -> None:
    async def body() -> None:
        c, lid = await node_a.login("alice")
        admin, lo = await node_a.login("admin")
        kek = await c.generate_key(lid, Spec(M.AES_KEY_GEN), {A.VALUE_LEN: 32, A.WRAP: True,
                                                              A.TOKEN: True}, handle=handles())
        k = await c.generate_key(lid, Spec(M.AES_KEY_GEN), {A.VALUE_LEN: 16, A.TOKEN: True,
                                                            A.WRAP_WITH_TRUSTED: True},
                                 handle=handles())
        with pytest.raises(error_class(RV.KEY_NOT_WRAPPABLE)):
            await c.wrap_key(lid, kek, Spec(M.AES_KEY_WRAP_PAD), k)
        with pytest.raises(error_class(RV.ATTRIBUTE_READ_ONLY)):
            await c.set_attributes(lid, kek, {A.TRUSTED: True})
        with pytest.raises(error_class(RV.USER_TYPE_INVALID)):
            await admin.set_attributes(lo, kek, {A.LABEL: "admin renames"})
        await admin.set_attributes(lo, kek, {A.TRUSTED: True})
        assert len(await c.wrap_key(lid, kek, Spec(M.AES_KEY_WRAP_PAD), k)) == 24
        with pytest.raises(error_class(RV.ATTRIBUTE_READ_ONLY)):
            await c.set_attributes(lid, k, {A.WRAP_WITH_TRUSTED: False})
        only_gcm = await c.generate_key(lid, Spec(M.AES_KEY_GEN),
                                        {A.VALUE_LEN: 16, A.ENCRYPT: True,
                                         A.ALLOWED_MECHANISMS: [int(M.AES_GCM)]},
                                        handle=handles(), session=13)
        await c.encrypt(lid, only_gcm, GCM, b"ok")
        with pytest.raises(error_class(RV.MECHANISM_INVALID)):
            await c.encrypt(lid, only_gcm, Spec(M.AES_ECB), b"\0" * 16)
        for h in (kek, k):
            await c.destroy_object(lid, h)
        await c.close_session(13, lid)
        await c.close()
        await admin.close()
    run(body)


def test_certificate_attributes(node_a: NodeProc, handles) -> None:
    """UG:pkcs11-certificate-storage-attributes: CKA_CHECK_VALUE is derived from CKA_VALUE
    (PKCS#11 2.40: the first 3 bytes of its SHA-1) and cannot be given; CKA_ISSUER,
    CKA_SERIAL_NUMBER, CKA_START_DATE, CKA_END_DATE and CKA_PUBLIC_KEY_INFO are supported,
    empty by default."""
    import hashlib
    value = b"\x30\x03\x02\x01\x07"
    base = {A.CLASS: ObjectClass.CERTIFICATE, A.CERTIFICATE_TYPE: 0, A.SUBJECT: b"\x30\x00",
            A.VALUE: value, A.PRIVATE: False}
    names = [A.CHECK_VALUE, A.ISSUER, A.SERIAL_NUMBER, A.START_DATE, A.END_DATE,
             A.PUBLIC_KEY_INFO]

    async def body() -> None:
        c, lid = await node_a.login("alice")
        h = await c.create_object(lid, base, handle=handles(), session=22)
        got = [(r.value, r.rv) for r in await c.get_attributes(lid, h, names)]
        assert got == [(hashlib.sha1(value).digest()[:3], 0)] + [(b"", 0)] * 5
        h = await c.create_object(lid, {**base, A.ISSUER: b"\x30\x01", A.SERIAL_NUMBER: b"\x02\x01\x07",
                                        A.START_DATE: b"20260101"}, handle=handles(), session=22)
        got = [r.value for r in await c.get_attributes(lid, h, names[:4])]
        assert got == [hashlib.sha1(value).digest()[:3], b"\x30\x01", b"\x02\x01\x07", b"20260101"]
        with pytest.raises(error_class(RV.ATTRIBUTE_READ_ONLY)):
            await c.create_object(lid, {**base, A.CHECK_VALUE: hashlib.sha1(value).digest()[:3]},
                                  handle=handles(), session=22)
        await c.close_session(22, lid)
        await c.close()
    run(body)


def _kcv(kt: int, value: bytes) -> bytes:
    """PKCS#11 2.40's CKA_CHECK_VALUE, computed with pyca: AES and DES3 the first 3 bytes of the
    ECB encryption of a zero block, a generic secret the first 3 bytes of its SHA-1."""
    import hashlib

    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    if kt == KeyType.GENERIC_SECRET:
        return hashlib.sha1(value).digest()[:3]
    alg, block = (algorithms.AES(value), 16) if kt == KeyType.AES else (TripleDES(value), 8)
    enc = Cipher(alg, modes.ECB()).encryptor()
    return (enc.update(bytes(block)) + enc.finalize())[:3]


def test_check_value_of_secret_keys(node_a: NodeProc, node_b: NodeProc, handles) -> None:
    """CKA_CHECK_VALUE (CloudHSM: read-only, reference §1.6) on every way a secret key comes to
    be (generate, create, unwrap, copy, promotion to a token object, import on another HSM),
    with SoftHSM2's rules for a template that carries it; DES3 keys have no CKA_VALUE_LEN."""
    readable = {A.SENSITIVE: False, A.EXTRACTABLE: True}

    async def body() -> None:
        c, lid = await node_a.login("alice", cluster=True)
        b, lb = await node_b.login("alice", cluster=True)
        gen = {KeyType.AES: (M.AES_KEY_GEN, {A.VALUE_LEN: 32}), KeyType.DES3: (M.DES3_KEY_GEN, {}),
               KeyType.GENERIC_SECRET: (M.GENERIC_SECRET_KEY_GEN, {A.VALUE_LEN: 40})}
        for kt, (mech, t) in gen.items():
            h = await c.generate_key(lid, Spec(mech), {**t, **readable, A.TOKEN: True},
                                     handle=handles())
            value, kcv = (r.value for r in await c.get_attributes(lid, h, [A.VALUE, A.CHECK_VALUE]))
            assert isinstance(value, bytes) and kcv == _kcv(kt, value), kt
            assert await c.find_objects(lid, {A.CHECK_VALUE: kcv, A.KEY_TYPE: kt}) == [h]
            # imported by another HSM of the cluster: the same check value
            assert await b.import_masked(await c.export_masked(h)) == h
            assert (await b.get_attributes(lb, h, [A.CHECK_VALUE]))[0].value == kcv
            vlen = (await c.get_attributes(lid, h, [A.VALUE_LEN]))[0]
            if kt == KeyType.DES3:  # PKCS#11 2.40 defines no CKA_VALUE_LEN for DES3 keys
                assert (vlen.value, vlen.rv) == (None, RV.ATTRIBUTE_TYPE_INVALID)
            else:
                assert vlen.value == len(value)
            # generation: only an empty check value (none) may be asked for
            with pytest.raises(error_class(RV.ATTRIBUTE_VALUE_INVALID)):
                await c.generate_key(lid, Spec(mech), {**t, A.CHECK_VALUE: kcv}, handle=handles(),
                                     session=21)
            e = await c.generate_key(lid, Spec(mech), {**t, A.CHECK_VALUE: b""}, handle=handles(),
                                     session=21)
            assert (await c.get_attributes(lid, e, [A.CHECK_VALUE]))[0].value == b""
        with pytest.raises(error_class(RV.ATTRIBUTE_VALUE_INVALID)):
            await c.generate_key(lid, Spec(M.AES_KEY_GEN), {A.VALUE_LEN: 17}, handle=handles(),
                                 session=21)
        # creation: a given check value must be the key's
        for kt, value in ((KeyType.AES, os.urandom(16)), (KeyType.DES3, os.urandom(24)),
                          (KeyType.GENERIC_SECRET, os.urandom(7))):
            t = {A.CLASS: ObjectClass.SECRET_KEY, A.KEY_TYPE: kt, A.VALUE: value, A.LABEL: "kcv"}
            h = await c.create_object(lid, t, handle=handles(), session=21)
            assert (await c.get_attributes(lid, h, [A.CHECK_VALUE]))[0].value == _kcv(kt, value)
            h = await c.create_object(lid, {**t, A.CHECK_VALUE: _kcv(kt, value)},
                                      handle=handles(), session=21)
            assert (await c.get_attributes(lid, h, [A.CHECK_VALUE]))[0].value == _kcv(kt, value)
            before = await c.find_objects(lid, {A.LABEL: "kcv"})
            with pytest.raises(error_class(RV.ATTRIBUTE_VALUE_INVALID)):
                await c.create_object(lid, {**t, A.CHECK_VALUE: b"\x00\x01\x02"},
                                      handle=handles(), session=21)
            assert await c.find_objects(lid, {A.LABEL: "kcv"}) == before
        # read-only afterwards; kept by a copy and by promotion to a token object
        value = os.urandom(16)
        h = await c.create_object(lid, {A.CLASS: ObjectClass.SECRET_KEY, A.KEY_TYPE: KeyType.AES,
                                        A.VALUE: value, A.DERIVE: True}, handle=handles(),
                                  session=21)
        with pytest.raises(error_class(RV.ATTRIBUTE_READ_ONLY)):
            await c.set_attributes(lid, h, {A.CHECK_VALUE: _kcv(KeyType.AES, value)})
        cp = await c.copy_object(lid, h, {A.LABEL: "copy"}, new_handle=handles(), session=21)
        # unwrapped: computed from the unwrapped key; a wrong one given is refused
        kek = await c.create_object(lid, {A.CLASS: ObjectClass.SECRET_KEY, A.KEY_TYPE: KeyType.AES,
                                          A.VALUE: os.urandom(32), A.WRAP: True, A.UNWRAP: True},
                                    handle=handles(), session=21)
        wrap = Spec(M.CLOUDHSM_AES_KEY_WRAP_PKCS5_PAD)
        blob = await c.wrap_key(lid, kek, wrap, h)
        target = {A.CLASS: ObjectClass.SECRET_KEY, A.KEY_TYPE: KeyType.AES}
        uw = await c.unwrap_key(lid, kek, wrap, blob, target, handle=handles(), session=21)
        with pytest.raises(error_class(RV.ATTRIBUTE_VALUE_INVALID)):
            await c.unwrap_key(lid, kek, wrap, blob, {**target, A.CHECK_VALUE: b"abc"},
                               handle=handles(), session=21)
        await c.set_attributes(lid, h, {A.TOKEN: True})
        for k in (h, cp, uw):
            assert (await c.get_attributes(lid, k, [A.CHECK_VALUE]))[0].value == \
                _kcv(KeyType.AES, value)
        # public and private keys have none (PKCS#11 2.40), and may not be given one
        p = handles(); handles()
        with pytest.raises(error_class(RV.ATTRIBUTE_READ_ONLY)):
            await c.generate_key_pair(lid, Spec(M.EC_KEY_PAIR_GEN),
                                      {A.EC_PARAMS: bytes.fromhex("06082a8648ce3d030107"),
                                       A.CHECK_VALUE: b""}, {}, public_handle=p,
                                      private_handle=p + 1, session=21)
        await c.close_session(21, lid)
        await c.close()
        await b.close()
    run(body)
