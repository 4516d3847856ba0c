"""The one table that turns a SoftHSM2 return value into the one the node answers: every CK_RV
SoftHSM2 gives reaches a client only through `client_rv`, looked up by (PKCS#11 function,
mechanism, SoftHSM2 return value); `check_input` refuses the one input SoftHSM2 answers in a
way no row can tell apart.

SoftHSM2 is the node's engine, not the HSM a client talks to, so its codes are translated
where SoftHSM2 2.6.1 answers differently from PKCS#11 2.40, and where a code describes the
node's own token, session or login (which the client neither sees nor caused). Lookup goes from
the most to the least specific row: (function, mechanism), then (function, any mechanism),
then (any function, any mechanism); a code in no row (vendor-defined ones included) is
CKR_DEVICE_ERROR. Pure data and one lookup; no I/O."""

from __future__ import annotations

from hsmsim.pkcs11.constants import RV, Mechanism as M
from hsmsim.pkcs11.errors import Pkcs11Error

ANY = None
Key = tuple[str | None, int | None, int]

# Codes that mean the same to the client as to the node: about the client's data, template,
# key or mechanism, or the HSM's resources. They pass unchanged.
PASS = frozenset({
    RV.ATTRIBUTE_READ_ONLY, RV.ATTRIBUTE_SENSITIVE, RV.ATTRIBUTE_TYPE_INVALID,
    RV.ATTRIBUTE_VALUE_INVALID, RV.CURVE_NOT_SUPPORTED, RV.DATA_INVALID, RV.DATA_LEN_RANGE,
    RV.DEVICE_ERROR, RV.DEVICE_MEMORY, RV.DOMAIN_PARAMS_INVALID, RV.ENCRYPTED_DATA_INVALID,
    RV.ENCRYPTED_DATA_LEN_RANGE, RV.FUNCTION_FAILED, RV.GENERAL_ERROR, RV.HOST_MEMORY,
    RV.KEY_FUNCTION_NOT_PERMITTED, RV.KEY_HANDLE_INVALID, RV.KEY_NOT_WRAPPABLE, RV.KEY_SIZE_RANGE,
    RV.KEY_TYPE_INCONSISTENT, RV.KEY_UNEXTRACTABLE, RV.MECHANISM_INVALID,
    RV.MECHANISM_PARAM_INVALID, RV.OBJECT_HANDLE_INVALID, RV.RANDOM_NO_RNG, RV.SIGNATURE_INVALID,
    RV.SIGNATURE_LEN_RANGE, RV.TEMPLATE_INCOMPLETE, RV.TEMPLATE_INCONSISTENT,
    RV.UNWRAPPING_KEY_HANDLE_INVALID, RV.UNWRAPPING_KEY_SIZE_RANGE,
    RV.UNWRAPPING_KEY_TYPE_INCONSISTENT, RV.WRAPPED_KEY_INVALID, RV.WRAPPED_KEY_LEN_RANGE,
    RV.WRAPPING_KEY_HANDLE_INVALID, RV.WRAPPING_KEY_SIZE_RANGE, RV.WRAPPING_KEY_TYPE_INCONSISTENT,
})

# Codes about the node's own SoftHSM2 library, token, sessions, login or call arguments. A
# client given CKR_SESSION_HANDLE_INVALID or CKR_USER_NOT_LOGGED_IN would drop its own session
# or log in again for nothing: to it they are a fault of the HSM, CKR_DEVICE_ERROR.
INTERNAL = frozenset({
    RV.ARGUMENTS_BAD, RV.BUFFER_TOO_SMALL, RV.CANT_LOCK, RV.CRYPTOKI_ALREADY_INITIALIZED,
    RV.CRYPTOKI_NOT_INITIALIZED, RV.FUNCTION_NOT_SUPPORTED, RV.NEED_TO_CREATE_THREADS,
    RV.OPERATION_ACTIVE, RV.OPERATION_NOT_INITIALIZED, RV.PIN_EXPIRED, RV.PIN_INCORRECT,
    RV.PIN_INVALID, RV.PIN_LEN_RANGE, RV.PIN_LOCKED, RV.SESSION_CLOSED, RV.SESSION_COUNT,
    RV.SESSION_EXISTS, RV.SESSION_HANDLE_INVALID, RV.SESSION_PARALLEL_NOT_SUPPORTED,
    RV.SESSION_READ_ONLY, RV.SESSION_READ_ONLY_EXISTS, RV.SESSION_READ_WRITE_SO_EXISTS,
    RV.SLOT_ID_INVALID, RV.TOKEN_NOT_PRESENT, RV.TOKEN_NOT_RECOGNIZED, RV.TOKEN_WRITE_PROTECTED,
    RV.USER_ALREADY_LOGGED_IN, RV.USER_ANOTHER_ALREADY_LOGGED_IN, RV.USER_NOT_LOGGED_IN,
    RV.USER_PIN_NOT_INITIALIZED, RV.USER_TOO_MANY_TYPES, RV.USER_TYPE_INVALID,
})
DEFAULT = RV.DEVICE_ERROR

