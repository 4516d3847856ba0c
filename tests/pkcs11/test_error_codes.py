"""Return codes SoftHSM2 gets wrong, as a client of the module sees them (the node's table in
hsmsim/node/softhsm_rv.py): a bad CBC-PAD padding is CKR_ENCRYPTED_DATA_INVALID and a ciphertext
of the wrong length CKR_ENCRYPTED_DATA_LEN_RANGE (PKCS#11 2.40 §5.9), never CKR_GENERAL_ERROR,
single- and multi-part; the failed operation is over afterwards."""

from __future__ import annotations

from ctypes import byref, c_ulong, create_string_buffer

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from hsmsim.pkcs11.constants import RV, Attribute as A, KeyType, Mechanism as M, ObjectClass
from p11helpers import REF_PIN
from p11raw import Raw, mechanism, open_session, template

U = c_ulong
KEY, IV = bytes(range(16)), bytes(range(100, 116))


def _key(raw: Raw, h: int) -> int:
    t, _keep = template((A.CLASS, ObjectClass.SECRET_KEY), (A.KEY_TYPE, KeyType.AES), (A.VALUE, KEY),
                        (A.ENCRYPT, True), (A.DECRYPT, True))
    out = U()
    assert raw.C_CreateObject(U(h), t, U(5), byref(out)) == RV.OK
    return out.value


def _cbc(data: bytes) -> bytes:
    e = Cipher(algorithms.AES(KEY), modes.CBC(IV)).encryptor()
    return e.update(data) + e.finalize()


GOOD_PT = b"a message of 21 bytes"
GOOD = _cbc(GOOD_PT + bytes([11]) * 11)  # PKCS#7 padding: 11 bytes of 11
BAD_PADDING = _cbc(b"0123456789abcdef" + b"fifteen bytes.." + b"\x00")  # last byte 0: not PKCS#7


def _decrypt(raw: Raw, h: int, key: int, data: bytes) -> tuple[int, bytes]:
    mech, _keep = mechanism(M.AES_CBC_PAD, IV)
    assert raw.C_DecryptInit(U(h), byref(mech), U(key)) == RV.OK
    out, n = create_string_buffer(len(data) + 16), U(len(data) + 16)
    rv = raw.C_Decrypt(U(h), data, U(len(data)), out, byref(n))
    return int(rv), out.raw[:n.value]


@pytest.mark.parametrize("data, want", [
    (GOOD, RV.OK),
    (BAD_PADDING, RV.ENCRYPTED_DATA_INVALID),
    (GOOD[:-1], RV.ENCRYPTED_DATA_LEN_RANGE),
    (GOOD[:16], RV.ENCRYPTED_DATA_INVALID),  # one whole block whose padding is wrong
    (b"", RV.ENCRYPTED_DATA_LEN_RANGE),  # CBC-PAD ciphertext is at least one block
], ids=["good", "bad-padding", "not-a-block-multiple", "truncated-to-a-block", "empty"])
def test_single_part_cbc_pad_decrypt(live: Raw, data: bytes, want: int) -> None:
    h = open_session(live, REF_PIN)
    key = _key(live, h)
    rv, pt = _decrypt(live, h, key, data)
    assert rv == want
    if want == RV.OK:
        assert pt == GOOD_PT
    else:
        # Any error but CKR_BUFFER_TOO_SMALL ends the operation (PKCS#11 2.40 §5.9).
        n = U(64)
        assert live.C_Decrypt(U(h), data, U(len(data)), create_string_buffer(64), byref(n)) \
            == RV.OPERATION_NOT_INITIALIZED
    # The key and session still work.
    assert _decrypt(live, h, key, GOOD) == (RV.OK, GOOD_PT)


def test_multi_part_cbc_pad_bad_padding_fails_at_final(live: Raw) -> None:
    h = open_session(live, REF_PIN)
    key = _key(live, h)
    mech, _keep = mechanism(M.AES_CBC_PAD, IV)
    assert live.C_DecryptInit(U(h), byref(mech), U(key)) == RV.OK
    out, n = create_string_buffer(64), U(64)
    assert live.C_DecryptUpdate(U(h), BAD_PADDING, U(len(BAD_PADDING)), out, byref(n)) == RV.OK
    assert out.raw[:n.value] == b"0123456789abcdef"  # every block but the last (held back)
    n = U(64)
    assert live.C_DecryptFinal(U(h), out, byref(n)) == RV.ENCRYPTED_DATA_INVALID
    n = U(64)
    assert live.C_DecryptFinal(U(h), out, byref(n)) == RV.OPERATION_NOT_INITIALIZED
