"""The C module on its own: the function list, argument checks (never a crash on NULL), the
initialisation rules, socket discovery, and the PKCS#11 output-length conventions, driven
through ctypes against a private copy of libhsmsim-pkcs11.so."""

from __future__ import annotations

import ctypes
import os
from ctypes import POINTER, byref, c_ubyte, c_ulong, c_void_p, cast, create_string_buffer, sizeof
from pathlib import Path

import pytest

from hsmsim.pkcs11.constants import RV, Attribute as A, Mechanism as M
from p11helpers import REF_PIN, ClusterGateway
from p11raw import (CK_ATTRIBUTE, CK_C_INITIALIZE_ARGS, CK_GCM_PARAMS, CK_MECHANISM,
                              CK_SESSION_INFO, FUNCTION_NAMES, FunctionList, Raw)

U = c_ulong
CKF_RW_SERIAL = 0x6


def open_login(raw: Raw) -> int:
    h = U()
    assert raw.C_OpenSession(U(1), U(CKF_RW_SERIAL), None, None, byref(h)) == RV.OK
    pin = REF_PIN.encode()
    rv = raw.C_Login(h, U(1), pin, U(len(pin)))
    assert rv in (RV.OK, RV.USER_ALREADY_LOGGED_IN)
    return h.value


def test_function_list_has_every_240_function(raw: Raw) -> None:
    fl = POINTER(FunctionList)()
    assert raw.C_GetFunctionList(byref(fl)) == RV.OK
    assert (fl.contents.version.major, fl.contents.version.minor) == (2, 40)
    assert len(FUNCTION_NAMES) == 68
    for name in FUNCTION_NAMES:
        ptr = getattr(fl.contents, name)
        assert ptr, name
        assert ptr == cast(getattr(raw.dll, name), c_void_p).value, name
    assert raw.C_GetFunctionList(None) == RV.ARGUMENTS_BAD


def test_every_call_before_initialize_is_refused(raw: Raw) -> None:
    assert raw.C_Finalize(None) == RV.CRYPTOKI_NOT_INITIALIZED
    assert raw.C_GetInfo(None) == RV.CRYPTOKI_NOT_INITIALIZED
    n = U()
    assert raw.C_GetSlotList(c_ubyte(1), None, byref(n)) == RV.CRYPTOKI_NOT_INITIALIZED
    assert raw.C_OpenSession(U(1), U(CKF_RW_SERIAL), None, None, None) == RV.CRYPTOKI_NOT_INITIALIZED
    assert raw.C_Sign(U(1), None, U(0), None, None) == RV.CRYPTOKI_NOT_INITIALIZED


