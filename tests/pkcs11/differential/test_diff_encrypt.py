"""Differential: symmetric and RSA encryption through SoftHSM2 and hsmsim with the same keys and
the same C call sequences: single- and multi-part, NULL-buffer length queries,
CKR_BUFFER_TOO_SMALL then a retry, and errors that end the operation."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from cloudhsm_differences import expect, expect_deviation
from hsmsim.pkcs11.constants import KeyType, Mechanism as M
from p11diff import (CK_AES_CTR_PARAMS, CK_GCM_PARAMS, CK_RSA_PKCS_OAEP_PARAMS, Mechanism, Out,
                     Session, rsa_pair, rv_name, secret_key)

AES_KEY = bytes(range(32))
DES3_KEY = bytes.fromhex("0123456789abcdeffedcba987654321089abcdef01234567")
AES_IV = bytes(range(100, 116))
DES_IV = bytes(range(8))


def _ctr() -> Mechanism:
    p = CK_AES_CTR_PARAMS()
    p.ulCounterBits = 32
    ctypes.memmove(p.cb, bytes(range(200, 212)) + b"\0\0\0\1", 16)
    return Mechanism(M.AES_CTR, p)


@dataclass(frozen=True)
class Case:
    mech: int
    key_type: int
    key: bytes
    make: Callable[[], Mechanism]
    block: int
    any_length: bool  # CBC-PAD and CTR take any length; ECB and CBC whole blocks

    def __str__(self) -> str:
        return M(self.mech).name


CASES = [
    Case(M.AES_ECB, KeyType.AES, AES_KEY, lambda: Mechanism(M.AES_ECB), 16, False),
    Case(M.AES_CBC, KeyType.AES, AES_KEY, lambda: Mechanism(M.AES_CBC, AES_IV), 16, False),
    Case(M.AES_CBC_PAD, KeyType.AES, AES_KEY, lambda: Mechanism(M.AES_CBC_PAD, AES_IV), 16, True),
    Case(M.AES_CTR, KeyType.AES, AES_KEY, _ctr, 16, True),
    Case(M.DES3_ECB, KeyType.DES3, DES3_KEY, lambda: Mechanism(M.DES3_ECB), 8, False),
    Case(M.DES3_CBC, KeyType.DES3, DES3_KEY, lambda: Mechanism(M.DES3_CBC, DES_IV), 8, False),
    Case(M.DES3_CBC_PAD, KeyType.DES3, DES3_KEY, lambda: Mechanism(M.DES3_CBC_PAD, DES_IV), 8, True),
]
COVERED = {c.mech for c in CASES} | {M.AES_GCM, M.RSA_X_509, M.RSA_PKCS, M.RSA_PKCS_OAEP}


def rec(o: Out) -> tuple[str, int | None, str | None]:
    """rv, length, output. After an error other than CKR_BUFFER_TOO_SMALL the length the
    module wrote back is unspecified (PKCS#11 §5.2), so it is not compared."""
    length = o.length if o.rv in (0, 0x150) else None
    return rv_name(o.rv), length, o.data.hex() if o.data is not None else None


def suffices(o: Out, needed: int) -> tuple[str, str]:
    """A length query where PKCS#11 §5.2 lets the module answer "a number of bytes which would
    suffice", slightly more than the output (CBC-PAD and RSA decryption: SoftHSM2 answers the
    input length, hsmsim the exact one): compared as "enough"."""
    return rv_name(o.rv), "suffices" if o.length >= needed else f"too small: {o.length}"


def _bounded(c: Case, op: str) -> bool:
    return op == "Decrypt" and c.mech in (M.AES_CBC_PAD, M.DES3_CBC_PAD)


def _key(s: Session, c: Case) -> int:
    return secret_key(s, c.key_type, c.key, encrypt=True, decrypt=True)


def single_part(s: Session, c: Case, op: str, data: bytes, out_len: int) -> list[Any]:
    """Init; NULL length query; a buffer one byte short of the `out_len` output
    (CKR_BUFFER_TOO_SMALL, the operation goes on); the retry with the reported length."""
    key = _key(s, c)
    log: list[Any] = [rv_name(s.init(op, c.make(), key))]
    q = s.call(f"C_{op}", data, None)
    log.append(suffices(q, out_len) if _bounded(c, op) else rec(q))
    if q.rv == 0 and q.length > 0:
        short = s.call(f"C_{op}", data, out_len - 1)
        log.append(suffices(short, out_len) if _bounded(c, op) else rec(short))
        log.append(rec(s.call(f"C_{op}", data, short.length or q.length)))
    # the operation is over: a further call finds none
    log.append(rv_name(s.call(f"C_{op}Update", b"x" * c.block, 64).rv))
    return log


def multi_part(s: Session, c: Case, op: str, parts: list[bytes]) -> list[Any]:
    """Init; per part a NULL length query, then (for the second part) a short buffer, then the
    exact buffer; Final the same way."""
    key = _key(s, c)
    log: list[Any] = [rv_name(s.init(op, c.make(), key))]
    for i, part in enumerate(parts):
        q = s.call(f"C_{op}Update", part, None)
        if i == 1 and q.rv == 0 and q.length > 0 and not _bounded(c, op):
            log.append(("short", rec(s.call(f"C_{op}Update", part, q.length - 1))))
        out = s.call(f"C_{op}Update", part, max(q.length, 0))
        log.append(("query", suffices(q, out.length) if _bounded(c, op) else rec(q)))
        log.append(("update", rec(out)))
    q = s.final(f"C_{op}Final", None)
    if q.rv == 0 and q.length > 0 and not _bounded(c, op):
        log.append(("final-short", rec(s.final(f"C_{op}Final", q.length - 1))))
    out = s.final(f"C_{op}Final", q.length)
    log.append(("final-query", suffices(q, out.length) if _bounded(c, op) else rec(q)))
    log.append(("final", rec(out)))
    log.append(("after", rv_name(s.call(f"C_{op}Update", b"x" * c.block, 64).rv)))
    return log


def _data(c: Case, n_blocks: int, extra: int) -> bytes:
    return bytes((7 * i + 3) & 0xFF for i in range(n_blocks * c.block + (extra if c.any_length else 0)))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_single_part_encrypt_and_decrypt(pair: tuple[Session, Session], case: Case) -> None:
    soft, hsm = pair
    data = _data(case, 3, 5)
    n = len(data) // case.block * case.block + case.block if case.mech in (
        M.AES_CBC_PAD, M.DES3_CBC_PAD) else len(data)
    enc = [single_part(s, case, "Encrypt", data, n) for s in pair]
    assert enc[0] == enc[1]
    ciphertext = bytes.fromhex(enc[0][-2][2])
    dec = [single_part(s, case, "Decrypt", ciphertext, len(data)) for s in pair]
    assert dec[0] == dec[1]
    assert bytes.fromhex(dec[0][-2][2]) == data


