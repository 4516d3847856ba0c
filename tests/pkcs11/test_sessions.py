"""Slot, token, sessions and login as CloudHSM has them: one slot and token `hsm1`, login per
application shared by all its sessions, RW sessions only, 1,024 sessions per application,
session objects living and dying with their session, and stale sessions after a restart."""

from __future__ import annotations

from ctypes import byref, c_ubyte, c_ulong, create_string_buffer
from pathlib import Path

import pytest

from hsmsim.pkcs11.constants import RV, Attribute as A, Mechanism as M, SessionState
from p11helpers import REF_PIN, SO_PIN, ClusterGateway, copy_module
from p11raw import Raw, login, mechanism, open_session, state, template

U = c_ulong


def test_one_slot_one_token_hsm1(ref_lib) -> None:  # type: ignore[no-untyped-def]
    slots = ref_lib.get_slots()
    assert [s.slot_id for s in slots] == [1]
    token = slots[0].get_token()
    assert token.label == "hsm1"
    flags = int(token.flags)
    # CKF_RNG | CKF_LOGIN_REQUIRED | CKF_USER_PIN_INITIALIZED | CKF_TOKEN_INITIALIZED
    assert flags == 0x1 | 0x4 | 0x8 | 0x400


def test_login_is_per_application(live: Raw) -> None:
    raw = live
    h1, h2 = open_session(raw), open_session(raw)
    assert state(raw, h1) == state(raw, h2) == SessionState.RW_PUBLIC
    assert login(raw, h1, REF_PIN) == RV.OK
    assert state(raw, h2) == SessionState.RW_USER  # one login authenticates every session
    assert login(raw, h2, REF_PIN) == RV.USER_ALREADY_LOGGED_IN
    assert login(raw, h2, SO_PIN, user_type=0) == RV.USER_ANOTHER_ALREADY_LOGGED_IN
    assert raw.C_CloseSession(U(h1)) == RV.OK
    assert state(raw, h2) == SessionState.RW_USER  # closing one leaves the others logged in
    h3 = open_session(raw)
    assert state(raw, h3) == SessionState.RW_USER
    assert raw.C_Logout(U(h3)) == RV.OK  # logs out every session
    assert state(raw, h2) == SessionState.RW_PUBLIC
    assert raw.C_Logout(U(h2)) == RV.USER_NOT_LOGGED_IN
    assert raw.C_CloseSession(U(h1)) == RV.SESSION_HANDLE_INVALID


def test_pin_format_and_user_types(live: Raw) -> None:
    raw = live
    h = open_session(raw)
    assert login(raw, h, "crypto_user") == RV.PIN_INCORRECT  # not <user>:<password>
    assert login(raw, h, ":password1") == RV.PIN_INCORRECT
    assert login(raw, h, "crypto_user:wrong") == RV.PIN_INCORRECT
    assert login(raw, h, REF_PIN, user_type=2) == RV.USER_TYPE_INVALID
    assert login(raw, h, REF_PIN, user_type=7) == RV.USER_TYPE_INVALID
    assert state(raw, h) == SessionState.RW_PUBLIC
    assert login(raw, h, SO_PIN, user_type=0) == RV.OK  # the CO can log in too
    assert state(raw, h) == SessionState.RW_SO


def test_read_only_sessions_fail(live: Raw, strict: Raw) -> None:
    h = U()
    # UG:ki-pkcs11-sdk item 11: CKF_SERIAL_SESSION without CKF_RW_SESSION
    assert live.C_OpenSession(U(1), U(0x4), None, None, byref(h)) == RV.FUNCTION_FAILED
    assert live.C_OpenSession(U(1), U(0x2), None, None, byref(h)) == RV.SESSION_PARALLEL_NOT_SUPPORTED
    assert live.C_OpenSession(U(2), U(0x6), None, None, byref(h)) == RV.SLOT_ID_INVALID
    # the quirk switched off: a standard read-only session
    assert strict.C_OpenSession(U(1), U(0x4), None, None, byref(h)) == RV.OK
    assert state(strict, h.value) == SessionState.RO_PUBLIC


def test_session_limit_1024(live: Raw) -> None:
    raw = live
    handles = [open_session(raw) for _ in range(1024)]
    h = U()
    assert raw.C_OpenSession(U(1), U(0x6), None, None, byref(h)) == RV.SESSION_COUNT
    assert raw.C_CloseSession(U(handles.pop())) == RV.OK
    assert raw.C_OpenSession(U(1), U(0x6), None, None, byref(h)) == RV.OK
    assert raw.C_CloseAllSessions(U(1)) == RV.OK
    assert state(raw, handles[0]) == -RV.SESSION_HANDLE_INVALID


def test_applications_are_independent(live: Raw, tmp_path: Path, ref_gateway: ClusterGateway) -> None:
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = Raw(copy_module(other_dir))
    assert other.C_Initialize(None) == RV.OK
    try:
        mine = open_session(live, REF_PIN)
        theirs = open_session(other)
        assert state(other, theirs) == SessionState.RW_PUBLIC  # my login is not theirs
        assert state(other, mine) == -RV.SESSION_HANDLE_INVALID  # nor my sessions
        assert login(other, theirs, REF_PIN) == RV.OK
    finally:
        other.C_Finalize(None)


def test_session_objects_die_with_their_session(live: Raw) -> None:
    raw = live
    h1 = open_session(raw, REF_PIN)
    h2 = open_session(raw)
    key = U()
    mech, _ = mechanism(M.AES_KEY_GEN)
    t, keep = template((A.VALUE_LEN, 32), (A.TOKEN, False), (A.ENCRYPT, True))
    assert raw.C_GenerateKey(U(h1), byref(mech), t, U(3), byref(key)) == RV.OK
    ecb, _ = mechanism(M.AES_ECB)
    assert raw.C_EncryptInit(U(h2), byref(ecb), key) == RV.OK  # usable from another session
    out, n = create_string_buffer(16), U(16)
    assert raw.C_Encrypt(U(h2), b"0123456789abcdef", U(16), out, byref(n)) == RV.OK
    assert raw.C_CloseSession(U(h1)) == RV.OK
    assert raw.C_EncryptInit(U(h2), byref(ecb), key) == RV.KEY_HANDLE_INVALID


def test_stale_session_after_daemon_restart(raw: Raw, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    sock = tmp_path / "gw.sock"
    gw = ClusterGateway(sock, {})
    monkeypatch.setenv("HSMSIM_SOCKET", str(sock))
    try:
        assert raw.C_Initialize(None) == RV.OK
        old = open_session(raw, REF_PIN)
        gw.stop()
        n = U()
        assert raw.C_GetSlotList(c_ubyte(1), None, byref(n)) == RV.DEVICE_ERROR
        gw = ClusterGateway(sock, {})
        assert state(raw, old) == -RV.SESSION_HANDLE_INVALID
        new = open_session(raw)
        assert state(raw, new) == SessionState.RW_PUBLIC  # the new daemon: not logged in
        assert login(raw, new, REF_PIN) == RV.OK
        assert raw.C_Finalize(None) == RV.OK
    finally:
        gw.stop()
