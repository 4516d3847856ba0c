"""The one table of behaviours in which CloudHSM (and so hsmsim) documentedly differs from
SoftHSM2 for the same PKCS#11 call sequence. The differential suite compares everything else
exactly; a test that meets one of these differences asserts the two observed results named here
(`expect`), so a row that stops being true fails too. Each row names its row of
../shared/reference/cloudhsm.md (section, and the fidelity-checklist row where there is one)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Difference:
    what: str  # the call sequence
    softhsm: str  # what SoftHSM2 returns
    cloudhsm: str  # what CloudHSM returns, and hsmsim with it
    reference: str  # the row of ../shared/reference/cloudhsm.md


DIFFERENCES: dict[str, Difference] = {d.what: d for d in (
    Difference("C_EncryptInit(CKM_AES_GCM) with a caller-chosen non-zero IV",
               "CKR_OK", "CKR_MECHANISM_PARAM_INVALID",
               "§1.4 footnote [1] and 'SDK 5 error log ... Expect IV to be all 0' (checklist 8)"),
    Difference("C_EncryptUpdate / C_DecryptUpdate with CKM_AES_GCM",
               "CKR_OK", "CKR_MECHANISM_INVALID",
               "§1.4 'No multipart AES-GCM' and §1.8 item 7 (checklist 11)"),
    Difference("C_Encrypt(CKM_AES_CBC) of more than 16,272 bytes",
               "CKR_OK", "CKR_DATA_LEN_RANGE",
               "§1.4 footnote [2] table (checklist 12); the code is not documented"),
    Difference("C_GetMechanismInfo(CKM_AES_CBC / CKM_DES3_CBC) flags",
               "CKF_ENCRYPT|CKF_DECRYPT|CKF_WRAP", "CKF_ENCRYPT|CKF_DECRYPT",
               "§1.4 'Wrap / unwrap' list (no CBC) (checklist 16)"),
    Difference("C_GetMechanismInfo(CKM_AES_GCM) flags",
               "CKF_ENCRYPT|CKF_DECRYPT", "CKF_ENCRYPT|CKF_DECRYPT|CKF_WRAP|CKF_UNWRAP",
               "§1.4 'Wrap / unwrap' list (CKM_AES_GCM) (checklist 16)"),
    Difference("C_WrapKey with CKM_AES_KEY_WRAP, then CKM_AES_KEY_WRAP_PAD",
               "CKR_OK/CKR_OK", "CKR_MECHANISM_INVALID/CKR_MECHANISM_INVALID",
               "§1.4 'Wrap / unwrap': only the vendor CKM_CLOUDHSM_AES_KEY_WRAP_* (checklist 35)"),
    Difference("C_DeriveKey(CKM_ECDH1_DERIVE, kdf CKD_NULL)",
               "CKR_OK", "CKR_MECHANISM_PARAM_INVALID",
               "§1.4 'Derive': ECDH only with CKD_CLOUDHSM_X963_SHA*_KDF (checklist 36)"),
    Difference("C_DeriveKey(CKM_ECDH1_DERIVE, kdf CKD_CLOUDHSM_X963_SHA256_KDF)",
               "CKR_MECHANISM_PARAM_INVALID", "CKR_OK",
               "§1.4 'Derive': ECDH only with CKD_CLOUDHSM_X963_SHA*_KDF (checklist 36)"),
    Difference("C_EncryptUpdate with a single-part-only mechanism (CKM_RSA_PKCS, CKM_RSA_PKCS_OAEP)",
               "CKR_FUNCTION_NOT_SUPPORTED", "CKR_MECHANISM_INVALID",
               "§1.4 Encrypt/decrypt 'single-part only', with the code §1.4 'No multipart AES-GCM' "
               "gives for Update (checklist 11, 13)"),
    Difference("C_SignUpdate with a single-part-only mechanism (CKM_RSA_PKCS, CKM_RSA_PKCS_PSS, "
               "CKM_ECDSA)", "CKR_OPERATION_NOT_INITIALIZED", "CKR_MECHANISM_INVALID",
               "§1.4 Sign/verify 'single-part only', with the code §1.4 'No multipart AES-GCM' "
               "gives for Update (checklist 13)"),
    Difference("C_SignUpdate with CKM_RSA_X_509", "CKR_OPERATION_NOT_INITIALIZED", "CKR_OK",
               "§1.4 Sign/verify: CKM_RSA_X_509 is listed without 'single-part only' (checklist 13)"),
    Difference("C_FindObjectsInit while a find is active", "CKR_OPERATION_ACTIVE", "CKR_OK",
               "§1.8 item 10 'Incorrect sequence of function calls gives undefined results "
               "instead of failing' (checklist 25)"),
    Difference("C_GetAttributeValue(CKA_ALLOWED_MECHANISMS) of a key",
               "CKR_OK/0", "CKR_ATTRIBUTE_TYPE_INVALID/UNAVAILABLE",
               "§1.6 'AWS CloudHSM does not support all attributes' and its community note: "
               "CKR_ATTRIBUTE_TYPE_INVALID for unsupported types (checklist 23)"),
    Difference("CKA_SENSITIVE / CKA_EXTRACTABLE of a generated secret key left to their defaults",
               "00/00", "01/01",
               "§1.6 SDK 3 attribute table defaults: CKA_SENSITIVE True, CKA_EXTRACTABLE True "
               "(checklist 20)"),
    Difference("C_GenerateKeyPair(CKM_RSA_PKCS_KEY_PAIR_GEN) of 1024 bits", "CKR_OK",
               "CKR_KEY_SIZE_RANGE", "§1.5 'RSA 2048 to 4096 bits in increments of 256' "
               "(checklist 18)"),
)}


@dataclass(frozen=True)
class OracleDeviation:
    """Where SoftHSM2 2.6 itself departs from PKCS#11 2.40: hsmsim is held to the standard."""

    what: str
    softhsm: str
    standard: str
    reference: str  # the clause of PKCS#11 2.40