@pytest.mark.parametrize("case", CASES, ids=str)
def test_multi_part_encrypt_and_decrypt(pair: tuple[Session, Session], case: Case) -> None:
    data = _data(case, 6, 3)
    b = case.block
    parts = [data[:5], data[5:5 + 2 * b + 1], b"", data[5 + 2 * b + 1:]]
    enc = [multi_part(s, case, "Encrypt", parts) for s in pair]
    assert enc[0] == enc[1]
    ciphertext = b"".join(bytes.fromhex(e[1][2]) for e in enc[0] if e[0] in ("update", "final")
                          and e[1][2])
    cparts = [ciphertext[:b], ciphertext[b:b + 3], ciphertext[b + 3:]]
    dec = [multi_part(s, case, "Decrypt", cparts) for s in pair]
    assert dec[0] == dec[1]
    plaintext = b"".join(bytes.fromhex(e[1][2]) for e in dec[0] if e[0] in ("update", "final")
                         and e[1][2])
    assert plaintext == data


@pytest.mark.parametrize("case", CASES, ids=str)
def test_an_error_ends_the_operation(pair: tuple[Session, Session], case: Case) -> None:
    """PKCS#11 §5.2: any error but CKR_BUFFER_TOO_SMALL ends the operation."""
    def seq(s: Session) -> list[Any]:
        key = _key(s, case)
        log: list[Any] = []
        if case.any_length and case.mech in (M.AES_CBC_PAD, M.DES3_CBC_PAD):
            # a ciphertext whose padding is wrong: CKR_ENCRYPTED_DATA_INVALID
            raw = Mechanism(M.AES_CBC if case.block == 16 else M.DES3_CBC,
                            AES_IV if case.block == 16 else DES_IV)
            log.append(rv_name(s.init("Encrypt", raw, key)))
            bad = s.call("C_Encrypt", b"\x07" * case.block * 2, case.block * 2)
            log.append(rec(bad))
            log.append(rv_name(s.init("Decrypt", case.make(), key)))
            log.append(rec(s.call("C_Decrypt", bad.data or b"", 64)))
            log.append(rv_name(s.call("C_DecryptUpdate", b"x" * case.block, 64).rv))
        elif not case.any_length:
            # a length that is not whole blocks
            log.append(rv_name(s.init("Encrypt", case.make(), key)))
            log.append(rec(s.call("C_Encrypt", b"x" * (case.block + 1), 64)))
            log.append(rv_name(s.call("C_EncryptUpdate", b"x" * case.block, 64).rv))
            log.append(rv_name(s.init("Decrypt", case.make(), key)))
            log.append(rec(s.call("C_Decrypt", b"x" * (case.block - 1), 64)))
            log.append(rv_name(s.call("C_DecryptUpdate", b"x" * case.block, 64).rv))
            log.append(rv_name(s.init("Encrypt", case.make(), key)))
            log.append(rec(s.call("C_EncryptUpdate", b"x" * (case.block + 1), 64)))
            log.append(rec(s.final("C_EncryptFinal", 64)))
            log.append(rv_name(s.call("C_EncryptUpdate", b"x" * case.block, 64).rv))
        # a key without CKA_ENCRYPT: the Init fails and no operation starts
        weak = secret_key(s, case.key_type, case.key, decrypt=True)
        log.append(rv_name(s.init("Encrypt", case.make(), weak)))
        log.append(rv_name(s.call("C_EncryptUpdate", b"x" * case.block, 64).rv))
        return log

    soft, hsm = (seq(s) for s in pair)
    assert soft == hsm


