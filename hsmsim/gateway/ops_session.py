"""Handlers of sessions and login: RW sessions only (the CloudHSM quirk for read-only ones),
1,024 sessions per application, and one login per application shared by all its sessions
(CloudHSM's model), with the PIN as "<user>:<password>"."""

from __future__ import annotations

import struct

from hsmsim.gateway.ops_token import check_slot
from hsmsim.gateway.protocol import Reader, Writer
from hsmsim.gateway.reply import OK, Reply, err
from hsmsim.gateway.service import Gateway
from hsmsim.gateway.state import Application, Session
from hsmsim.pkcs11.constants import RV, SessionFlag, UserType

_SESSION_INFO = struct.Struct("<QQQQ")  # slot, state, flags, device error


def open_session(gw: Gateway, app: Application, r: Reader) -> Reply:
    check_slot(gw, r.u64())
    flags = r.u64()
    r.end()
    if not flags & SessionFlag.SERIAL_SESSION:
        raise err(RV.SESSION_PARALLEL_NOT_SUPPORTED, "CKF_SERIAL_SESSION must be set")
    if not flags & SessionFlag.RW_SESSION:
        if gw.config.quirk_ro_session_fails:
            # Reproduced CloudHSM behaviour (UG:ki-pkcs11-sdk item 11).
            raise err(RV.FUNCTION_FAILED, "read-only sessions are not supported")
        if app.login is not None and app.login.user_type == UserType.SO:
            raise err(RV.SESSION_READ_WRITE_SO_EXISTS, "the SO is logged in")
    if len(app.sessions) >= gw.config.max_sessions:
        raise err(RV.SESSION_COUNT, "1,024 sessions per application")
    s = Session(gw.handles.next(), flags)
    app.sessions[s.handle] = s
    return OK, Writer().u64(s.handle).done()


async def close_session(gw: Gateway, app: Application, r: Reader) -> Reply:
    handle = r.u64()
    r.end()
    app.session(handle)
    await gw.close_session(app, handle)
    return OK, b""


async def close_all_sessions(gw: Gateway, app: Application, r: Reader) -> Reply:
    check_slot(gw, r.u64())
    r.end()
    for handle in list(app.sessions):
        await gw.close_session(app, handle)
    return OK, b""


def get_session_info(gw: Gateway, app: Application, r: Reader) -> Reply:
    s = app.session(r.u64())
    r.end()
    return OK, _SESSION_INFO.pack(gw.config.slot_id, app.state(s), int(s.flags), 0)


async def login(gw: Gateway, app: Application, r: Reader) -> Reply:
    s_handle = r.u64()
    user_type = r.u64()
    pin = r.bytes()
    r.end()
    app.session(s_handle)
    if user_type not in (UserType.SO, UserType.USER):
        raise err(RV.USER_TYPE_INVALID, "only CKU_SO (CO) and CKU_USER (CU) can log in")
    if app.login is not None:
        # CloudHSM: login is per application; a second C_Login on any session says so.
        if app.login.user_type == user_type:
            raise err(RV.USER_ALREADY_LOGGED_IN, "the application is already logged in")
        raise err(RV.USER_ANOTHER_ALREADY_LOGGED_IN, "another user type is logged in")
    if user_type == UserType.SO and any(not s.flags & SessionFlag.RW_SESSION
                                        for s in app.sessions.values()):
        raise err(RV.SESSION_READ_ONLY_EXISTS, "close read-only sessions before an SO login")
    try:
        text = pin.decode("utf-8")
    except UnicodeDecodeError:
        raise err(RV.PIN_INCORRECT, "the PIN is not UTF-8") from None
    username, sep, password = text.partition(":")
    if not sep or not username or not password:
        # UG:pkcs11-pin: the PIN is "<user>:<password>"; anything else is a failed login.
        raise err(RV.PIN_INCORRECT, "the PIN must be <user>:<password>")
    login = await gw.cluster.login(UserType(user_type), username, password)
    if gw.apps.get(app.token) is not app:  # the application ended while we waited
        await gw.cluster.logout(login)
        raise err(RV.SESSION_CLOSED, "the application has ended")
    app.login = login
    return OK, b""


async def logout(gw: Gateway, app: Application, r: Reader) -> Reply:
    app.session(r.u64())
    r.end()
    login = app.require_login()
    app.login = None  # C_Logout logs out every session of the application
    gw.key_checks.forget(login_id=login.login_id)
    for s in app.sessions.values():
        s.ops.clear()
        s.found = None
        s.wrap_cache = None
    await gw.cluster.logout(login)
    return OK, b""