SOFTHSM_DEVIATIONS: dict[str, OracleDeviation] = {d.what: d for d in (
    OracleDeviation("C_UnwrapKey(AES key wrap) of a corrupted wrapped key", "CKR_GENERAL_ERROR",
                    "CKR_WRAPPED_KEY_INVALID", "PKCS#11 2.40 base §5.14 C_UnwrapKey return values; "
                    "§2.14 RFC 3394 integrity check"),
    OracleDeviation("C_DeriveKey(CKM_ECDH1_DERIVE) with a peer point off the curve",
                    "CKR_GENERAL_ERROR", "CKR_MECHANISM_PARAM_INVALID",
                    "PKCS#11 2.40 base §5.14 C_DeriveKey return values (the point is the "
                    "mechanism parameter)"),
    OracleDeviation("C_UnwrapKey(RSA) of a wrapped key shorter than the modulus",
                    "CKR_GENERAL_ERROR", "CKR_WRAPPED_KEY_LEN_RANGE",
                    "PKCS#11 2.40 base §5.14 C_UnwrapKey return values"),
    OracleDeviation("C_Decrypt(CKM_AES_GCM) with a wrong tag", "CKR_GENERAL_ERROR",
                    "CKR_ENCRYPTED_DATA_INVALID",
                    "PKCS#11 2.40 current mechanisms §2.11.x GCM / base §5.2 (issue 11 defect 8)"),
    OracleDeviation("C_Encrypt after a C_EncryptUpdate that returned an error", "CKR_OK",
                    "CKR_OPERATION_NOT_INITIALIZED",
                    "PKCS#11 2.40 base §5.8 C_EncryptUpdate: 'A call to C_EncryptUpdate which "
                    "results in an error terminates the current encryption operation'"),
)}


def expect_deviation(what: str, softhsm: str, hsmsim: str) -> None:
    """SoftHSM2 answers as its known deviation says and hsmsim as PKCS#11 says."""
    row = SOFTHSM_DEVIATIONS[what]
    assert (softhsm, hsmsim) == (row.softhsm, row.standard), (
        f"{what!r}: expected SoftHSM2 {row.softhsm} (its deviation) and hsmsim {row.standard} "
        f"({row.reference}); saw SoftHSM2 {softhsm}, hsmsim {hsmsim}")


def expect(what: str, softhsm: str, cloudhsm: str) -> None:
    """Asserts that the observed pair is exactly the documented difference `what`."""
    row = DIFFERENCES[what]
    assert (softhsm, cloudhsm) == (row.softhsm, row.cloudhsm), (
        f"documented difference {what!r} ({row.reference}): expected SoftHSM2 {row.softhsm}, "
        f"hsmsim {row.cloudhsm}; saw SoftHSM2 {softhsm}, hsmsim {cloudhsm}")