# -- AES-GCM -------------------------------------------------------------------------------------

def _gcm(iv: Any, aad: bytes = b"aad") -> tuple[Mechanism, Any]:
    p = CK_GCM_PARAMS()
    p.pIv = ctypes.cast(iv, ctypes.c_void_p)
    p.ulIvLen, p.ulIvBits = 12, 96
    aad_buf = ctypes.create_string_buffer(aad, len(aad))
    p.pAAD, p.ulAADLen, p.ulTagBits = ctypes.cast(aad_buf, ctypes.c_void_p), len(aad), 128
    return Mechanism(M.AES_GCM, p, iv, aad_buf), p


def test_aes_gcm_with_the_hsm_iv(pair: tuple[Session, Session]) -> None:
    """hsmsim draws the IV (CloudHSM does); SoftHSM2 encrypting with that same IV gives the same
    ciphertext and tag, with the same length queries and short-buffer retries."""
    soft, hsm = pair
    data = bytes(range(45))
    logs: list[list[Any]] = []
    bad_tag: dict[str, str] = {}
    iv_used = None
    for s in (hsm, soft):
        key = secret_key(s, KeyType.AES, AES_KEY, encrypt=True, decrypt=True)
        iv = ctypes.create_string_buffer(iv_used or bytes(12), 12)
        mech, _ = _gcm(iv)
        log: list[Any] = [rv_name(s.init("Encrypt", mech, key))]
        q = s.call("C_Encrypt", data, None)
        log.append(rec(q))
        log.append(rec(s.call("C_Encrypt", data, q.length - 1)))
        out = s.call("C_Encrypt", data, q.length)
        log.append(rec(out))
        iv_used = iv.raw
        assert iv_used != bytes(12) or s is soft
        mech, _ = _gcm(ctypes.create_string_buffer(iv_used, 12))
        log.append(rv_name(s.init("Decrypt", mech, key)))
        q = s.call("C_Decrypt", out.data or b"", None)
        log.append(("query-at-least", q.rv, q.length >= len(data)))
        log.append(rec(s.call("C_Decrypt", out.data or b"", q.length)))
        # a wrong tag: CKR_ENCRYPTED_DATA_INVALID, and the operation is over
        bad = bytearray(out.data or b"")
        bad[-1] ^= 1
        log.append(rv_name(s.init("Decrypt", mech, key)))
        bad_tag[s.name] = rv_name(s.call("C_Decrypt", bytes(bad), q.length).rv)
        log.append(rv_name(s.call("C_Decrypt", bytes(bad), q.length).rv))
        logs.append(log)
    assert logs[0] == logs[1]
    expect_deviation("C_Decrypt(CKM_AES_GCM) with a wrong tag", bad_tag["SoftHSM2"],
                     bad_tag["hsmsim"])


