"""Differential: key generation, wrap/unwrap (AES key wrap, RSA PKCS #1 v1.5, RSA-OAEP,
RSA-AES) and ECDH derivation through SoftHSM2 and hsmsim. Where CloudHSM has only a vendor
variant of a mechanism, hsmsim's vendor mechanism is compared with SoftHSM2's standard one."""

from __future__ import annotations

import ctypes
from typing import Any

import pytest

from cloudhsm_differences import expect, expect_deviation
from hsmsim.pkcs11.constants import Attribute as A, KeyType, Mechanism as M
from p11diff import (CK_ECDH1_DERIVE_PARAMS, CK_RSA_AES_KEY_WRAP_PARAMS, CK_RSA_PKCS_OAEP_PARAMS,
                     UNAVAILABLE, Mechanism, Out, P256_PARAMS, Session, ec_pair, rsa_pair, rv_name,
                     secret_key)

KEK = bytes(range(32, 64))
BLOCK = bytes(range(16))
CKD_NULL = 1
CKD_CLOUDHSM_X963_SHA256_KDF = 0x80000003  # hsmsim's value (the vendor header's is unpublished)
COVERED = {M.AES_KEY_GEN, M.DES3_KEY_GEN, M.GENERIC_SECRET_KEY_GEN, M.RSA_PKCS_KEY_PAIR_GEN,
           M.EC_KEY_PAIR_GEN, M.ECDH1_DERIVE}


def rec(o: Out) -> tuple[str, int | None, str | None]:
    length = o.length if o.rv in (0, 0x150) else None
    return rv_name(o.rv), length, o.data.hex() if o.data is not None else None


def ecb_block(s: Session, key: int) -> str:
    """What `key` makes of one block under AES-ECB: compares keys that cannot be read."""
    o = s.one_shot("Encrypt", Mechanism(M.AES_ECB), key, BLOCK)
    assert o.rv == 0, f"{s.name}: AES-ECB with the key: {rv_name(o.rv)}"
    return (o.data or b"").hex()


AES_TARGET = [(A.CLASS, 4), (A.KEY_TYPE, KeyType.AES), (A.TOKEN, False), (A.ENCRYPT, True),
              (A.DECRYPT, True), (A.EXTRACTABLE, True)]


# -- key generation ------------------------------------------------------------------------------

GEN_READ = [A.CLASS, A.KEY_TYPE, A.VALUE_LEN, A.LOCAL, A.KEY_GEN_MECHANISM, A.ALWAYS_SENSITIVE,
            A.NEVER_EXTRACTABLE, A.SENSITIVE, A.EXTRACTABLE, A.ENCRYPT, A.SIGN]


@pytest.mark.parametrize("mech,key_type,length", [
    (M.AES_KEY_GEN, KeyType.AES, 16), (M.AES_KEY_GEN, KeyType.AES, 24),
    (M.AES_KEY_GEN, KeyType.AES, 32),
    pytest.param(M.AES_KEY_GEN, KeyType.AES, 17, id="AES_KEY_GEN-17"),
    (M.AES_KEY_GEN, KeyType.AES, None),
    pytest.param(M.DES3_KEY_GEN, KeyType.DES3, None, id="DES3_KEY_GEN"),
    (M.GENERIC_SECRET_KEY_GEN, KeyType.GENERIC_SECRET, 32),
    (M.GENERIC_SECRET_KEY_GEN, KeyType.GENERIC_SECRET, None),
], ids=lambda v: M(v).name if isinstance(v, int) and v >= 0x100 else str(v))
def test_generate_key(pair: tuple[Session, Session], mech: int, key_type: int, length: int | None) -> None:
    logs = []
    for s in pair:
        t: list[tuple[int, Any]] = [(A.CLASS, 4), (A.KEY_TYPE, key_type), (A.TOKEN, False),
                                    (A.ENCRYPT, key_type != KeyType.GENERIC_SECRET),
                                    (A.SIGN, key_type == KeyType.GENERIC_SECRET),
                                    # defaults differ (test_generated_key_defaults): set them
                                    (A.SENSITIVE, True), (A.EXTRACTABLE, True)]
        if length is not None:
            t.append((A.VALUE_LEN, length))
        rv, h = s.generate_key(Mechanism(mech), t)
        log: list[Any] = [rv_name(rv)]
        if rv == 0:
            r, attrs = s.get_attributes(h, GEN_READ, [8] * len(GEN_READ))
            log += [rv_name(r), [(n, v.hex() if v else v) for n, v in attrs]]
            log.append(s.get_attributes(h, [A.VALUE], [64])[1][0][0] == UNAVAILABLE)
        logs.append(log)
    assert logs[0] == logs[1]


