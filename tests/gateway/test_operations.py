"""The gateway's operation state machine, driven in-process over a real cluster: length queries
and CKR_BUFFER_TOO_SMALL keep the operation (and its result), a second Init is
CKR_OPERATION_ACTIVE, and the mechanism table's parameter rules refuse bad parameters."""

from __future__ import annotations

import hashlib
import struct

import pytest

from hsmsim.gateway.config import GatewayConfig
from hsmsim.gateway.protocol import Op, ParamKind, Reader, Writer
from hsmsim.pkcs11.constants import MGF, RV, Attribute as A, Mechanism as M

from .conftest import Client, Loop, mechanism, template

U64 = struct.Struct("<Q")


def out(kind: int, capacity: int = 0) -> bytes:
    """The output buffer spec: 0 absent (length query), 1 present with `capacity`."""
    return Writer().u8(kind).u64(capacity).done()


def answer(body: bytes) -> tuple[int, bytes]:
    r = Reader(body)
    n = r.u64()
    r.u8()
    return n, r.bytes()


def hmac_key(c: Client, s: int) -> int:
    t = template((A.TOKEN, False), (A.VALUE_LEN, 32), (A.SIGN, True), (A.VERIFY, True))
    rv, body = c.call(Op.GenerateKey, U64.pack(s) + mechanism(M.GENERIC_SECRET_KEY_GEN) + t)
    assert rv == 0
    return int(U64.unpack(body[:8])[0])


def aes_key(c: Client, s: int, *extra: tuple[int, object]) -> int:
    t = template((A.TOKEN, False), (A.VALUE_LEN, 32), (A.ENCRYPT, True), (A.DECRYPT, True), *extra)
    rv, body = c.call(Op.GenerateKey, U64.pack(s) + mechanism(M.AES_KEY_GEN) + t)
    assert rv == 0
    return int(U64.unpack(body[:8])[0])


def test_digest_length_query_and_buffer_too_small_keep_the_operation(client: Client) -> None:
    s = client.open_session(login=False)
    assert client.call(Op.DigestInit, U64.pack(s) + mechanism(M.SHA256))[0] == 0
    data = Writer().bytes(b"abc").done()
    rv, body = client.call(Op.Digest, U64.pack(s) + data + out(0))
    assert rv == 0 and answer(body) == (32, b"")
    rv, body = client.call(Op.Digest, U64.pack(s) + data + out(1, 31))
    assert rv == RV.BUFFER_TOO_SMALL and answer(body) == (32, b"")
    rv, body = client.call(Op.Digest, U64.pack(s) + data + out(1, 32))
    assert rv == 0 and answer(body) == (32, hashlib.sha256(b"abc").digest())
    # delivered: the operation has ended
    assert client.call(Op.Digest, U64.pack(s) + data + out(1, 32))[0] == RV.OPERATION_NOT_INITIALIZED


def test_sign_length_query_then_the_same_signature(client: Client) -> None:
    s = client.open_session()
    key = hmac_key(client, s)
    assert client.call(Op.SignInit, U64.pack(s) + mechanism(M.SHA256_HMAC) + U64.pack(key))[0] == 0
    data = Writer().bytes(b"message").done()
    rv, body = client.call(Op.Sign, U64.pack(s) + data + out(0))
    assert rv == 0 and answer(body) == (32, b"")
    assert client.gw.apps[client.app.token].sessions[s].ops  # still active after the query
    rv, body = client.call(Op.Sign, U64.pack(s) + data + out(1, 8))
    assert rv == RV.BUFFER_TOO_SMALL and answer(body) == (32, b"")
    rv, body = client.call(Op.Sign, U64.pack(s) + data + out(1, 64))
    n, sig = answer(body)
    assert rv == 0 and n == 32 and len(sig) == 32
    assert not client.app.sessions[s].ops
    # verifies through the gateway too
    assert client.call(Op.VerifyInit, U64.pack(s) + mechanism(M.SHA256_HMAC) + U64.pack(key))[0] == 0
    assert client.call(Op.Verify, U64.pack(s) + data + Writer().bytes(sig).done())[0] == 0


