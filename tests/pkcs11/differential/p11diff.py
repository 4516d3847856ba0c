"""A small ctypes PKCS#11 driver for the differential suite: it loads a module by path, takes its
CK_FUNCTION_LIST from C_GetFunctionList and calls through those pointers, passing exactly the
arguments a C client passes (NULL output buffers for length queries, short buffers, CK_ULONG
lengths), so SoftHSM2 and libhsmsim-pkcs11.so see the same C calls."""

from __future__ import annotations

import ctypes
from ctypes import CFUNCTYPE, POINTER, Structure, byref, c_ubyte, c_ulong, c_void_p
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hsmsim.pkcs11.constants import RV

UNAVAILABLE = 0xFFFFFFFFFFFFFFFF  # CK_UNAVAILABLE_INFORMATION
CKF_OS_LOCKING_OK = 0x2
CKF_RW_SESSION, CKF_SERIAL_SESSION = 0x2, 0x4
CKU_USER = 1

_FUNCTIONS = """C_Initialize C_Finalize C_GetInfo C_GetFunctionList C_GetSlotList C_GetSlotInfo
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

U, P = c_ulong, c_void_p  # CK_ULONG (handles, lengths, types) and any pointer
# Argument types of the functions the suite calls (PKCS#11 2.40 prototypes).
_ARGS: dict[str, tuple[Any, ...]] = {
    "C_Initialize": (P,), "C_Finalize": (P,),
    "C_GetSlotList": (c_ubyte, P, P), "C_GetMechanismList": (U, P, P),
    "C_GetMechanismInfo": (U, U, P), "C_GetTokenInfo": (U, P),
    "C_OpenSession": (U, U, P, P, P), "C_CloseSession": (U,),
    "C_Login": (U, U, P, U), "C_Logout": (U,),
    "C_CreateObject": (U, P, U, P), "C_DestroyObject": (U, U),
    "C_GetAttributeValue": (U, U, P, U),
    "C_FindObjectsInit": (U, P, U), "C_FindObjects": (U, P, U, P), "C_FindObjectsFinal": (U,),
    "C_EncryptInit": (U, P, U), "C_Encrypt": (U, P, U, P, P), "C_EncryptUpdate": (U, P, U, P, P),
    "C_EncryptFinal": (U, P, P),
    "C_DecryptInit": (U, P, U), "C_Decrypt": (U, P, U, P, P), "C_DecryptUpdate": (U, P, U, P, P),
    "C_DecryptFinal": (U, P, P),
    "C_DigestInit": (U, P), "C_Digest": (U, P, U, P, P), "C_DigestUpdate": (U, P, U),
    "C_DigestFinal": (U, P, P),
    "C_SignInit": (U, P, U), "C_Sign": (U, P, U, P, P), "C_SignUpdate": (U, P, U),
    "C_SignFinal": (U, P, P),
    "C_VerifyInit": (U, P, U), "C_Verify": (U, P, U, P, U), "C_VerifyUpdate": (U, P, U),
    "C_VerifyFinal": (U, P, U),
    "C_GenerateKey": (U, P, P, U, P), "C_GenerateKeyPair": (U, P, P, U, P, U, P, P),
    "C_WrapKey": (U, P, U, U, P, P), "C_UnwrapKey": (U, P, U, P, U, P, U, P),
    "C_DeriveKey": (U, P, U, P, U, P), "C_GenerateRandom": (U, P, U),
}


class CK_VERSION(Structure):
    _fields_ = [("major", c_ubyte), ("minor", c_ubyte)]


class CK_FUNCTION_LIST(Structure):
    _fields_ = [("version", CK_VERSION)] + [(n, c_void_p) for n in _FUNCTIONS]


class CK_ATTRIBUTE(Structure):
    _fields_ = [("type", U), ("pValue", P), ("ulValueLen", U)]


class CK_MECHANISM(Structure):
    _fields_ = [("mechanism", U), ("pParameter", P), ("ulParameterLen", U)]


class CK_MECHANISM_INFO(Structure):
    _fields_ = [("ulMinKeySize", U), ("ulMaxKeySize", U), ("flags", U)]


class CK_C_INITIALIZE_ARGS(Structure):
    _fields_ = [("CreateMutex", P), ("DestroyMutex", P), ("LockMutex", P), ("UnlockMutex", P),
                ("flags", U), ("pReserved", P)]


class CK_GCM_PARAMS(Structure):
    _fields_ = [("pIv", P), ("ulIvLen", U), ("ulIvBits", U), ("pAAD", P), ("ulAADLen", U),
                ("ulTagBits", U)]


class CK_AES_CTR_PARAMS(Structure):
    _fields_ = [("ulCounterBits", U), ("cb", c_ubyte * 16)]


class CK_RSA_PKCS_OAEP_PARAMS(Structure):
    _fields_ = [("hashAlg", U), ("mgf", U), ("source", U), ("pSourceData", P),
                ("ulSourceDataLen", U)]


class CK_RSA_PKCS_PSS_PARAMS(Structure):
    _fields_ = [("hashAlg", U), ("mgf", U), ("sLen", U)]


class CK_RSA_AES_KEY_WRAP_PARAMS(Structure):
    _fields_ = [("ulAESKeyBits", U), ("pOAEPParams", P)]


class CK_ECDH1_DERIVE_PARAMS(Structure):
    _fields_ = [("kdf", U), ("ulSharedDataLen", U), ("pSharedData", P), ("ulPublicDataLen", U),
                ("pPublicData", P)]


def rv_name(rv: int) -> str:
    try:
        return f"CKR_{RV(rv).name}"
    except ValueError:
        return hex(rv)


class Mechanism:
    """A CK_MECHANISM that keeps its parameter (and anything the parameter points to) alive."""

    def __init__(self, mech: int, param: bytes | Structure | None = None, *keep: Any) -> None:
        self.keep: list[Any] = list(keep)
        if param is None:
            self.struct = CK_MECHANISM(mech, None, 0)
        elif isinstance(param, bytes):
            buf = ctypes.create_string_buffer(param, len(param))
            self.keep.append(buf)
            self.struct = CK_MECHANISM(mech, ctypes.cast(buf, P), len(param))
        else:
            self.keep.append(param)
            self.struct = CK_MECHANISM(mech, ctypes.cast(byref(param), P), ctypes.sizeof(param))

    @property
    def ref(self) -> Any:
        return byref(self.struct)


class Template:
    """A CK_ATTRIBUTE array from (type, value) pairs: bool -> CK_BBOOL, int -> CK_ULONG,
    bytes/str -> bytes, None -> a NULL pValue with ulValueLen 0 (a length query)."""

    def __init__(self, items: list[tuple[int, Any]]) -> None:
        self.keep: list[Any] = []
        self.array = (CK_ATTRIBUTE * max(1, len(items)))()
        self.count = len(items)
        for i, (t, v) in enumerate(items):
            if v is None:
                self.array[i] = CK_ATTRIBUTE(t, None, 0)
                continue
            if isinstance(v, bool):
                buf: Any = ctypes.c_ubyte(int(v))
                size = 1
            elif isinstance(v, int):
                buf = c_ulong(v)
                size = ctypes.sizeof(c_ulong)
            else:
                data = v.encode() if isinstance(v, str) else bytes(v)
                buf = ctypes.create_string_buffer(data, max(1, len(data)))
                size = len(data)
            self.keep.append(buf)
            self.array[i] = CK_ATTRIBUTE(t, ctypes.cast(byref(buf), P), size)

    @property
    def ref(self) -> Any:
        return self.array if self.count else None


@dataclass
class Out:
    """The result of a call with an output buffer: return value, the length the module wrote
    back, and the bytes (None when no buffer was passed)."""

    rv: int
    length: int
    data: bytes | None = None

    def __repr__(self) -> str:
        return f"Out({rv_name(self.rv)}, len={self.length}, data={self.data.hex() if self.data else self.data})"


class Module:
    """One loaded PKCS#11 module, called through its CK_FUNCTION_LIST."""

    def __init__(self, path: Path, name: str) -> None:
        self.name = name
        self.dll = ctypes.CDLL(str(path), mode=ctypes.RTLD_LOCAL)
        get = self.dll.C_GetFunctionList
        get.restype, get.argtypes = U, [POINTER(POINTER(CK_FUNCTION_LIST))]
        fl = POINTER(CK_FUNCTION_LIST)()
        assert get(byref(fl)) == 0, f"{name}: C_GetFunctionList failed"
        self.functions = fl.contents
        self._fns: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("C_"):
            raise AttributeError(name)
        fn = self._fns.get(name)
        if fn is None:
            addr = getattr(self.functions, name)
            assert addr, f"{self.name}: {name} is NULL in the function list"
            fn = CFUNCTYPE(U, *_ARGS[name])(addr)
            self._fns[name] = fn
        return fn

    def initialize(self) -> int:
        args = CK_C_INITIALIZE_ARGS(None, None, None, None, CKF_OS_LOCKING_OK, None)
        return int(self.C_Initialize(byref(args)))

    def slot_of(self, label: str) -> int:
        """The slot whose token has `label`."""
        n = c_ulong()
        assert self.C_GetSlotList(1, None, byref(n)) == 0 and n.value > 0
        slots = (c_ulong * n.value)()
        assert self.C_GetSlotList(1, slots, byref(n)) == 0
        for slot in slots[:n.value]:
            info = ctypes.create_string_buffer(1024)  # CK_TOKEN_INFO starts with label[32]
            if self.C_GetTokenInfo(slot, info) == 0 and info.raw[:32].rstrip(b" ") == label.encode():
                return int(slot)
        raise AssertionError(f"{self.name}: no token labelled {label!r}")