def test_generated_key_defaults(pair: tuple[Session, Session]) -> None:
    out = {}
    for s in pair:
        rv, h = s.generate_key(Mechanism(M.AES_KEY_GEN), [(A.VALUE_LEN, 16), (A.ENCRYPT, True)])
        assert rv == 0
        _, attrs = s.get_attributes(h, [A.SENSITIVE, A.EXTRACTABLE], [1, 1])
        out[s.name] = "/".join((v or b"").hex() for _, v in attrs)
    expect("CKA_SENSITIVE / CKA_EXTRACTABLE of a generated secret key left to their defaults",
           out["SoftHSM2"], out["hsmsim"])


def test_generate_key_pairs(pair: tuple[Session, Session]) -> None:
    logs = []
    for s in pair:
        log = []
        rv, pub, priv = s.generate_key_pair(
            Mechanism(M.RSA_PKCS_KEY_PAIR_GEN),
            [(A.TOKEN, False), (A.MODULUS_BITS, 2048), (A.PUBLIC_EXPONENT, b"\x01\x00\x01"),
             (A.VERIFY, True), (A.ENCRYPT, True)],
            [(A.TOKEN, False), (A.SIGN, True), (A.DECRYPT, True), (A.SENSITIVE, True)])
        log.append(rv_name(rv))
        for h, types in ((pub, [A.CLASS, A.KEY_TYPE, A.MODULUS_BITS, A.PUBLIC_EXPONENT, A.LOCAL,
                                A.KEY_GEN_MECHANISM, A.VERIFY]),
                         (priv, [A.CLASS, A.KEY_TYPE, A.PUBLIC_EXPONENT, A.LOCAL, A.SIGN,
                                 A.ALWAYS_SENSITIVE, A.PRIVATE_EXPONENT])):
            r, attrs = s.get_attributes(h, types, [8] * len(types))
            log.append((rv_name(r), [(n, v.hex() if v else v) for n, v in attrs]))
        log.append(len(s.attribute(pub, A.MODULUS)))
        rv, pub, priv = s.generate_key_pair(
            Mechanism(M.EC_KEY_PAIR_GEN), [(A.TOKEN, False), (A.EC_PARAMS, P256_PARAMS), (A.VERIFY, True)],
            [(A.TOKEN, False), (A.SIGN, True), (A.DERIVE, True)])
        log.append(rv_name(rv))
        log.append((s.attribute(pub, A.EC_PARAMS).hex(), len(s.attribute(pub, A.EC_POINT))))
        log.append(s.get_attributes(priv, [A.VALUE], [64])[0])
        logs.append(log)
    assert logs[0] == logs[1]


# -- AES key wrap --------------------------------------------------------------------------------

def _kek(s: Session) -> int:
    return secret_key(s, KeyType.AES, KEK, wrap=True, unwrap=True)


def _target(s: Session, key_type: int, value: bytes) -> int:
    return secret_key(s, key_type, value, sensitive=True, encrypt=key_type == KeyType.AES)


