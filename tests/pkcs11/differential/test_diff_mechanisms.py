"""Differential: the mechanism lists and C_GetMechanismInfo of SoftHSM2 and hsmsim, and the
suite's coverage: every mechanism on CloudHSM's list (hsmsim/pkcs11/mechanisms.py) that SoftHSM2
also has is exercised by one of the differential tests."""

from __future__ import annotations

import pytest

import test_diff_encrypt
import test_diff_keys
import test_diff_sign
from cloudhsm_differences import expect
from hsmsim.pkcs11.constants import Mechanism as M, MechanismFlag as F
from hsmsim.pkcs11.mechanisms import MECHANISMS
from p11diff import Session, rv_name

FUNCTION_FLAGS = (F.ENCRYPT | F.DECRYPT | F.DIGEST | F.SIGN | F.VERIFY | F.GENERATE
                  | F.GENERATE_KEY_PAIR | F.WRAP | F.UNWRAP | F.DERIVE)
FLAG_DIFFERENCES = {M.AES_CBC: "C_GetMechanismInfo(CKM_AES_CBC / CKM_DES3_CBC) flags",
                    M.DES3_CBC: "C_GetMechanismInfo(CKM_AES_CBC / CKM_DES3_CBC) flags",
                    M.AES_GCM: "C_GetMechanismInfo(CKM_AES_GCM) flags"}


def _flags(v: int) -> str:
    return "|".join(f"CKF_{f.name}" for f in F if f & FUNCTION_FLAGS and v & f)


def test_every_shared_mechanism_is_covered(pair: tuple[Session, Session]) -> None:
    soft, hsm = pair
    shared = soft.mechanisms() & hsm.mechanisms() & set(MECHANISMS)
    covered = test_diff_encrypt.COVERED | test_diff_sign.COVERED | test_diff_keys.COVERED
    missing = sorted(M(m).name for m in shared - covered)
    assert not missing, f"CloudHSM mechanisms SoftHSM2 has that no differential test uses: {missing}"
    assert hsm.mechanisms() == set(MECHANISMS)  # CloudHSM's list exactly (reference §1.4)


def test_mechanism_info(pair: tuple[Session, Session]) -> None:
    """Same functions (CKF_ENCRYPT ... CKF_DERIVE) for every shared mechanism, but for the
    documented differences; AES key sizes agree (RSA and DES3 differ by CloudHSM's key sizes,
    reference §1.5, and are not compared)."""
    soft, hsm = pair
    mismatched = []
    for m in sorted(soft.mechanisms() & hsm.mechanisms()):
        (ra, ia), (rb, ib) = soft.mechanism_info(m), hsm.mechanism_info(m)
        assert (ra, rb) == (0, 0), (M(m).name, rv_name(ra), rv_name(rb))
        fa, fb = _flags(ia.flags), _flags(ib.flags)
        if m in FLAG_DIFFERENCES:
            expect(FLAG_DIFFERENCES[m], fa, fb)
        elif fa != fb:
            mismatched.append((M(m).name, fa, fb))
        if M(m).name.startswith("AES_"):
            assert (ia.ulMinKeySize, ia.ulMaxKeySize) == (ib.ulMinKeySize, ib.ulMaxKeySize), M(m).name
    assert not mismatched


@pytest.mark.parametrize("mech", [0x7FFF1234, M.AES_KEY_WRAP], ids=["unknown", "AES_KEY_WRAP"])
def test_mechanism_info_of_an_unlisted_mechanism(hsm: Session, mech: int) -> None:
    assert rv_name(hsm.mechanism_info(mech)[0]) == "CKR_MECHANISM_INVALID"