# Decryptions that check padding or the value's range: SoftHSM2 2.6.1 answers a bad padding
# (and, for RSA, a value out of range) with CKR_GENERAL_ERROR where PKCS#11 2.40 §5.9 says
# CKR_ENCRYPTED_DATA_INVALID. Wrong lengths get CKR_ENCRYPTED_DATA_LEN_RANGE from SoftHSM2.
PADDED_DECRYPT = (M.AES_CBC_PAD, M.DES3_CBC_PAD, M.RSA_PKCS, M.RSA_PKCS_OAEP, M.RSA_X_509)
# Mechanisms whose parameter is an IV: SoftHSM2 answers a missing IV with CKR_ARGUMENTS_BAD and
# one of the wrong length with CKR_MECHANISM_INVALID; PKCS#11 2.40 says
# CKR_MECHANISM_PARAM_INVALID for both (the node has already accepted the mechanism itself).
IV_MECHANISMS = (M.AES_CBC, M.AES_CBC_PAD, M.DES3_CBC, M.DES3_CBC_PAD)
INITS = ("C_EncryptInit", "C_DecryptInit")
# SoftHSM2 answers a key that is gone from its token with CKR_OBJECT_HANDLE_INVALID; for a
# call given one key PKCS#11 2.40 says CKR_KEY_HANDLE_INVALID (the object's client handle is
# still that key's).
KEY_CALLS = ("C_EncryptInit", "C_DecryptInit", "C_SignInit", "C_VerifyInit", "C_DeriveKey")

TABLE: dict[Key, int] = {
    **{(ANY, ANY, rv): int(rv) for rv in PASS},
    **{(ANY, ANY, rv): int(RV.DEVICE_ERROR) for rv in INTERNAL},
    **{("C_Decrypt", m, RV.GENERAL_ERROR): int(RV.ENCRYPTED_DATA_INVALID) for m in PADDED_DECRYPT},
    **{(fn, m, rv): int(RV.MECHANISM_PARAM_INVALID)
       for fn in INITS for m in IV_MECHANISMS for rv in (RV.ARGUMENTS_BAD, RV.MECHANISM_INVALID)},
    **{(fn, ANY, RV.OBJECT_HANDLE_INVALID): int(RV.KEY_HANDLE_INVALID) for fn in KEY_CALLS},
}


# SoftHSM2 2.6.1 checks only that a CBC-PAD ciphertext is a multiple of the block, so an empty
# one also gets CKR_GENERAL_ERROR, which the table would call a bad padding; PKCS#11 2.40 says
# CKR_ENCRYPTED_DATA_LEN_RANGE (at least one block). It is refused before SoftHSM2 sees it.
NONEMPTY_INPUT = {("C_Decrypt", M.AES_CBC_PAD), ("C_Decrypt", M.DES3_CBC_PAD)}


def check_input(function: str, mechanism: int, length: int) -> None:
    """Refuse, with PKCS#11's code, an input SoftHSM2 would answer with a misleading one."""
    if length == 0 and (function, mechanism) in NONEMPTY_INPUT:
        raise Pkcs11Error(RV.ENCRYPTED_DATA_LEN_RANGE, "a CBC-PAD ciphertext is at least one block")


def client_rv(function: str, mechanism: int | None, rv: int) -> int:
    """The return value the node answers for SoftHSM2's `rv` from `function` (a PKCS#11
    function name, e.g. "C_Decrypt") on `mechanism` (None where the call has none)."""
    for key in ((function, mechanism, rv), (function, ANY, rv), (ANY, ANY, rv)):
        if key in TABLE:
            return TABLE[key]
    return int(DEFAULT)