class Session:
    """A logged-in RW session on one module, with the calls the suite makes as Python methods.
    Every method returns the module's return value (and outputs) without asserting."""

    def __init__(self, module: Module, slot: int, pin: str) -> None:
        self.module = module
        self.name = module.name
        self.slot = slot
        h = c_ulong()
        rv = module.C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, None, None, byref(h))
        assert rv == 0, f"{self.name}: C_OpenSession {rv_name(rv)}"
        self.h = h.value
        pin_b = pin.encode()
        rv = module.C_Login(self.h, CKU_USER, pin_b, len(pin_b))
        assert rv in (0, RV.USER_ALREADY_LOGGED_IN), f"{self.name}: C_Login {rv_name(rv)}"

    def close(self) -> None:
        self.module.C_CloseSession(self.h)

    def __repr__(self) -> str:
        return self.name

    # -- objects --------------------------------------------------------------------------------
    def create(self, items: list[tuple[int, Any]]) -> tuple[int, int]:
        t = Template(items)
        h = c_ulong()
        rv = self.module.C_CreateObject(self.h, t.ref, t.count, byref(h))
        return int(rv), h.value

    def destroy(self, obj: int) -> int:
        return int(self.module.C_DestroyObject(self.h, obj))

    def get_attributes(self, obj: int, types: list[int], sizes: list[int | None]
                       ) -> tuple[int, list[tuple[int, bytes | None]]]:
        """C_GetAttributeValue with one buffer per attribute (None: a NULL pValue, a length
        query). Returns the rv and, per attribute, (ulValueLen, value or None)."""
        arr = (CK_ATTRIBUTE * len(types))()
        bufs: list[Any] = []
        for i, (t, size) in enumerate(zip(types, sizes)):
            if size is None:
                arr[i] = CK_ATTRIBUTE(t, None, 0)
                bufs.append(None)
            else:
                b = ctypes.create_string_buffer(max(1, size))
                bufs.append(b)
                arr[i] = CK_ATTRIBUTE(t, ctypes.cast(b, P), size)
        rv = int(self.module.C_GetAttributeValue(self.h, obj, arr, len(types)))
        out: list[tuple[int, bytes | None]] = []
        for i, b in enumerate(bufs):
            n = int(arr[i].ulValueLen)
            out.append((n, None if b is None or n == UNAVAILABLE else b.raw[:n]))
        return rv, out

    def attribute(self, obj: int, t: int) -> bytes:
        rv, [(n, _)] = self.get_attributes(obj, [t], [None])
        assert rv == 0, f"{self.name}: C_GetAttributeValue({t:#x}) {rv_name(rv)}"
        rv, [(n, v)] = self.get_attributes(obj, [t], [n])
        assert rv == 0 and v is not None
        return v

    def find(self, items: list[tuple[int, Any]], batch: int = 100) -> tuple[int, list[int]]:
        t = Template(items)
        rv = int(self.module.C_FindObjectsInit(self.h, t.ref, t.count))
        if rv:
            return rv, []
        found: list[int] = []
        while True:
            arr = (c_ulong * batch)()
            n = c_ulong()
            rv = int(self.module.C_FindObjects(self.h, arr, batch, byref(n)))
            if rv or n.value == 0:
                break
            found += list(arr[:n.value])
        final = int(self.module.C_FindObjectsFinal(self.h))
        return rv or final, found

    # -- keys -----------------------------------------------------------------------------------
    def generate_key(self, mech: Mechanism, items: list[tuple[int, Any]]) -> tuple[int, int]:
        t = Template(items)
        h = c_ulong()
        return int(self.module.C_GenerateKey(self.h, mech.ref, t.ref, t.count, byref(h))), h.value

    def generate_key_pair(self, mech: Mechanism, pub: list[tuple[int, Any]],
                          priv: list[tuple[int, Any]]) -> tuple[int, int, int]:
        tp, tq = Template(pub), Template(priv)
        hp, hq = c_ulong(), c_ulong()
        rv = self.module.C_GenerateKeyPair(self.h, mech.ref, tp.ref, tp.count, tq.ref, tq.count,
                                           byref(hp), byref(hq))
        return int(rv), hp.value, hq.value

    def wrap(self, mech: Mechanism, wrapping: int, key: int, out: int | None = 4096) -> Out:
        n = c_ulong(out or 0)
        buf = ctypes.create_string_buffer(max(1, out or 0)) if out is not None else None
        rv = int(self.module.C_WrapKey(self.h, mech.ref, wrapping, key, buf, byref(n)))
        return Out(rv, n.value, buf.raw[:n.value] if buf is not None and rv == 0 else None)

    def unwrap(self, mech: Mechanism, unwrapping: int, wrapped: bytes,
               items: list[tuple[int, Any]]) -> tuple[int, int]:
        t = Template(items)
        h = c_ulong()
        rv = self.module.C_UnwrapKey(self.h, mech.ref, unwrapping, wrapped, len(wrapped), t.ref,
                                     t.count, byref(h))
        return int(rv), h.value

    def derive(self, mech: Mechanism, base: int, items: list[tuple[int, Any]]) -> tuple[int, int]:
        t = Template(items)
        h = c_ulong()
        return int(self.module.C_DeriveKey(self.h, mech.ref, base, t.ref, t.count, byref(h))), h.value

    # -- operations -----------------------------------------------------------------------------
    def init(self, op: str, mech: Mechanism | None, key: int | None = None) -> int:
        """C_<op>Init: op is Encrypt, Decrypt, Sign, Verify or Digest."""
        fn = getattr(self.module, f"C_{op}Init")
        if op == "Digest":
            return int(fn(self.h, mech.ref if mech else None))
        return int(fn(self.h, mech.ref if mech else None, key))

    def call(self, fn_name: str, data: bytes | None, out: int | None) -> Out:
        """A function with input data and an output buffer (C_Encrypt, C_EncryptUpdate,
        C_Sign, C_Digest...): `out` None passes a NULL buffer (length query), an int passes a
        buffer of that size."""
        fn = getattr(self.module, fn_name)
        n = c_ulong(out or 0)
        buf = ctypes.create_string_buffer(max(1, out or 0)) if out is not None else None
        rv = int(fn(self.h, data, len(data), buf, byref(n)))
        return Out(rv, n.value, buf.raw[:n.value] if buf is not None and rv == 0 else None)

    def final(self, fn_name: str, out: int | None) -> Out:
        """C_EncryptFinal, C_DecryptFinal, C_SignFinal, C_DigestFinal."""
        fn = getattr(self.module, fn_name)
        n = c_ulong(out or 0)
        buf = ctypes.create_string_buffer(max(1, out or 0)) if out is not None else None
        rv = int(fn(self.h, buf, byref(n)))
        return Out(rv, n.value, buf.raw[:n.value] if buf is not None and rv == 0 else None)

    def update(self, fn_name: str, data: bytes) -> int:
        """C_SignUpdate, C_VerifyUpdate, C_DigestUpdate."""
        return int(getattr(self.module, fn_name)(self.h, data, len(data)))

    def verify(self, data: bytes, sig: bytes) -> int:
        return int(self.module.C_Verify(self.h, data, len(data), sig, len(sig)))

    def verify_final(self, sig: bytes) -> int:
        return int(self.module.C_VerifyFinal(self.h, sig, len(sig)))

    def one_shot(self, op: str, mech: Mechanism, key: int | None, data: bytes) -> Out:
        """Init + a length query + the call with a buffer of exactly that length."""
        rv = self.init(op, mech, key)
        if rv:
            return Out(rv, 0)
        q = self.call(f"C_{op}", data, None)
        if q.rv:
            return q
        return self.call(f"C_{op}", data, q.length)

    def mechanisms(self) -> set[int]:
        n = c_ulong()
        assert self.module.C_GetMechanismList(self.slot, None, byref(n)) == 0
        arr = (c_ulong * n.value)()
        assert self.module.C_GetMechanismList(self.slot, arr, byref(n)) == 0
        return set(arr[:n.value])

    def mechanism_info(self, mech: int) -> tuple[int, CK_MECHANISM_INFO]:
        info = CK_MECHANISM_INFO()
        return int(self.module.C_GetMechanismInfo(self.slot, mech, byref(info))), info


