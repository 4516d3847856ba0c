"""ctypes access to the module's C_* functions, for tests of argument checks and length
conventions that python-pkcs11 never exercises (NULL pointers, bad lengths)."""

from __future__ import annotations

import ctypes
from ctypes import POINTER, Structure, byref, c_ubyte, c_ulong, c_void_p
from pathlib import Path

CK_ULONG = c_ulong


class CK_VERSION(Structure):
    _fields_ = [("major", c_ubyte), ("minor", c_ubyte)]


class CK_MECHANISM(Structure):
    _fields_ = [("mechanism", CK_ULONG), ("pParameter", c_void_p), ("ulParameterLen", CK_ULONG)]


class CK_ATTRIBUTE(Structure):
    _fields_ = [("type", CK_ULONG), ("pValue", c_void_p), ("ulValueLen", CK_ULONG)]


class CK_GCM_PARAMS(Structure):
    _fields_ = [("pIv", c_void_p), ("ulIvLen", CK_ULONG), ("ulIvBits", CK_ULONG),
                ("pAAD", c_void_p), ("ulAADLen", CK_ULONG), ("ulTagBits", CK_ULONG)]


class CK_C_INITIALIZE_ARGS(Structure):
    _fields_ = [("CreateMutex", c_void_p), ("DestroyMutex", c_void_p), ("LockMutex", c_void_p),
                ("UnlockMutex", c_void_p), ("flags", CK_ULONG), ("pReserved", c_void_p)]


class CK_SESSION_INFO(Structure):
    _fields_ = [("slotID", CK_ULONG), ("state", CK_ULONG), ("flags", CK_ULONG), ("ulDeviceError", CK_ULONG)]


FUNCTION_NAMES = """C_Initialize C_Finalize C_GetInfo C_GetFunctionList C_GetSlotList C_GetSlotInfo
C_GetTokenInfo C_GetMechanismList C_GetMechanismInfo C_InitToken C_InitPIN C_SetPIN C_OpenSession
C_CloseSession C_CloseAllSessions C_GetSessionInfo C_GetOperationState C_SetOperationState C_Login
C_Logout C_CreateObject C_CopyObject C_DestroyObject C_GetObjectSize C_GetAttributeValue
C_SetAttributeValue C_FindObjectsInit C_FindObjects C_FindObjectsFinal C_EncryptInit C_Encrypt
C_EncryptUpdate C_EncryptFinal C_DecryptInit C_Decrypt C_DecryptUpdate C_DecryptFinal C_DigestInit
C_Digest C_DigestUpdate C_DigestKey C_DigestFinal C_SignInit C_Sign C_SignUpdate C_SignFinal
C_SignRecoverInit C_SignRecover C_VerifyInit C_Verify C_VerifyUpdate C_VerifyFinal
C_VerifyRecoverInit C_VerifyRecover C_DigestEncryptUpdate C_DecryptDigestUpdate C_SignEncryptUpdate
C_DecryptVerifyUpdate C_GenerateKey C_GenerateKeyPair C_WrapKey C_UnwrapKey C_DeriveKey C_SeedRandom
C_GenerateRandom C_GetFunctionStatus C_CancelFunction C_WaitForSlotEvent""".split()


class FunctionList(Structure):
    _fields_ = [("version", CK_VERSION)] + [(n, c_void_p) for n in FUNCTION_NAMES]


class Raw:
    """The module's exported functions, every argument passed as an integer or pointer."""

    def __init__(self, path: Path) -> None:
        self.dll = ctypes.CDLL(str(path))

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        fn = getattr(self.dll, name)
        fn.restype = CK_ULONG
        return fn


def ulong(v: int = 0) -> c_ulong:
    return c_ulong(v)


__all__ = ["Raw", "CK_MECHANISM", "CK_ATTRIBUTE", "CK_GCM_PARAMS", "CK_C_INITIALIZE_ARGS",
           "CK_SESSION_INFO", "FunctionList", "FUNCTION_NAMES", "ulong", "byref", "POINTER", "c_void_p"]


def open_session(raw: Raw, pin: str | None = None, flags: int = 0x6) -> int:
    """C_OpenSession (+ C_Login as CU when `pin`), asserting success."""
    h = c_ulong()
    assert raw.C_OpenSession(c_ulong(1), c_ulong(flags), None, None, byref(h)) == 0
    if pin is not None:
        p = pin.encode()
        assert raw.C_Login(h, c_ulong(1), p, c_ulong(len(p))) == 0
    return h.value


def login(raw: Raw, h: int, pin: str, user_type: int = 1) -> int:
    p = pin.encode()
    return int(raw.C_Login(c_ulong(h), c_ulong(user_type), p, c_ulong(len(p))))


def state(raw: Raw, h: int) -> int:
    info = CK_SESSION_INFO()
    rv = raw.C_GetSessionInfo(c_ulong(h), byref(info))
    return int(info.state) if rv == 0 else -int(rv)


def template(*items: tuple[int, object]) -> tuple[ctypes.Array[CK_ATTRIBUTE], list[object]]:
    """A CK_ATTRIBUTE array from (type, value) with bool -> CK_BBOOL, int -> CK_ULONG, bytes."""
    keep: list[object] = []
    arr = (CK_ATTRIBUTE * len(items))()
    for i, (t, v) in enumerate(items):
        if isinstance(v, bool):
            buf: object = ctypes.c_ubyte(1 if v else 0)
            size = 1
        elif isinstance(v, int):
            buf = c_ulong(v)
            size = 8
        else:
            assert isinstance(v, (bytes, str))
            raw_bytes = v.encode() if isinstance(v, str) else v
            buf = ctypes.create_string_buffer(raw_bytes, len(raw_bytes))
            size = len(raw_bytes)
        keep.append(buf)
        arr[i] = CK_ATTRIBUTE(t, ctypes.cast(ctypes.byref(buf), c_void_p), size)  # type: ignore[arg-type]
    return arr, keep


def mechanism(mech: int, param: object = None) -> tuple[CK_MECHANISM, object]:
    if param is None:
        return CK_MECHANISM(mech, None, 0), None
    if isinstance(param, bytes):
        buf = ctypes.create_string_buffer(param, len(param))
        return CK_MECHANISM(mech, ctypes.cast(buf, c_void_p), len(param)), buf
    return CK_MECHANISM(mech, ctypes.cast(ctypes.byref(param), c_void_p), ctypes.sizeof(param)), param  # type: ignore[arg-type]
