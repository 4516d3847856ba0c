"""A thin ctypes binding to SoftHSM2's PKCS#11 library for this node's one token.

It initialises the library with CKF_OS_LOCKING_OK (python-pkcs11's C_Initialize(NULL) turns
SoftHSM2's locking off), initialises or opens the token, logs in once as the token user, and
gives each calling thread its own read-write session. Calls release the GIL. Every CK_RV other
than CKR_OK becomes a Pkcs11Error with the return value hsmsim.node.softhsm_rv's table gives
it (the one place SoftHSM2's codes are translated); messages never carry data.

SOFTHSM2_CONF must be set before `SoftHsm.load` (SoftHSM2 reads it once, at C_Initialize)."""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Iterable, Sequence
from ctypes import (Structure, byref, c_char, c_char_p, c_ubyte, c_ulong, c_void_p,
                    create_string_buffer)
from pathlib import Path
from typing import Any

from hsmsim.node.softhsm_rv import check_input, client_rv
from hsmsim.pkcs11.constants import RV, UserType
from hsmsim.pkcs11.errors import Pkcs11Error
from hsmsim.pkcs11.params import (CtrParams, Ecdh1Params, GcmParams, MechanismSpec, OaepParams,
                                  PssParams, RawParams)

CK_ULONG = c_ulong
CKF_OS_LOCKING_OK = 0x2
CKF_RW_SESSION = 0x2
CKF_SERIAL_SESSION = 0x4
CKF_TOKEN_INITIALIZED = 0x400
CKF_USER_PIN_INITIALIZED = 0x8

RawTemplate = Sequence[tuple[int, bytes]]


class CK_ATTRIBUTE(Structure):
    _fields_ = [("type", CK_ULONG), ("pValue", c_void_p), ("ulValueLen", CK_ULONG)]


class CK_MECHANISM(Structure):
    _fields_ = [("mechanism", CK_ULONG), ("pParameter", c_void_p), ("ulParameterLen", CK_ULONG)]


class CK_C_INITIALIZE_ARGS(Structure):
    _fields_ = [("CreateMutex", c_void_p), ("DestroyMutex", c_void_p), ("LockMutex", c_void_p),
                ("UnlockMutex", c_void_p), ("flags", CK_ULONG), ("pReserved", c_void_p)]


class CK_VERSION(Structure):
    _fields_ = [("major", c_ubyte), ("minor", c_ubyte)]


class CK_TOKEN_INFO(Structure):
    _fields_ = [("label", c_char * 32), ("manufacturerID", c_char * 32), ("model", c_char * 16),
                ("serialNumber", c_char * 16), ("flags", CK_ULONG),
                ("ulMaxSessionCount", CK_ULONG), ("ulSessionCount", CK_ULONG),
                ("ulMaxRwSessionCount", CK_ULONG), ("ulRwSessionCount", CK_ULONG),
                ("ulMaxPinLen", CK_ULONG), ("ulMinPinLen", CK_ULONG),
                ("ulTotalPublicMemory", CK_ULONG), ("ulFreePublicMemory", CK_ULONG),
                ("ulTotalPrivateMemory", CK_ULONG), ("ulFreePrivateMemory", CK_ULONG),
                ("hardwareVersion", CK_VERSION), ("firmwareVersion", CK_VERSION),
                ("utcTime", c_char * 16)]


class CK_GCM_PARAMS(Structure):
    _fields_ = [("pIv", c_void_p), ("ulIvLen", CK_ULONG), ("ulIvBits", CK_ULONG),
                ("pAAD", c_void_p), ("ulAADLen", CK_ULONG), ("ulTagBits", CK_ULONG)]


class CK_RSA_PKCS_OAEP_PARAMS(Structure):
    _fields_ = [("hashAlg", CK_ULONG), ("mgf", CK_ULONG), ("source", CK_ULONG),
                ("pSourceData", c_void_p), ("ulSourceDataLen", CK_ULONG)]


class CK_RSA_PKCS_PSS_PARAMS(Structure):
    _fields_ = [("hashAlg", CK_ULONG), ("mgf", CK_ULONG), ("sLen", CK_ULONG)]


class CK_AES_CTR_PARAMS(Structure):
    _fields_ = [("ulCounterBits", CK_ULONG), ("cb", c_ubyte * 16)]