@pytest.mark.parametrize("vendor,standard", [
    (M.CLOUDHSM_AES_KEY_WRAP_NO_PAD, M.AES_KEY_WRAP),
    (M.CLOUDHSM_AES_KEY_WRAP_PKCS5_PAD, M.AES_KEY_WRAP_PAD),  # RFC 5649: a README departure
    (M.CLOUDHSM_AES_KEY_WRAP_ZERO_PAD, M.AES_KEY_WRAP),
], ids=lambda m: M(m).name)
@pytest.mark.parametrize("size", [16, 32])
def test_aes_key_wrap(pair: tuple[Session, Session], vendor: int, standard: int, size: int) -> None:
    """hsmsim's vendor mechanism gives SoftHSM2's standard mechanism's bytes (length query,
    short buffer, retry), and each unwraps what the other wrapped."""
    soft, hsm = pair
    value = bytes(range(100, 100 + size))
    mech = {soft.name: standard, hsm.name: vendor}
    logs, wrapped, keys = [], {}, {}
    for s in pair:
        kek, target = _kek(s), _target(s, KeyType.AES, value)
        keys[s.name] = kek
        q = s.wrap(Mechanism(mech[s.name]), kek, target, None)
        short = s.wrap(Mechanism(mech[s.name]), kek, target, q.length - 1)
        out = s.wrap(Mechanism(mech[s.name]), kek, target, q.length)
        logs.append([rec(q), rec(short), rec(out)])
        wrapped[s.name] = out.data or b""
    assert logs[0] == logs[1]
    for s in pair:
        for origin in pair:
            rv, h = s.unwrap(Mechanism(mech[s.name]), keys[s.name], wrapped[origin.name], AES_TARGET)
            assert rv == 0, f"{s.name} unwrapping {origin.name}'s: {rv_name(rv)}"
            if s is hsm:  # SoftHSM2 2.6 leaves CKA_VALUE_LEN 0 on unwrapped keys
                assert s.attribute(h, A.VALUE_LEN) == size.to_bytes(8, "little")
            assert ecb_block(s, h) == ecb_block(soft, _target(soft, KeyType.AES, value))
    # corrupted and truncated wrapped keys
    errs = {}
    for s in pair:
        bad = bytearray(wrapped[s.name])
        bad[3] ^= 1
        errs[s.name] = [
            rv_name(s.unwrap(Mechanism(mech[s.name]), keys[s.name], bytes(bad), AES_TARGET)[0]),
            rv_name(s.unwrap(Mechanism(mech[s.name]), keys[s.name], wrapped[s.name][:-3],
                             AES_TARGET)[0])]
    expect_deviation("C_UnwrapKey(AES key wrap) of a corrupted wrapped key", errs["SoftHSM2"][0],
                     errs["hsmsim"][0])


def test_standard_aes_key_wrap_is_not_cloudhsms(pair: tuple[Session, Session]) -> None:
    out = {}
    for s in pair:
        kek, target = _kek(s), _target(s, KeyType.AES, bytes(16))
        out[s.name] = "/".join(rv_name(s.wrap(Mechanism(m), kek, target).rv)
                               for m in (M.AES_KEY_WRAP, M.AES_KEY_WRAP_PAD))
    expect("C_WrapKey with CKM_AES_KEY_WRAP, then CKM_AES_KEY_WRAP_PAD",
           out["SoftHSM2"], out["hsmsim"])


# -- RSA wraps -----------------------------------------------------------------------------------

def _oaep() -> Mechanism:
    return Mechanism(M.RSA_PKCS_OAEP, CK_RSA_PKCS_OAEP_PARAMS(M.SHA_1, 1, 1, None, 0))


@pytest.mark.parametrize("make", [lambda: Mechanism(M.RSA_PKCS), _oaep], ids=["RSA_PKCS", "RSA_PKCS_OAEP"])
def test_rsa_wrap_unwrap(pair: tuple[Session, Session], rsa_key: Any, make: Any) -> None:
    """Randomised: each module unwraps what the other wrapped, to the same key."""
    soft, hsm = pair
    value = bytes(range(7, 39))
    keys = {s.name: rsa_pair(s, rsa_key) for s in pair}
    wrapped, logs = {}, []
    for s in pair:
        target = _target(s, KeyType.AES, value)
        q = s.wrap(make(), keys[s.name][0], target, None)
        short = s.wrap(make(), keys[s.name][0], target, 16)
        out = s.wrap(make(), keys[s.name][0], target, q.length)
        logs.append([(rv_name(q.rv), q.length), (rv_name(short.rv), short.length), (rv_name(out.rv), out.length)])
        wrapped[s.name] = out.data or b""
    assert logs[0] == logs[1]
    want = ecb_block(soft, _target(soft, KeyType.AES, value))
    for s in pair:
        for origin in pair:
            rv, h = s.unwrap(make(), keys[s.name][1], wrapped[origin.name], AES_TARGET)
            assert rv == 0, f"{s.name} unwrapping {origin.name}'s: {rv_name(rv)}"
            assert ecb_block(s, h) == want
    errs = {s.name: rv_name(s.unwrap(make(), keys[s.name][1], wrapped[s.name][:-1], AES_TARGET)[0])
            for s in pair}
    expect_deviation("C_UnwrapKey(RSA) of a wrapped key shorter than the modulus",
                     errs["SoftHSM2"], errs["hsmsim"])