def test_aes_gcm_documented_differences(pair: tuple[Session, Session]) -> None:
    soft, hsm = pair
    results: dict[str, list[str]] = {}
    for s in pair:
        key = secret_key(s, KeyType.AES, AES_KEY, encrypt=True, decrypt=True)
        mech, _ = _gcm(ctypes.create_string_buffer(b"\1" * 12, 12))
        caller_iv = rv_name(s.init("Encrypt", mech, key))
        if caller_iv == "CKR_OK":
            s.call("C_Encrypt", b"x" * 16, 64)
        mech, _ = _gcm(ctypes.create_string_buffer(bytes(12), 12))
        assert s.init("Encrypt", mech, key) == 0
        update = rv_name(s.call("C_EncryptUpdate", b"x" * 16, 64).rv)
        s.final("C_EncryptFinal", 64)
        results[s.name] = [caller_iv, update]
    expect("C_EncryptInit(CKM_AES_GCM) with a caller-chosen non-zero IV",
           results["SoftHSM2"][0], results["hsmsim"][0])
    expect("C_EncryptUpdate / C_DecryptUpdate with CKM_AES_GCM",
           results["SoftHSM2"][1], results["hsmsim"][1])


def test_aes_cbc_data_limit_is_documented(pair: tuple[Session, Session]) -> None:
    case = CASES[1]
    out = {s.name: rv_name(s.one_shot("Encrypt", case.make(), _key(s, case), b"\0" * 16288).rv)
           for s in pair}
    expect("C_Encrypt(CKM_AES_CBC) of more than 16,272 bytes", out["SoftHSM2"], out["hsmsim"])
    # at the limit both agree
    at = [rec(s.one_shot("Encrypt", case.make(), _key(s, case), b"\0" * 16272)) for s in pair]
    assert at[0] == at[1]


# -- RSA -----------------------------------------------------------------------------------------

def _oaep() -> Mechanism:
    # SHA-1 with MGF1-SHA1 (CloudHSM takes SHA-1..SHA-512, reference §1.4 footnote 4; SoftHSM2
    # 2.6 only SHA-1), no label
    p = CK_RSA_PKCS_OAEP_PARAMS(M.SHA_1, 1, 1, None, 0)
    return Mechanism(M.RSA_PKCS_OAEP, p)


def test_rsa_encryption(pair: tuple[Session, Session], rsa_key: Any) -> None:
    """CKM_RSA_X_509 is deterministic (compared byte for byte); CKM_RSA_PKCS and OAEP are
    randomised, so each side decrypts what the other encrypted."""
    keys = {s.name: rsa_pair(s, rsa_key) for s in pair}
    raw = b"\0" + bytes(range(1, 256))
    x509 = [rec(s.one_shot("Encrypt", Mechanism(M.RSA_X_509), keys[s.name][0], raw)) for s in pair]
    assert x509[0] == x509[1]
    for make in (lambda: Mechanism(M.RSA_PKCS), _oaep):
        for a, b in (pair, pair[::-1]):
            ct = a.one_shot("Encrypt", make(), keys[a.name][0], b"secret")
            assert (ct.rv, ct.length) == (0, 256)
            logs = []
            for s in (a, b):
                log: list[Any] = [rv_name(s.init("Decrypt", make(), keys[s.name][1]))]
                q = s.call("C_Decrypt", ct.data or b"", None)
                log.append(suffices(q, 6))
                log.append(suffices(s.call("C_Decrypt", ct.data or b"", 3), 6))  # too small
                log.append(rec(s.call("C_Decrypt", ct.data or b"", q.length)))
                logs.append(log)
            assert logs[0] == logs[1]
            assert logs[0][-1][2] == b"secret".hex()
        # a single-part mechanism: C_EncryptUpdate is refused (with another code)
        upd, after = {}, {}
        for s in pair:
            assert s.init("Encrypt", make(), keys[s.name][0]) == 0
            upd[s.name] = rv_name(s.call("C_EncryptUpdate", b"abc", 512).rv)
            after[s.name] = rv_name(s.call("C_Encrypt", b"abc", 512).rv)
        expect("C_EncryptUpdate with a single-part-only mechanism (CKM_RSA_PKCS, CKM_RSA_PKCS_OAEP)",
               upd["SoftHSM2"], upd["hsmsim"])
        expect_deviation("C_Encrypt after a C_EncryptUpdate that returned an error",
                         after["SoftHSM2"], after["hsmsim"])
