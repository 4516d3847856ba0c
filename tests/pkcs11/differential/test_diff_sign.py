"""Differential: digests, HMAC, CMAC, RSA and ECDSA signatures through SoftHSM2 and hsmsim with
the same keys: single- and multi-part, length queries, short buffers and retries, failed
verifications ending the operation; randomised signatures are verified across modules."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from cloudhsm_differences import expect
from hsmsim.pkcs11.constants import KeyType, Mechanism as M
from p11diff import (CK_RSA_PKCS_PSS_PARAMS, Mechanism, Out, Session, ec_pair, rsa_pair, rv_name,
                     secret_key)

HMAC_KEY = bytes(range(64))  # SoftHSM2 wants at least the hash size; CloudHSM takes 1..800 bytes
CMAC_KEY = bytes(range(16))
DATA = bytes((5 * i) & 0xFF for i in range(300))
PARTS = [DATA[:1], DATA[1:64], b"", DATA[64:]]
HASHES = {M.SHA_1: "sha1", M.SHA224: "sha224", M.SHA256: "sha256", M.SHA384: "sha384",
          M.SHA512: "sha512"}
MGF = {M.SHA_1: 1, M.SHA224: 5, M.SHA256: 2, M.SHA384: 3, M.SHA512: 4}


def rec(o: Out) -> tuple[str, int | None, str | None]:
    length = o.length if o.rv in (0, 0x150) else None
    return rv_name(o.rv), length, o.data.hex() if o.data is not None else None


def digest_log(s: Session, mech: int) -> list[Any]:
    log: list[Any] = [rv_name(s.init("Digest", Mechanism(mech)))]
    q = s.call("C_Digest", DATA, None)
    log += [rec(q), rec(s.call("C_Digest", DATA, q.length - 1)), rec(s.call("C_Digest", DATA, q.length))]
    log.append(rv_name(s.update("C_DigestUpdate", b"x")))  # over
    log.append(rv_name(s.init("Digest", Mechanism(mech))))
    log += [rv_name(s.update("C_DigestUpdate", p)) for p in PARTS]
    q = s.final("C_DigestFinal", None)
    log += [rec(q), rec(s.final("C_DigestFinal", q.length - 1)), rec(s.final("C_DigestFinal", q.length))]
    return log


@pytest.mark.parametrize("mech", list(HASHES), ids=lambda m: M(m).name)
def test_digest(pair: tuple[Session, Session], mech: int) -> None:
    soft, hsm = (digest_log(s, mech) for s in pair)
    assert soft == hsm
    assert soft[3][2] == hashlib.new(HASHES[mech], DATA).hexdigest()


@dataclass(frozen=True)
class SignCase:
    mech: int
    key: str  # hmac, cmac, rsa, ec
    make: Callable[[], Mechanism]
    deterministic: bool
    multi_part: bool
    data: bytes = DATA

    def __str__(self) -> str:
        return M(self.mech).name


def _pss(mech: int, h: int) -> Callable[[], Mechanism]:
    return lambda: Mechanism(mech, CK_RSA_PKCS_PSS_PARAMS(h, MGF[h], hashlib.new(HASHES[h]).digest_size))


HMACS = [M.SHA_1_HMAC, M.SHA224_HMAC, M.SHA256_HMAC, M.SHA384_HMAC, M.SHA512_HMAC]
RSA_PKCS_HASHED = [M.SHA1_RSA_PKCS, M.SHA224_RSA_PKCS, M.SHA256_RSA_PKCS, M.SHA384_RSA_PKCS,
                   M.SHA512_RSA_PKCS]
RSA_PSS_HASHED = dict(zip([M.SHA1_RSA_PKCS_PSS, M.SHA224_RSA_PKCS_PSS, M.SHA256_RSA_PKCS_PSS,
                           M.SHA384_RSA_PKCS_PSS, M.SHA512_RSA_PKCS_PSS], HASHES))
CASES = (
    [SignCase(m, "hmac", (lambda m=m: Mechanism(m)), True, True) for m in HMACS]
    + [SignCase(M.AES_CMAC, "cmac", lambda: Mechanism(M.AES_CMAC), True, True)]
    + [SignCase(m, "rsa", (lambda m=m: Mechanism(m)), True, True) for m in RSA_PKCS_HASHED]
    + [SignCase(m, "rsa", _pss(m, h), False, True) for m, h in RSA_PSS_HASHED.items()]
    + [SignCase(M.RSA_PKCS, "rsa", lambda: Mechanism(M.RSA_PKCS), True, False, DATA[:40]),
       SignCase(M.RSA_X_509, "rsa", lambda: Mechanism(M.RSA_X_509), True, False, b"\0" + DATA[:255]),
       SignCase(M.RSA_PKCS_PSS, "rsa", _pss(M.RSA_PKCS_PSS, M.SHA256), False, False,
                hashlib.sha256(DATA).digest()),
       SignCase(M.ECDSA, "ec", lambda: Mechanism(M.ECDSA), False, False, hashlib.sha256(DATA).digest())]
)
COVERED = set(HASHES) | {c.mech for c in CASES}


def _keys(s: Session, case: SignCase, rsa_key: Any, ec_key: Any) -> tuple[int, int]:
    """(signing key, verifying key)"""
    if case.key == "hmac":
        k = secret_key(s, KeyType.GENERIC_SECRET, HMAC_KEY, sign=True, verify=True)
        return k, k
    if case.key == "cmac":
        k = secret_key(s, KeyType.AES, CMAC_KEY, sign=True, verify=True)
        return k, k
    pub, priv = rsa_pair(s, rsa_key) if case.key == "rsa" else ec_pair(s, ec_key)
    return priv, pub


def sign_log(s: Session, case: SignCase, sk: int) -> tuple[list[Any], bytes]:
    log: list[Any] = [rv_name(s.init("Sign", case.make(), sk))]
    q = s.call("C_Sign", case.data, None)
    short = s.call("C_Sign", case.data, q.length - 1)
    out = s.call("C_Sign", case.data, q.length)
    for o in (q, short, out):
        log.append(rec(o) if case.deterministic else (rv_name(o.rv), o.length))
    log.append(rv_name(s.update("C_SignUpdate", b"x")))  # the operation is over
    return log, out.data or b""


def verify_log(s: Session, case: SignCase, vk: int, sig: bytes) -> list[Any]:
    log: list[Any] = [rv_name(s.init("Verify", case.make(), vk)), rv_name(s.verify(case.data, sig))]
    bad = bytearray(sig)
    bad[len(bad) // 2] ^= 0x40
    log.append(rv_name(s.init("Verify", case.make(), vk)))
    log.append(rv_name(s.verify(case.data, bytes(bad))))
    log.append(rv_name(s.update("C_VerifyUpdate", b"x")))  # ended by the failure
    log.append(rv_name(s.init("Verify", case.make(), vk)))
    log.append(rv_name(s.verify(case.data, sig[:-1])))  # wrong length
    return log


def multi_log(s: Session, case: SignCase, sk: int, vk: int, sig: bytes) -> list[Any]:
    log: list[Any] = [rv_name(s.init("Sign", case.make(), sk))]
    log += [rv_name(s.update("C_SignUpdate", p)) for p in PARTS]
    q = s.final("C_SignFinal", None)
    short = s.final("C_SignFinal", q.length - 1)
    out = s.final("C_SignFinal", q.length)
    for o in (q, short, out):
        log.append(rec(o) if case.deterministic else (rv_name(o.rv), o.length))
    log.append(rv_name(s.init("Verify", case.make(), vk)))
    log += [rv_name(s.update("C_VerifyUpdate", p)) for p in PARTS]
    log.append(rv_name(s.verify_final(sig)))
    log.append(rv_name(s.init("Verify", case.make(), vk)))
    log += [rv_name(s.update("C_VerifyUpdate", p)) for p in PARTS]
    log.append(rv_name(s.verify_final(sig[:-1] + bytes([sig[-1] ^ 1]))))
    log.append(rv_name(s.update("C_VerifyUpdate", b"x")))
    return log


@pytest.mark.parametrize("case", CASES, ids=str)
def test_sign_and_verify(pair: tuple[Session, Session], case: SignCase, rsa_key: Any,
                         ec_keys: tuple[Any, Any]) -> None:
    keys = {s.name: _keys(s, case, rsa_key, ec_keys[0]) for s in pair}
    signed = {s.name: sign_log(s, case, keys[s.name][0]) for s in pair}
    assert signed["SoftHSM2"][0] == signed["hsmsim"][0]
    # each module verifies both signatures (its own and the other's)
    for s in pair:
        for origin in pair:
            v = verify_log(s, case, keys[s.name][1], signed[origin.name][1])
            assert v == verify_log(origin, case, keys[origin.name][1], signed[origin.name][1]), (
                f"{s.name} verifying {origin.name}'s signature")
            assert v[1] == "CKR_OK"
    if case.multi_part:
        sig = signed["SoftHSM2"][1]
        multi = {s.name: multi_log(s, case, *keys[s.name], sig) for s in pair}
        assert multi["SoftHSM2"] == multi["hsmsim"]
        if case.deterministic:
            assert multi["SoftHSM2"][7][2] == sig.hex()
    else:
        upd = {}
        for s in pair:
            assert s.init("Sign", case.make(), keys[s.name][0]) == 0
            upd[s.name] = rv_name(s.update("C_SignUpdate", case.data))
            s.call("C_Sign", case.data, 512)
        expect("C_SignUpdate with CKM_RSA_X_509" if case.mech == M.RSA_X_509 else
               "C_SignUpdate with a single-part-only mechanism (CKM_RSA_PKCS, CKM_RSA_PKCS_PSS, "
               "CKM_ECDSA)", upd["SoftHSM2"], upd["hsmsim"])


@pytest.mark.parametrize("mech", [M.ECDSA_SHA1, M.ECDSA_SHA224, M.ECDSA_SHA256, M.ECDSA_SHA384,
                                  M.ECDSA_SHA512], ids=lambda m: M(m).name)
def test_ecdsa_with_hash_against_softhsm_ecdsa(pair: tuple[Session, Session], mech: int,
                                               ec_keys: tuple[Any, Any]) -> None:
    """SoftHSM2 2.6 lacks CKM_ECDSA_SHA*: hsmsim's signature (single- and multi-part) must verify
    with SoftHSM2's CKM_ECDSA over the digest, and SoftHSM2's over the digest with hsmsim's."""
    soft, hsm = pair
    hname = {M.ECDSA_SHA1: "sha1", M.ECDSA_SHA224: "sha224", M.ECDSA_SHA256: "sha256",
             M.ECDSA_SHA384: "sha384", M.ECDSA_SHA512: "sha512"}[mech]
    digest = hashlib.new(hname, DATA).digest()
    spub, spriv = ec_pair(soft, ec_keys[0])
    hpub, hpriv = ec_pair(hsm, ec_keys[0])
    single = hsm.one_shot("Sign", Mechanism(mech), hpriv, DATA)
    assert (single.rv, single.length) == (0, 64)
    assert hsm.init("Sign", Mechanism(mech), hpriv) == 0
    assert [hsm.update("C_SignUpdate", p) for p in PARTS] == [0] * len(PARTS)
    multi = hsm.final("C_SignFinal", 64)
    assert (multi.rv, multi.length) == (0, 64)
    for sig in (single.data or b"", multi.data or b""):
        assert soft.init("Verify", Mechanism(M.ECDSA), spub) == 0
        assert soft.verify(digest, sig) == 0
    theirs = soft.one_shot("Sign", Mechanism(M.ECDSA), spriv, digest)
    assert hsm.init("Verify", Mechanism(mech), hpub) == 0
    assert hsm.verify(DATA, theirs.data or b"") == 0