def test_rsa_aes_key_wrap_against_softhsm(pair: tuple[Session, Session], rsa_key: Any) -> None:
    """SoftHSM2 2.6 lacks CKM_RSA_AES_KEY_WRAP; it is RSA-OAEP of a fresh AES key followed by
    RFC 5649 of the target (PKCS#11 2.40 §2.1.21), so SoftHSM2 unwraps hsmsim's output in those
    two steps, and hsmsim unwraps the same two steps done by SoftHSM2."""
    soft, hsm = pair
    value = bytes(range(50, 82))
    oaep = CK_RSA_PKCS_OAEP_PARAMS(M.SHA_1, 1, 1, None, 0)

    def rsa_aes() -> Mechanism:
        return Mechanism(M.RSA_AES_KEY_WRAP, CK_RSA_AES_KEY_WRAP_PARAMS(256, ctypes.cast(
            ctypes.byref(oaep), ctypes.c_void_p)), oaep)

    hpub, hpriv = rsa_pair(hsm, rsa_key)
    spub, spriv = rsa_pair(soft, rsa_key)
    out = hsm.wrap(rsa_aes(), hpub, _target(hsm, KeyType.AES, value))
    assert out.rv == 0 and out.length == 256 + 40
    blob = out.data or b""
    rv, eph = soft.unwrap(_oaep(), spriv, blob[:256], [(A.CLASS, 4), (A.KEY_TYPE, KeyType.AES),
                                                       (A.TOKEN, False), (A.UNWRAP, True)])
    assert rv == 0, rv_name(rv)
    rv, h = soft.unwrap(Mechanism(M.AES_KEY_WRAP_PAD), eph, blob[256:], AES_TARGET)
    assert rv == 0, rv_name(rv)
    want = ecb_block(soft, _target(soft, KeyType.AES, value))
    assert ecb_block(soft, h) == want
    # the other way: SoftHSM2 builds the two parts; hsmsim unwraps them as one
    eph = secret_key(soft, KeyType.AES, bytes(range(200, 232)), wrap=True)
    part1 = soft.wrap(_oaep(), spub, eph)
    part2 = soft.wrap(Mechanism(M.AES_KEY_WRAP_PAD), eph, _target(soft, KeyType.AES, value))
    assert part1.rv == 0 and part2.rv == 0
    rv, h = hsm.unwrap(rsa_aes(), hpriv, (part1.data or b"") + (part2.data or b""), AES_TARGET)
    assert rv == 0, rv_name(rv)
    assert ecb_block(hsm, h) == want


# -- ECDH ----------------------------------------------------------------------------------------

def _ecdh(kdf: int, peer_point: bytes) -> Mechanism:
    buf = ctypes.create_string_buffer(peer_point, len(peer_point))
    p = CK_ECDH1_DERIVE_PARAMS(kdf, 0, None, len(peer_point), ctypes.cast(buf, ctypes.c_void_p))
    return Mechanism(M.ECDH1_DERIVE, p, buf)