def test_encrypt_final_length_query_and_too_small(client: Client) -> None:
    s = client.open_session()
    key = aes_key(client, s)
    iv = Writer().bytes(bytes(16)).done()
    init = U64.pack(s) + mechanism(M.AES_CBC_PAD, ParamKind.RAW, iv) + U64.pack(key)
    assert client.call(Op.EncryptInit, init)[0] == 0
    rv, body = client.call(Op.EncryptUpdate, U64.pack(s) + Writer().bytes(b"x" * 20).done() + out(1, 64))
    assert rv == 0 and answer(body)[0] == 16
    rv, body = client.call(Op.EncryptFinal, U64.pack(s) + out(0))
    assert rv == 0 and answer(body)[0] == 16
    rv, body = client.call(Op.EncryptFinal, U64.pack(s) + out(1, 15))
    assert rv == RV.BUFFER_TOO_SMALL and answer(body)[0] == 16
    rv, body = client.call(Op.EncryptFinal, U64.pack(s) + out(1, 16))
    assert rv == 0 and len(answer(body)[1]) == 16
    assert not client.app.sessions[s].ops


def test_a_second_init_is_operation_active(loop: Loop) -> None:
    # with the wrong-sequence quirk off (it lets a second C_FindObjectsInit pass, not a second Init)
    c = Client(loop, GatewayConfig(quirk_wrong_sequence_ok=False))
    try:
        s = c.open_session()
        assert c.call(Op.DigestInit, U64.pack(s) + mechanism(M.SHA256))[0] == 0
        assert c.call(Op.DigestInit, U64.pack(s) + mechanism(M.SHA384))[0] == RV.OPERATION_ACTIVE
        key = aes_key(c, s)
        init = U64.pack(s) + mechanism(M.AES_ECB) + U64.pack(key)
        assert c.call(Op.EncryptInit, init)[0] == 0
        assert c.call(Op.EncryptInit, init)[0] == RV.OPERATION_ACTIVE
        # the first operation is intact: the digest still answers SHA-256
        rv, body = c.call(Op.Digest, U64.pack(s) + Writer().bytes(b"abc").done() + out(1, 64))
        assert rv == 0 and answer(body)[1] == hashlib.sha256(b"abc").digest()
        # an Update then a single-part call is a wrong sequence: CKR_OPERATION_ACTIVE
        assert c.call(Op.SignInit, U64.pack(s) + mechanism(M.SHA256_HMAC) + U64.pack(hmac_key(c, s)))[0] == 0
        assert c.call(Op.SignUpdate, U64.pack(s) + Writer().bytes(b"a").done())[0] == 0
        assert c.call(Op.Sign, U64.pack(s) + Writer().bytes(b"a").done() + out(0))[0] == RV.OPERATION_ACTIVE
        assert c.call(Op.FindObjectsInit, U64.pack(s) + template())[0] == 0
        assert c.call(Op.FindObjectsInit, U64.pack(s) + template())[0] == RV.OPERATION_ACTIVE
    finally:
        c.close()


def gcm(iv: bytes | None, tag_bits: int = 128) -> bytes:
    return (Writer().u8(iv is not None).bytes(iv or b"").u64(len(iv or b"") * 8).bytes(b"")
            .u64(tag_bits).done())


def oaep(hash_alg: int, mgf: int) -> bytes:
    return Writer().u64(hash_alg).u64(mgf).u64(1).bytes(b"").done()


def pss(hash_alg: int, mgf: int) -> bytes:
    return Writer().u64(hash_alg).u64(mgf).u64(32).done()


