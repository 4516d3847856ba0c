"""Handlers of slot, token and mechanism queries (and C_Finalize): the one slot CloudHSM
offers, its token, and the mechanism table (FIPS mode removes what a FIPS cluster refuses)."""

from __future__ import annotations

from hsmsim.gateway.protocol import Reader, Writer
from hsmsim.gateway.reply import OK, Reply, err
from hsmsim.gateway.service import Gateway
from hsmsim.gateway.state import Application
from hsmsim.pkcs11.constants import RV, UNAVAILABLE_INFORMATION
from hsmsim.pkcs11.mechanisms import FIPS_DISALLOWED, MECHANISMS

CKF_RNG = 0x1
CKF_LOGIN_REQUIRED = 0x4
CKF_USER_PIN_INITIALIZED = 0x8
CKF_TOKEN_INITIALIZED = 0x400
CKF_TOKEN_PRESENT = 0x1
CKF_HW_SLOT = 0x4


def check_slot(gw: Gateway, slot: int) -> None:
    if slot != gw.config.slot_id:
        raise err(RV.SLOT_ID_INVALID, f"slot {slot} does not exist")


def finalize(gw: Gateway, app: Application, r: Reader) -> Reply:
    r.end()
    return OK, b""  # the server closes the application after replying


def get_slot_list(gw: Gateway, app: Application, r: Reader) -> Reply:
    r.u8()
    r.end()
    return OK, Writer().ulongs([gw.config.slot_id]).done()


def get_slot_info(gw: Gateway, app: Application, r: Reader) -> Reply:
    check_slot(gw, r.u64())
    r.end()
    w = Writer().bytes(b"hsmsim CloudHSM cluster").bytes(b"hsmsim")
    w.u64(CKF_TOKEN_PRESENT | CKF_HW_SLOT).u8(1).u8(0).u8(1).u8(0)
    return OK, w.done()


def get_token_info(gw: Gateway, app: Application, r: Reader) -> Reply:
    check_slot(gw, r.u64())
    r.end()
    flags = CKF_RNG | CKF_LOGIN_REQUIRED | CKF_TOKEN_INITIALIZED
    if gw.config.user_pin_initialized_flag:
        flags |= CKF_USER_PIN_INITIALIZED
    n = len(app.sessions)
    w = Writer().bytes(gw.config.token_label.encode()).bytes(b"hsmsim").bytes(b"CloudHSM")
    w.bytes(gw.serial).u64(flags)
    w.u64(gw.config.max_sessions).u64(n).u64(gw.config.max_sessions).u64(n)
    w.u64(128).u64(3)  # PIN = "<user>:<password>"
    for _ in range(4):
        w.u64(UNAVAILABLE_INFORMATION)
    w.u8(1).u8(0).u8(5).u8(16).bytes(b"")
    return OK, w.done()


def get_mechanism_list(gw: Gateway, app: Application, r: Reader) -> Reply:
    check_slot(gw, r.u64())
    r.end()
    mechs = [m for m in MECHANISMS if not (gw.config.fips_mode and m in FIPS_DISALLOWED)]
    return OK, Writer().ulongs(mechs).done()


def get_mechanism_info(gw: Gateway, app: Application, r: Reader) -> Reply:
    check_slot(gw, r.u64())
    mech = r.u64()
    r.end()
    info = MECHANISMS.get(mech)
    if info is None or (gw.config.fips_mode and mech in FIPS_DISALLOWED):
        raise err(RV.MECHANISM_INVALID, f"mechanism 0x{mech:x} is not supported")
    return OK, Writer().u64(info.min_key).u64(info.max_key).u64(info.flags).done()