# -- the same key material in both modules ------------------------------------------------------
# CloudHSM gives keys no usage by default (reference §1.6), so every key sets its usage
# attributes explicitly, in both modules, to keep the comparison fair.

def _attrs() -> Any:
    from hsmsim.pkcs11.constants import Attribute
    return Attribute


def secret_key(s: Session, key_type: int, value: bytes, *, extractable: bool = True,
               sensitive: bool | None = None, label: str = "diff",
               extra: tuple[tuple[int, Any], ...] = (), **usage: bool) -> int:
    """A session secret key with this value; usage flags (encrypt=True, ...) default to false."""
    A = _attrs()
    items: list[tuple[int, Any]] = [(A.CLASS, 4), (A.KEY_TYPE, key_type), (A.TOKEN, False),
                                    (A.VALUE, value), (A.LABEL, label),
                                    (A.EXTRACTABLE, extractable)]
    if sensitive is not None:
        items.append((A.SENSITIVE, sensitive))
    for name in ("encrypt", "decrypt", "sign", "verify", "wrap", "unwrap", "derive"):
        items.append((getattr(A, name.upper()), bool(usage.get(name, False))))
    rv, h = s.create(items + list(extra))
    assert rv == 0, f"{s.name}: C_CreateObject(secret key) {rv_name(rv)}"
    return h