# (opcode, mechanism, parameter kind, parameter): each breaks a rule of the mechanism table
BAD_PARAMS = [
    ("cbc-iv-8", Op.EncryptInit, M.AES_CBC, ParamKind.RAW, Writer().bytes(bytes(8)).done()),
    ("cbc-no-iv", Op.DecryptInit, M.AES_CBC_PAD, ParamKind.NONE, b""),
    ("des3-iv-16", Op.EncryptInit, M.DES3_CBC, ParamKind.RAW, Writer().bytes(bytes(16)).done()),
    ("ecb-with-param", Op.EncryptInit, M.AES_ECB, ParamKind.RAW, Writer().bytes(bytes(16)).done()),
    ("ctr-raw", Op.EncryptInit, M.AES_CTR, ParamKind.RAW, Writer().bytes(bytes(16)).done()),
    ("gcm-tag-64", Op.DecryptInit, M.AES_GCM, ParamKind.GCM, gcm(bytes(12), 64)),
    ("gcm-nonzero-iv", Op.EncryptInit, M.AES_GCM, ParamKind.GCM, gcm(b"\x01" * 12)),
    ("gcm-no-iv", Op.DecryptInit, M.AES_GCM, ParamKind.GCM, gcm(b"")),
    ("cloudhsm-gcm-iv", Op.EncryptInit, M.CLOUDHSM_AES_GCM, ParamKind.GCM, gcm(bytes(12))),
    ("oaep-mgf", Op.EncryptInit, M.RSA_PKCS_OAEP, ParamKind.OAEP, oaep(M.SHA256, MGF.MGF1_SHA1)),
    ("oaep-raw", Op.DecryptInit, M.RSA_PKCS_OAEP, ParamKind.RAW, Writer().bytes(b"").done()),
    ("pss-mgf", Op.SignInit, M.RSA_PKCS_PSS, ParamKind.PSS, pss(M.SHA256, MGF.MGF1_SHA384)),
    ("pss-hash", Op.VerifyInit, M.SHA384_RSA_PKCS_PSS, ParamKind.PSS, pss(M.SHA256, MGF.MGF1_SHA256)),
    ("pss-none", Op.SignInit, M.SHA256_RSA_PKCS_PSS, ParamKind.NONE, b""),
]


@pytest.mark.parametrize("op,mech,kind,param", [b[1:] for b in BAD_PARAMS], ids=[b[0] for b in BAD_PARAMS])
def test_parameter_rules_refuse(client: Client, op: Op, mech: int, kind: int, param: bytes) -> None:
    s = client.open_session()
    rv, _ = client.call(op, U64.pack(s) + mechanism(mech, kind, param) + U64.pack(1))
    assert rv == RV.MECHANISM_PARAM_INVALID
    assert not client.app.sessions[s].ops


def test_parameter_rules_accept_what_they_describe(client: Client) -> None:
    s = client.open_session()
    key = aes_key(client, s)
    for mech, kind, param in ((M.AES_CBC, ParamKind.RAW, Writer().bytes(bytes(16)).done()),
                              (M.AES_ECB, ParamKind.NONE, b""),
                              (M.AES_GCM, ParamKind.GCM, gcm(bytes(12)))):
        assert client.call(Op.EncryptInit, U64.pack(s) + mechanism(mech, kind, param) + U64.pack(key))[0] == 0
        client.app.sessions[s].ops.clear()


def test_wrap_parameter_rules(client: Client) -> None:
    s = client.open_session()
    wrapping, key = aes_key(client, s, (A.WRAP, True)), aes_key(client, s, (A.EXTRACTABLE, True))
    for iv, want in ((bytes(4), RV.MECHANISM_PARAM_INVALID), (None, RV.OK)):
        param = Writer().bytes(iv).done() if iv is not None else b""
        mech = mechanism(M.CLOUDHSM_AES_KEY_WRAP_NO_PAD, ParamKind.RAW if iv is not None else 0, param)
        rv, _ = client.call(Op.WrapKey, U64.pack(s) + mech + U64.pack(wrapping) + U64.pack(key) + out(0))
        assert rv == want
    bad = Writer().u64(100).done() + oaep(M.SHA256, MGF.MGF1_SHA256)
    rv, _ = client.call(Op.WrapKey, U64.pack(s) + mechanism(M.RSA_AES_KEY_WRAP, ParamKind.RSA_AES, bad)
                        + U64.pack(wrapping) + U64.pack(key) + out(0))
    assert rv == RV.MECHANISM_PARAM_INVALID