class CK_ECDH1_DERIVE_PARAMS(Structure):
    _fields_ = [("kdf", CK_ULONG), ("ulSharedDataLen", CK_ULONG), ("pSharedData", c_void_p),
                ("ulPublicDataLen", CK_ULONG), ("pPublicData", c_void_p)]


CKZ_DATA_SPECIFIED = 1
_FUNCTIONS = (
    "C_Initialize", "C_Finalize", "C_GetSlotList", "C_GetTokenInfo", "C_InitToken", "C_InitPIN",
    "C_OpenSession", "C_CloseSession", "C_Login", "C_Logout", "C_CreateObject", "C_DestroyObject",
    "C_GetAttributeValue", "C_SetAttributeValue", "C_FindObjectsInit", "C_FindObjects",
    "C_FindObjectsFinal", "C_EncryptInit", "C_Encrypt", "C_DecryptInit", "C_Decrypt",
    "C_DigestInit", "C_Digest", "C_SignInit", "C_Sign", "C_VerifyInit", "C_Verify",
    "C_GenerateKey", "C_GenerateKeyPair", "C_WrapKey", "C_UnwrapKey", "C_DeriveKey",
    "C_GenerateRandom")


def _buf(data: bytes) -> Any:
    """A ctypes buffer holding a copy of data; never NULL, even for empty data (SoftHSM2
    answers CKR_ARGUMENTS_BAD to a NULL pointer even with length 0)."""
    return create_string_buffer(data, len(data)) if data else create_string_buffer(1)


def _addr(buf: Any) -> int | None:
    return ctypes.addressof(buf) if buf is not None else None


class _Args:
    """Keeps the ctypes buffers of one call's arguments alive until the call returns."""

    def __init__(self) -> None:
        self.keep: list[Any] = []

    def bytes_(self, data: bytes) -> Any:
        b = _buf(data)
        self.keep.append(b)
        return b

    def template(self, attrs: RawTemplate) -> tuple[Any, int]:
        arr = (CK_ATTRIBUTE * max(len(attrs), 1))()
        for i, (attr, raw) in enumerate(attrs):
            b = self.bytes_(raw)
            arr[i].type = attr
            arr[i].pValue = _addr(b)
            arr[i].ulValueLen = len(raw)
        self.keep.append(arr)
        return arr, len(attrs)

    def mechanism(self, spec: MechanismSpec) -> Any:
        mech = CK_MECHANISM()
        mech.mechanism = int(spec.mechanism)
        p = spec.param
        param: Any = None
        if p is None:
            pass
        elif isinstance(p, GcmParams):
            iv = self.bytes_(p.iv)
            aad = self.bytes_(p.aad) if p.aad else None
            param = CK_GCM_PARAMS(_addr(iv), len(p.iv), len(p.iv) * 8, _addr(aad), len(p.aad),
                                  p.tag_bits)
        elif isinstance(p, OaepParams):
            label = self.bytes_(p.label) if p.label else None
            param = CK_RSA_PKCS_OAEP_PARAMS(p.hash_alg, p.mgf, CKZ_DATA_SPECIFIED, _addr(label),
                                            len(p.label))
        elif isinstance(p, PssParams):
            param = CK_RSA_PKCS_PSS_PARAMS(p.hash_alg, p.mgf, p.salt_len)
        elif isinstance(p, CtrParams):
            if len(p.cb) != 16:
                raise Pkcs11Error(RV.MECHANISM_PARAM_INVALID, "CTR counter block must be 16 bytes")
            param = CK_AES_CTR_PARAMS(p.counter_bits, (c_ubyte * 16)(*p.cb))
        elif isinstance(p, Ecdh1Params):
            # No shared data must be a NULL pointer (SoftHSM2 refuses any other with CKD_NULL).
            shared = self.bytes_(p.shared_data) if p.shared_data else None
            pub = self.bytes_(p.public_data)
            param = CK_ECDH1_DERIVE_PARAMS(p.kdf, len(p.shared_data), _addr(shared),
                                           len(p.public_data), _addr(pub))
        elif isinstance(p, RawParams):
            raw = self.bytes_(p.data)
            mech.pParameter = _addr(raw)
            mech.ulParameterLen = len(p.data)
        else:
            raise Pkcs11Error(RV.MECHANISM_PARAM_INVALID, "unsupported mechanism parameter")
        if param is not None:
            self.keep.append(param)
            mech.pParameter = ctypes.addressof(param)
            mech.ulParameterLen = ctypes.sizeof(param)
        self.keep.append(mech)
        return mech