def test_initialize_arguments(raw: Raw, ref_gateway: ClusterGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HSMSIM_SOCKET", str(ref_gateway.sock))
    args = CK_C_INITIALIZE_ARGS()
    args.pReserved = 1
    assert raw.C_Initialize(byref(args)) == RV.ARGUMENTS_BAD
    args = CK_C_INITIALIZE_ARGS()
    args.CreateMutex = 1  # some but not all mutex functions
    assert raw.C_Initialize(byref(args)) == RV.ARGUMENTS_BAD
    args = CK_C_INITIALIZE_ARGS(1, 1, 1, 1, 0, None)  # application locks only: we cannot use them
    assert raw.C_Initialize(byref(args)) == RV.CANT_LOCK
    args = CK_C_INITIALIZE_ARGS(1, 1, 1, 1, 2, None)  # ... unless OS locking is allowed
    assert raw.C_Initialize(byref(args)) == RV.OK
    assert raw.C_Initialize(None) == RV.CRYPTOKI_ALREADY_INITIALIZED
    assert raw.C_Finalize(c_void_p(1)) == RV.ARGUMENTS_BAD
    assert raw.C_Finalize(None) == RV.OK
    assert raw.C_Finalize(None) == RV.CRYPTOKI_NOT_INITIALIZED
    args = CK_C_INITIALIZE_ARGS(None, None, None, None, 2, None)
    assert raw.C_Initialize(byref(args)) == RV.OK
    assert raw.C_Finalize(None) == RV.OK


def test_no_daemon_is_a_device_error(raw: Raw, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HSMSIM_SOCKET", str(tmp_path / "nobody-home.sock"))
    assert raw.C_Initialize(None) == RV.DEVICE_ERROR
    assert raw.C_GetInfo(None) == RV.CRYPTOKI_NOT_INITIALIZED
    monkeypatch.setenv("HSMSIM_SOCKET", "tls:hsm.example:2223")  # TLS without a CA file: refused
    monkeypatch.setenv("HSMSIM_CONF", str(tmp_path / "no.conf"))
    monkeypatch.delenv("HSMSIM_CA_FILE", raising=False)
    assert raw.C_Initialize(None) == RV.GENERAL_ERROR
    monkeypatch.setenv("HSMSIM_SOCKET", "tcp:127.0.0.1:1")  # plain TCP: refused
    assert raw.C_Initialize(None) == RV.GENERAL_ERROR


@pytest.mark.parametrize("how", ["conf", "home", "cwd"])
def test_socket_discovery(how: str, raw: Raw, ref_gateway: ClusterGateway, tmp_path: Path,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HSMSIM_SOCKET", raising=False)
    monkeypatch.delenv("HSMSIM_CONF", raising=False)
    monkeypatch.delenv("HSMSIM_HOME", raising=False)
    if how == "conf":
        conf = tmp_path / "pkcs11.conf"
        conf.write_text(f"# hsmsim client\nsocket = unix:{ref_gateway.sock}\n")
        monkeypatch.setenv("HSMSIM_CONF", str(conf))
    elif how == "home":
        monkeypatch.setenv("HSMSIM_HOME", str(ref_gateway.sock.parent))
    else:
        (tmp_path / ".hsmsim").mkdir()
        (tmp_path / ".hsmsim" / "gateway.sock").symlink_to(ref_gateway.sock)
        monkeypatch.chdir(tmp_path)
    assert raw.C_Initialize(None) == RV.OK
    n = U()
    assert raw.C_GetSlotList(c_ubyte(1), None, byref(n)) == RV.OK and n.value == 1
    assert raw.C_Finalize(None) == RV.OK


def test_null_pointers_are_arguments_bad(live: Raw) -> None:
    raw = live
    h = open_login(raw)
    assert raw.C_GetInfo(None) == RV.ARGUMENTS_BAD
    assert raw.C_GetSlotList(c_ubyte(0), None, None) == RV.ARGUMENTS_BAD
    assert raw.C_GetSlotInfo(U(1), None) == RV.ARGUMENTS_BAD
    assert raw.C_GetTokenInfo(U(1), None) == RV.ARGUMENTS_BAD
    assert raw.C_GetMechanismList(U(1), None, None) == RV.ARGUMENTS_BAD
    assert raw.C_GetMechanismInfo(U(1), U(M.AES_GCM), None) == RV.ARGUMENTS_BAD
    assert raw.C_OpenSession(U(1), U(CKF_RW_SERIAL), None, None, None) == RV.ARGUMENTS_BAD
    assert raw.C_GetSessionInfo(U(h), None) == RV.ARGUMENTS_BAD
    assert raw.C_Login(U(h), U(1), None, U(5)) == RV.ARGUMENTS_BAD
    assert raw.C_CreateObject(U(h), None, U(2), byref(U())) == RV.ARGUMENTS_BAD
    assert raw.C_CreateObject(U(h), None, U(0), None) == RV.ARGUMENTS_BAD
    attr = CK_ATTRIBUTE(A.LABEL, None, 4)  # NULL value with a length
    assert raw.C_CreateObject(U(h), byref(attr), U(1), byref(U())) == RV.ARGUMENTS_BAD
    assert raw.C_GetAttributeValue(U(h), U(1), None, U(1)) == RV.ARGUMENTS_BAD
    assert raw.C_FindObjectsInit(U(h), None, U(3)) == RV.ARGUMENTS_BAD
    assert raw.C_FindObjects(U(h), None, U(1), byref(U())) == RV.ARGUMENTS_BAD
    assert raw.C_EncryptInit(U(h), None, U(1)) == RV.ARGUMENTS_BAD
    assert raw.C_DigestInit(U(h), None) == RV.ARGUMENTS_BAD
    mech = CK_MECHANISM(M.SHA256, None, 0)
    assert raw.C_DigestInit(U(h), byref(mech)) == RV.OK
    assert raw.C_Digest(U(h), None, U(10), None, byref(U())) == RV.ARGUMENTS_BAD
    assert raw.C_Digest(U(h), b"abc", U(3), None, None) == RV.ARGUMENTS_BAD
    assert raw.C_DigestUpdate(U(h), None, U(1)) == RV.ARGUMENTS_BAD
    assert raw.C_GenerateKey(U(h), byref(mech), None, U(0), None) == RV.ARGUMENTS_BAD
    assert raw.C_GenerateKeyPair(U(h), byref(mech), None, U(0), None, U(0), None, None) == RV.ARGUMENTS_BAD
    assert raw.C_WrapKey(U(h), byref(mech), U(1), U(2), None, None) == RV.ARGUMENTS_BAD
    assert raw.C_UnwrapKey(U(h), byref(mech), U(1), None, U(4), None, U(0), byref(U())) == RV.ARGUMENTS_BAD
    assert raw.C_GenerateRandom(U(h), None, U(8)) == RV.ARGUMENTS_BAD
    mech = CK_MECHANISM(M.AES_GCM, None, 48)  # NULL parameter with a length
    assert raw.C_EncryptInit(U(h), byref(mech), U(1)) == RV.ARGUMENTS_BAD
    # the session still works after all that
    info = CK_SESSION_INFO()
    assert raw.C_GetSessionInfo(U(h), byref(info)) == RV.OK and info.state == 3


def test_unsupported_functions(live: Raw) -> None:
    raw = live
    h = open_login(raw)
    for name, args in [("C_InitToken", (U(1), None, U(0), None)), ("C_InitPIN", (U(h), None, U(0))),
                       ("C_SetPIN", (U(h), None, U(0), None, U(0))),
                       ("C_GetOperationState", (U(h), None, None)),
                       ("C_SetOperationState", (U(h), None, U(0), U(0), U(0))),
                       ("C_DigestKey", (U(h), U(1))), ("C_SignRecoverInit", (U(h), None, U(1))),
                       ("C_SignRecover", (U(h), None, U(0), None, None)),
                       ("C_VerifyRecoverInit", (U(h), None, U(1))),
                       ("C_VerifyRecover", (U(h), None, U(0), None, None)),
                       ("C_DigestEncryptUpdate", (U(h), None, U(0), None, None)),
                       ("C_DecryptDigestUpdate", (U(h), None, U(0), None, None)),
                       ("C_SignEncryptUpdate", (U(h), None, U(0), None, None)),
                       ("C_DecryptVerifyUpdate", (U(h), None, U(0), None, None)),
                       ("C_SeedRandom", (U(h), None, U(0))), ("C_WaitForSlotEvent", (U(0), None, None))]:
        assert getattr(raw, name)(*args) == RV.FUNCTION_NOT_SUPPORTED, name
    assert raw.C_GetFunctionStatus(U(h)) == RV.FUNCTION_NOT_PARALLEL
    assert raw.C_CancelFunction(U(h)) == RV.FUNCTION_NOT_PARALLEL


def _hmac_key(raw: Raw, h: int) -> int:
    key = U()
    mech = CK_MECHANISM(M.GENERIC_SECRET_KEY_GEN, None, 0)
    vlen = U(32)
    t = (CK_ATTRIBUTE * 1)(CK_ATTRIBUTE(A.VALUE_LEN, cast(byref(vlen), c_void_p), 8))
    assert raw.C_GenerateKey(U(h), byref(mech), t, U(1), byref(key)) == RV.OK
    return key.value


def test_output_length_convention_keeps_the_result(live: Raw) -> None:
    raw = live
    h = open_login(raw)
    key = _hmac_key(raw, h)
    mech = CK_MECHANISM(M.SHA256_HMAC, None, 0)
    assert raw.C_SignInit(U(h), byref(mech), U(key)) == RV.OK
    n = U(0)
    assert raw.C_Sign(U(h), b"data", U(4), None, byref(n)) == RV.OK and n.value == 32
    small = create_string_buffer(8)
    n = U(8)
    assert raw.C_Sign(U(h), b"data", U(4), small, byref(n)) == RV.BUFFER_TOO_SMALL and n.value == 32
    out = create_string_buffer(64)
    n = U(64)
    assert raw.C_Sign(U(h), b"data", U(4), out, byref(n)) == RV.OK and n.value == 32
    first = out.raw[:32]
    # the operation is finished now
    assert raw.C_Sign(U(h), b"data", U(4), out, byref(n)) == RV.OPERATION_NOT_INITIALIZED
    assert raw.C_SignInit(U(h), byref(mech), U(key)) == RV.OK
    n = U(64)
    assert raw.C_Sign(U(h), b"data", U(4), out, byref(n)) == RV.OK and out.raw[:32] == first


def test_gcm_iv_is_written_back_and_length_query_keeps_it(live: Raw) -> None:
    raw = live
    h = open_login(raw)
    key = U()
    mech = CK_MECHANISM(M.AES_KEY_GEN, None, 0)
    vlen, true = U(32), c_ubyte(1)
    t = (CK_ATTRIBUTE * 3)(CK_ATTRIBUTE(A.VALUE_LEN, cast(byref(vlen), c_void_p), 8),
                           CK_ATTRIBUTE(A.ENCRYPT, cast(byref(true), c_void_p), 1),
                           CK_ATTRIBUTE(A.DECRYPT, cast(byref(true), c_void_p), 1))
    assert raw.C_GenerateKey(U(h), byref(mech), t, U(3), byref(key)) == RV.OK
    iv = create_string_buffer(12)
    params = CK_GCM_PARAMS(cast(iv, c_void_p), 12, 96, None, 0, 128)
    mech = CK_MECHANISM(M.AES_GCM, cast(byref(params), c_void_p), sizeof(params))
    assert raw.C_EncryptInit(U(h), byref(mech), U(key.value)) == RV.OK
    n = U()
    assert raw.C_Encrypt(U(h), b"x" * 20, U(20), None, byref(n)) == RV.OK and n.value == 36
    iv_after_query = iv.raw[:12]
    out = create_string_buffer(36)
    assert raw.C_Encrypt(U(h), b"x" * 20, U(20), out, byref(n)) == RV.OK
    assert iv.raw[:12] != bytes(12) and iv.raw[:12] == iv_after_query
    mech_bad = CK_MECHANISM(M.AES_GCM, cast(byref(params), c_void_p), sizeof(params) - 8)
    assert raw.C_EncryptInit(U(h), byref(mech_bad), U(key.value)) == RV.MECHANISM_PARAM_INVALID


def test_attribute_length_queries(live: Raw) -> None:
    raw = live
    h = open_login(raw)
    key = _hmac_key(raw, h)
    tmpl = (CK_ATTRIBUTE * 3)(CK_ATTRIBUTE(A.VALUE_LEN, None, 0), CK_ATTRIBUTE(A.VALUE, None, 0),
                              CK_ATTRIBUTE(A.MODULUS, None, 0))
    rv = raw.C_GetAttributeValue(U(h), U(key), tmpl, U(3))
    unavailable = ctypes.c_ulong(-1).value
    assert rv in (RV.ATTRIBUTE_SENSITIVE, RV.ATTRIBUTE_TYPE_INVALID)
    assert tmpl[0].ulValueLen == 8
    assert tmpl[1].ulValueLen == unavailable  # sensitive
    assert tmpl[2].ulValueLen == unavailable  # not an attribute of a secret key
    small = create_string_buffer(2)
    tmpl = (CK_ATTRIBUTE * 1)(CK_ATTRIBUTE(A.VALUE_LEN, cast(small, c_void_p), 2))
    assert raw.C_GetAttributeValue(U(h), U(key), tmpl, U(1)) == RV.BUFFER_TOO_SMALL
    assert tmpl[0].ulValueLen == unavailable
    buf = U()
    tmpl = (CK_ATTRIBUTE * 1)(CK_ATTRIBUTE(A.VALUE_LEN, cast(byref(buf), c_void_p), 8))
    assert raw.C_GetAttributeValue(U(h), U(key), tmpl, U(1)) == RV.OK and buf.value == 32


def test_forked_child_needs_its_own_initialize(live: Raw) -> None:
    raw = live
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        n = U()
        codes = [raw.C_GetSlotList(c_ubyte(1), None, byref(n)), raw.C_Initialize(None),
                 raw.C_GetSlotList(c_ubyte(1), None, byref(n))]
        h = U()
        codes.append(raw.C_OpenSession(U(1), U(CKF_RW_SERIAL), None, None, byref(h)))
        pin = REF_PIN.encode()
        codes.append(raw.C_Login(h, U(1), pin, U(len(pin))))  # a new application: not logged in yet
        os.write(w, repr(codes).encode())
        os._exit(0)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    codes = eval(os.read(r, 1000))  # noqa: S307 - our own child's repr of ints
    os.close(r)
    assert status == 0
    assert codes == [RV.CRYPTOKI_NOT_INITIALIZED, RV.OK, RV.OK, RV.OK, RV.OK]
    # the parent's connection is untouched
    n = U()
    assert raw.C_GetSlotList(c_ubyte(1), None, byref(n)) == RV.OK


def test_length_query_then_other_input_is_recomputed(live: Raw) -> None:
    """The module keeps the result of a length query (protocol 1.1) only for the same input."""
    import hashlib
    import hmac as hmac_mod
    raw = live
    h = open_login(raw)
    key = U()
    mech = CK_MECHANISM(M.GENERIC_SECRET_KEY_GEN, None, 0)
    from p11raw import template
    t, _keep = template((A.CLASS, 4), (A.KEY_TYPE, 0x10), (A.VALUE, b"k" * 32), (A.SIGN, True))
    assert raw.C_CreateObject(U(h), t, U(4), byref(key)) == RV.OK
    mech = CK_MECHANISM(M.SHA256_HMAC, None, 0)
    assert raw.C_SignInit(U(h), byref(mech), key) == RV.OK
    n = U(0)
    assert raw.C_Sign(U(h), b"first", U(5), None, byref(n)) == RV.OK and n.value == 32
    out, n = create_string_buffer(32), U(32)
    assert raw.C_Sign(U(h), b"second", U(6), out, byref(n)) == RV.OK
    assert out.raw == hmac_mod.new(b"k" * 32, b"second", hashlib.sha256).digest()
    assert raw.C_SignUpdate(U(h), b"x", U(1)) == RV.OPERATION_NOT_INITIALIZED
    # a length query, then the same input: answered from the kept result, then finished
    assert raw.C_SignInit(U(h), byref(mech), key) == RV.OK
    n = U(0)
    assert raw.C_Sign(U(h), b"third", U(5), None, byref(n)) == RV.OK
    n = U(31)
    assert raw.C_Sign(U(h), b"third", U(5), out, byref(n)) == RV.BUFFER_TOO_SMALL and n.value == 32
    n = U(32)
    assert raw.C_Sign(U(h), b"third", U(5), out, byref(n)) == RV.OK
    assert out.raw == hmac_mod.new(b"k" * 32, b"third", hashlib.sha256).digest()
    assert raw.C_Sign(U(h), b"third", U(5), out, byref(n)) == RV.OPERATION_NOT_INITIALIZED
    assert raw.C_SignInit(U(h), byref(mech), key) == RV.OK  # a new operation starts cleanly