def test_ecdh_derive(pair: tuple[Session, Session], ec_keys: tuple[Any, Any]) -> None:
    """SoftHSM2 derives the raw shared secret (CKD_NULL), hsmsim with CloudHSM's X9.63 SHA-256
    KDF: the X9.63 KDF of SoftHSM2's secret is hsmsim's key."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.x963kdf import X963KDF
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    soft, hsm = pair
    alice, bob = ec_keys
    bob_point = bob.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    _, s_priv = ec_pair(soft, alice)
    _, h_priv = ec_pair(hsm, alice)
    rv, z = soft.derive(_ecdh(CKD_NULL, bob_point), s_priv,
                        [(A.CLASS, 4), (A.KEY_TYPE, KeyType.GENERIC_SECRET), (A.TOKEN, False),
                         (A.VALUE_LEN, 32), (A.SENSITIVE, False), (A.EXTRACTABLE, True)])
    assert rv == 0, rv_name(rv)
    shared = soft.attribute(z, A.VALUE)
    expected = X963KDF(hashes.SHA256(), 32, None).derive(shared)
    template = [(A.CLASS, 4), (A.KEY_TYPE, KeyType.AES), (A.TOKEN, False), (A.VALUE_LEN, 32),
                (A.ENCRYPT, True), (A.DECRYPT, True)]
    rv, h = hsm.derive(_ecdh(CKD_CLOUDHSM_X963_SHA256_KDF, bob_point), h_priv, template)
    assert rv == 0, rv_name(rv)
    assert ecb_block(hsm, h) == ecb_block(soft, secret_key(soft, KeyType.AES, expected, encrypt=True))
    # the peer's side gives the same key
    _, h_bob = ec_pair(hsm, bob)
    alice_point = alice.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    rv, h2 = hsm.derive(_ecdh(CKD_CLOUDHSM_X963_SHA256_KDF, alice_point), h_bob, template)
    assert rv == 0 and ecb_block(hsm, h2) == ecb_block(hsm, h)
    # SoftHSM2 does not know CloudHSM's KDF
    x963 = rv_name(soft.derive(_ecdh(CKD_CLOUDHSM_X963_SHA256_KDF, bob_point), s_priv, template)[0])
    expect("C_DeriveKey(CKM_ECDH1_DERIVE, kdf CKD_CLOUDHSM_X963_SHA256_KDF)", x963, "CKR_OK")
    # errors both report alike: a point off the curve, a key without CKA_DERIVE
    bad_point = bob_point[:-1] + bytes([bob_point[-1] ^ 1])
    expect_deviation("C_DeriveKey(CKM_ECDH1_DERIVE) with a peer point off the curve",
                     rv_name(soft.derive(_ecdh(CKD_NULL, bad_point), s_priv, template)[0]),
                     rv_name(hsm.derive(_ecdh(CKD_CLOUDHSM_X963_SHA256_KDF, bad_point), h_priv,
                                        template)[0]))


def test_ecdh_without_a_kdf(pair: tuple[Session, Session], ec_keys: tuple[Any, Any]) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    alice, bob = ec_keys
    point = bob.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    template = [(A.CLASS, 4), (A.KEY_TYPE, KeyType.GENERIC_SECRET), (A.TOKEN, False),
                (A.VALUE_LEN, 32)]
    out = {s.name: rv_name(s.derive(_ecdh(CKD_NULL, point), ec_pair(s, alice)[1], template)[0])
           for s in pair}
    expect("C_DeriveKey(CKM_ECDH1_DERIVE, kdf CKD_NULL)", out["SoftHSM2"], out["hsmsim"])


def test_unwrap_of_a_truncated_aes_wrapped_key(pair: tuple[Session, Session]) -> None:
    soft, hsm = pair
    mech = {soft.name: M.AES_KEY_WRAP, hsm.name: M.CLOUDHSM_AES_KEY_WRAP_NO_PAD}
    out = []
    for s in pair:
        kek = _kek(s)
        wrapped = s.wrap(Mechanism(mech[s.name]), kek, _target(s, KeyType.AES, bytes(16))).data or b""
        out.append(rv_name(s.unwrap(Mechanism(mech[s.name]), kek, wrapped[:-3], AES_TARGET)[0]))
    assert out[0] == out[1]


def test_rsa_1024_is_below_cloudhsms_sizes(pair: tuple[Session, Session]) -> None:
    out = {}
    for s in pair:
        rv, _, _ = s.generate_key_pair(
            Mechanism(M.RSA_PKCS_KEY_PAIR_GEN),
            [(A.TOKEN, False), (A.MODULUS_BITS, 1024), (A.PUBLIC_EXPONENT, b"\x01\x00\x01"),
             (A.VERIFY, True)], [(A.TOKEN, False), (A.SIGN, True)])
        out[s.name] = rv_name(rv)
    expect("C_GenerateKeyPair(CKM_RSA_PKCS_KEY_PAIR_GEN) of 1024 bits", out["SoftHSM2"],
           out["hsmsim"])