def _int_bytes(n: int) -> bytes:
    return n.to_bytes((n.bit_length() + 7) // 8, "big")


def rsa_pair(s: Session, key: Any, label: str = "diff-rsa") -> tuple[int, int]:
    """The pyca/cryptography RSA private key `key` imported as (public, private) handles."""
    A = _attrs()
    pn = key.private_numbers()
    pub_n = pn.public_numbers
    rv, pub = s.create([(A.CLASS, 2), (A.KEY_TYPE, 0), (A.TOKEN, False), (A.LABEL, label),
                        (A.MODULUS, _int_bytes(pub_n.n)), (A.PUBLIC_EXPONENT, _int_bytes(pub_n.e)),
                        (A.ENCRYPT, True), (A.VERIFY, True), (A.WRAP, True)])
    assert rv == 0, f"{s.name}: C_CreateObject(RSA public) {rv_name(rv)}"
    rv, priv = s.create([(A.CLASS, 3), (A.KEY_TYPE, 0), (A.TOKEN, False), (A.LABEL, label),
                         (A.MODULUS, _int_bytes(pub_n.n)), (A.PUBLIC_EXPONENT, _int_bytes(pub_n.e)),
                         (A.PRIVATE_EXPONENT, _int_bytes(pn.d)), (A.PRIME_1, _int_bytes(pn.p)),
                         (A.PRIME_2, _int_bytes(pn.q)), (A.EXPONENT_1, _int_bytes(pn.dmp1)),
                         (A.EXPONENT_2, _int_bytes(pn.dmq1)), (A.COEFFICIENT, _int_bytes(pn.iqmp)),
                         (A.SENSITIVE, True), (A.EXTRACTABLE, False),
                         (A.DECRYPT, True), (A.SIGN, True), (A.UNWRAP, True)])
    assert rv == 0, f"{s.name}: C_CreateObject(RSA private) {rv_name(rv)}"
    return pub, priv


P256_PARAMS = bytes.fromhex("06082a8648ce3d030107")


def ec_pair(s: Session, key: Any, label: str = "diff-ec") -> tuple[int, int]:
    """The pyca/cryptography P-256 private key `key` imported as (public, private) handles."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    A = _attrs()
    point = key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    der_point = bytes([0x04, len(point)]) + point  # DER OCTET STRING (65 bytes < 128)
    rv, pub = s.create([(A.CLASS, 2), (A.KEY_TYPE, 3), (A.TOKEN, False), (A.LABEL, label),
                        (A.EC_PARAMS, P256_PARAMS), (A.EC_POINT, der_point), (A.VERIFY, True)])
    assert rv == 0, f"{s.name}: C_CreateObject(EC public) {rv_name(rv)}"
    value = key.private_numbers().private_value.to_bytes(32, "big")
    rv, priv = s.create([(A.CLASS, 3), (A.KEY_TYPE, 3), (A.TOKEN, False), (A.LABEL, label),
                         (A.EC_PARAMS, P256_PARAMS), (A.VALUE, value), (A.SENSITIVE, True),
                         (A.EXTRACTABLE, False), (A.SIGN, True), (A.DERIVE, True)])
    assert rv == 0, f"{s.name}: C_CreateObject(EC private) {rv_name(rv)}"
    return pub, priv