def _check(rv: int, what: str, mechanism: int | None = None) -> None:
    """Raise for a SoftHSM2 failure of `what` (a PKCS#11 function name), with the return value
    the client gets: translated by the one table in hsmsim.node.softhsm_rv."""
    if rv != 0:
        raise Pkcs11Error(client_rv(what, mechanism, rv),
                          f"SoftHSM2 {what} failed (SoftHSM2 CK_RV 0x{rv:x})")


class SoftHsm:
    """SoftHSM2 loaded in this process, with one logged-in token and a session per thread."""

    def __init__(self, lib: ctypes.CDLL, slot: int, user_pin: bytes) -> None:
        self._lib = lib
        self._slot = slot
        self._user_pin = user_pin
        self._local = threading.local()
        self._all_sessions: list[int] = []
        self._lock = threading.Lock()

    # -- set-up ------------------------------------------------------------------------------------

    @classmethod
    def load(cls, library: Path, label: str, so_pin: bytes, user_pin: bytes) -> "SoftHsm":
        """Load and initialise SoftHSM2 with OS locking, initialise the token (label) if no
        initialised token exists yet, and log in as its user."""
        lib = ctypes.CDLL(str(library))
        for name in _FUNCTIONS:
            getattr(lib, name).restype = CK_ULONG
        args = CK_C_INITIALIZE_ARGS(None, None, None, None, CKF_OS_LOCKING_OK, None)
        rv = lib.C_Initialize(byref(args))
        if rv not in (0, int(RV.CRYPTOKI_ALREADY_INITIALIZED)):
            _check(rv, "C_Initialize")
        slot = cls._find_or_init(lib, label, so_pin, user_pin)
        hsm = cls(lib, slot, user_pin)
        session = hsm.session()
        rv = lib.C_Login(CK_ULONG(session), CK_ULONG(int(UserType.USER)), c_char_p(user_pin),
                         CK_ULONG(len(user_pin)))
        if rv not in (0, int(RV.USER_ALREADY_LOGGED_IN)):
            _check(rv, "C_Login")
        return hsm

    @staticmethod
    def _slots(lib: ctypes.CDLL) -> list[int]:
        count = CK_ULONG(0)
        _check(lib.C_GetSlotList(ctypes.c_ubyte(1), None, byref(count)), "C_GetSlotList")
        arr = (CK_ULONG * max(count.value, 1))()
        _check(lib.C_GetSlotList(ctypes.c_ubyte(1), arr, byref(count)), "C_GetSlotList")
        return [int(arr[i]) for i in range(count.value)]

    @staticmethod
    def _token_info(lib: ctypes.CDLL, slot: int) -> CK_TOKEN_INFO:
        info = CK_TOKEN_INFO()
        _check(lib.C_GetTokenInfo(CK_ULONG(slot), byref(info)), "C_GetTokenInfo")
        return info

    @classmethod
    def _find_or_init(cls, lib: ctypes.CDLL, label: str, so_pin: bytes, user_pin: bytes) -> int:
        slots = cls._slots(lib)
        for slot in slots:
            info = cls._token_info(lib, slot)
            if info.flags & CKF_TOKEN_INITIALIZED:
                return slot
        if not slots:
            raise Pkcs11Error(RV.TOKEN_NOT_PRESENT, "SoftHSM2 offers no slot")
        slot = slots[0]
        padded = label.encode()[:32].ljust(32, b" ")
        _check(lib.C_InitToken(CK_ULONG(slot), c_char_p(so_pin), CK_ULONG(len(so_pin)),
                               c_char_p(padded)), "C_InitToken")
        h = CK_ULONG(0)
        _check(lib.C_OpenSession(CK_ULONG(slot), CK_ULONG(CKF_SERIAL_SESSION | CKF_RW_SESSION),
                                 None, None, byref(h)), "C_OpenSession")
        try:
            _check(lib.C_Login(h, CK_ULONG(int(UserType.SO)), c_char_p(so_pin),
                               CK_ULONG(len(so_pin))), "C_Login(SO)")
            _check(lib.C_InitPIN(h, c_char_p(user_pin), CK_ULONG(len(user_pin))), "C_InitPIN")
            lib.C_Logout(h)
        finally:
            lib.C_CloseSession(h)
        return slot

    def session(self) -> int:
        """This thread's read-write session (opened on first use)."""
        h: int | None = getattr(self._local, "session", None)
        if h is None:
            out = CK_ULONG(0)
            _check(self._lib.C_OpenSession(CK_ULONG(self._slot),
                                           CK_ULONG(CKF_SERIAL_SESSION | CKF_RW_SESSION),
                                           None, None, byref(out)), "C_OpenSession")
            h = int(out.value)
            self._local.session = h
            with self._lock:
                self._all_sessions.append(h)
        return h

    def finalize(self) -> None:
        self._lib.C_Finalize(None)

    # -- objects -----------------------------------------------------------------------------------

    def generate_key(self, mech: MechanismSpec, template: RawTemplate) -> int:
        a = _Args()
        m = a.mechanism(mech)
        t, n = a.template(template)
        out = CK_ULONG(0)
        _check(self._lib.C_GenerateKey(CK_ULONG(self.session()), byref(m), t, CK_ULONG(n),
                                       byref(out)), "C_GenerateKey")
        return int(out.value)

    def generate_key_pair(self, mech: MechanismSpec, public: RawTemplate,
                          private: RawTemplate) -> tuple[int, int]:
        a = _Args()
        m = a.mechanism(mech)
        pt, pn = a.template(public)
        st, sn = a.template(private)
        pub, priv = CK_ULONG(0), CK_ULONG(0)
        _check(self._lib.C_GenerateKeyPair(CK_ULONG(self.session()), byref(m), pt, CK_ULONG(pn),
                                           st, CK_ULONG(sn), byref(pub), byref(priv)),
               "C_GenerateKeyPair")
        return int(pub.value), int(priv.value)

    def create_object(self, template: RawTemplate) -> int:
        a = _Args()
        t, n = a.template(template)
        out = CK_ULONG(0)
        _check(self._lib.C_CreateObject(CK_ULONG(self.session()), t, CK_ULONG(n), byref(out)),
               "C_CreateObject")
        return int(out.value)

    def destroy_object(self, handle: int) -> None:
        _check(self._lib.C_DestroyObject(CK_ULONG(self.session()), CK_ULONG(handle)),
               "C_DestroyObject")

    def get_attribute(self, handle: int, attr: int) -> bytes | None:
        """One attribute's raw bytes, or None if it is sensitive or not defined for the object."""
        a = CK_ATTRIBUTE(attr, None, 0)
        s = CK_ULONG(self.session())
        rv = self._lib.C_GetAttributeValue(s, CK_ULONG(handle), byref(a), CK_ULONG(1))
        if rv in (int(RV.ATTRIBUTE_SENSITIVE), int(RV.ATTRIBUTE_TYPE_INVALID)):
            return None
        _check(rv, "C_GetAttributeValue")
        if a.ulValueLen == (1 << 64) - 1:
            return None
        buf = create_string_buffer(max(int(a.ulValueLen), 1))
        a.pValue = ctypes.addressof(buf)
        _check(self._lib.C_GetAttributeValue(s, CK_ULONG(handle), byref(a), CK_ULONG(1)),
               "C_GetAttributeValue")
        return buf.raw[: a.ulValueLen]

    def set_attributes(self, handle: int, template: RawTemplate) -> None:
        a = _Args()
        t, n = a.template(template)
        _check(self._lib.C_SetAttributeValue(CK_ULONG(self.session()), CK_ULONG(handle), t,
                                             CK_ULONG(n)), "C_SetAttributeValue")

    def find_objects(self, template: RawTemplate) -> list[int]:
        """SoftHSM2's linear search: only for start-up recovery, never on a hot path."""
        a = _Args()
        t, n = a.template(template)
        s = CK_ULONG(self.session())
        _check(self._lib.C_FindObjectsInit(s, t, CK_ULONG(n)), "C_FindObjectsInit")
        found: list[int] = []
        try:
            batch = (CK_ULONG * 256)()
            count = CK_ULONG(0)
            while True:
                _check(self._lib.C_FindObjects(s, batch, CK_ULONG(256), byref(count)),
                       "C_FindObjects")
                if count.value == 0:
                    break
                found.extend(int(batch[i]) for i in range(count.value))
        finally:
            self._lib.C_FindObjectsFinal(s)
        return found

    # -- crypto ------------------------------------------------------------------------------------

    def _single(self, init: str, call: str, mech: MechanismSpec, key: int | None, data: bytes,
                out_len: int) -> bytes:
        check_input(call, mech.mechanism, len(data))  # before Init: no operation left active
        a = _Args()
        m = a.mechanism(mech)
        s = CK_ULONG(self.session())
        init_fn = getattr(self._lib, init)
        if key is None:
            _check(init_fn(s, byref(m)), init, mech.mechanism)
        else:
            _check(init_fn(s, byref(m), CK_ULONG(key)), init, mech.mechanism)
        fn = getattr(self._lib, call)
        inp = a.bytes_(data)
        n = CK_ULONG(out_len)
        out = create_string_buffer(max(out_len, 1))
        rv = fn(s, inp, CK_ULONG(len(data)), out, byref(n))
        if rv == int(RV.BUFFER_TOO_SMALL):
            out = create_string_buffer(int(n.value))
            rv = fn(s, inp, CK_ULONG(len(data)), out, byref(n))
        _check(rv, call, mech.mechanism)
        result = out.raw[: n.value]
        ctypes.memset(out, 0, len(out))
        return result

    def encrypt(self, mech: MechanismSpec, key: int, data: bytes) -> bytes:
        return self._single("C_EncryptInit", "C_Encrypt", mech, key, data, len(data) + 1024)

    def decrypt(self, mech: MechanismSpec, key: int, data: bytes) -> bytes:
        return self._single("C_DecryptInit", "C_Decrypt", mech, key, data, len(data) + 1024)

    def sign(self, mech: MechanismSpec, key: int, data: bytes) -> bytes:
        return self._single("C_SignInit", "C_Sign", mech, key, data, 1024)

    def digest(self, mech: MechanismSpec, data: bytes) -> bytes:
        return self._single("C_DigestInit", "C_Digest", mech, None, data, 128)

    def verify(self, mech: MechanismSpec, key: int, data: bytes, signature: bytes) -> None:
        a = _Args()
        m = a.mechanism(mech)
        s = CK_ULONG(self.session())
        _check(self._lib.C_VerifyInit(s, byref(m), CK_ULONG(key)), "C_VerifyInit", mech.mechanism)
        _check(self._lib.C_Verify(s, a.bytes_(data), CK_ULONG(len(data)), a.bytes_(signature),
                                  CK_ULONG(len(signature))), "C_Verify", mech.mechanism)

    def wrap_key(self, mech: MechanismSpec, wrapping: int, key: int) -> bytes:
        a = _Args()
        m = a.mechanism(mech)
        s = CK_ULONG(self.session())
        n = CK_ULONG(0)
        _check(self._lib.C_WrapKey(s, byref(m), CK_ULONG(wrapping), CK_ULONG(key), None, byref(n)),
               "C_WrapKey")
        out = create_string_buffer(max(int(n.value), 1))
        _check(self._lib.C_WrapKey(s, byref(m), CK_ULONG(wrapping), CK_ULONG(key), out, byref(n)),
               "C_WrapKey")
        return out.raw[: n.value]

    def unwrap_key(self, mech: MechanismSpec, unwrapping: int, wrapped: bytes,
                   template: RawTemplate) -> int:
        a = _Args()
        m = a.mechanism(mech)
        t, n = a.template(template)
        out = CK_ULONG(0)
        _check(self._lib.C_UnwrapKey(CK_ULONG(self.session()), byref(m), CK_ULONG(unwrapping),
                                     a.bytes_(wrapped), CK_ULONG(len(wrapped)), t, CK_ULONG(n),
                                     byref(out)), "C_UnwrapKey")
        return int(out.value)

    def derive_key(self, mech: MechanismSpec, base: int, template: RawTemplate) -> int:
        a = _Args()
        m = a.mechanism(mech)
        t, n = a.template(template)
        out = CK_ULONG(0)
        _check(self._lib.C_DeriveKey(CK_ULONG(self.session()), byref(m), CK_ULONG(base), t,
                                     CK_ULONG(n), byref(out)), "C_DeriveKey")
        return int(out.value)

    def generate_random(self, length: int) -> bytes:
        out = create_string_buffer(max(length, 1))
        _check(self._lib.C_GenerateRandom(CK_ULONG(self.session()), out, CK_ULONG(length)),
               "C_GenerateRandom")
        return out.raw[:length]


def raw_template(items: Iterable[tuple[int, Any]]) -> list[tuple[int, bytes]]:
    """Typed (attr, value) pairs -> raw LP64 attribute bytes for SoftHSM2."""
    from hsmsim.pkcs11.attributes import encode
    return [(int(k), encode(int(k), v)) for k, v in items]

