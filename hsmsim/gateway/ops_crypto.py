"""Handlers of the crypto operations: Encrypt, Decrypt, Digest, Sign and Verify (Init, the
single-part call, Update, Final). Init decodes and checks the mechanism (remembered per
mechanism bytes), validates the key at init (remembered per login and key), and with protocol
1.3 offers the direct data path (hsmsim.gateway.routes); the rest is the state machine in
hsmsim.gateway.operations."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable

from hsmsim.gateway import operations
from hsmsim.gateway.params import DecodedMechanism, decode_mechanism
from hsmsim.gateway.policy import check_params, mechanism_for
from hsmsim.gateway.protocol import DIRECT_MINOR, Reader
from hsmsim.gateway.reply import Reply, err
from hsmsim.gateway.routes import DIRECT_KINDS
from hsmsim.gateway.service import Gateway
from hsmsim.gateway.state import Application, OpKind, Session
from hsmsim.pkcs11.constants import RV, Mechanism as M
from hsmsim.pkcs11.mechanisms import MechanismInfo


def init(gw: Gateway, app: Application, r: Reader, kind: OpKind) -> Reply | Awaitable[Reply]:
    """Answered at once unless the key needs a validation round trip (then an awaitable:
    the server runs it as a task). Saves a task and a loop pass per cached *Init."""
    s = app.session(r.u64())
    # The same mechanism bytes decode and check the same way every time (they depend on
    # nothing else): remember the decoded mechanism of those that passed.
    start = r.tell()
    raw = r.span(start, -8 if kind != OpKind.DIGEST else None)
    known = gw.mechs.get(kind, raw)
    if known is not None:
        r.skip(len(raw))
        mech, info = known
    else:
        mech = decode_mechanism(r)
        consumed = r.tell() - start
    key = r.u64() if kind != OpKind.DIGEST else 0
    r.end()
    active = s.ops.get(kind)
    if active is not None and not active.speculative:
        raise err(RV.OPERATION_ACTIVE, f"a {kind.value} operation is already active")
    if known is None:
        info = mechanism_for(gw.config, mech, kind)
        check_params(gw.config, mech, kind, info)
        if consumed == len(raw):
            gw.mechs.put(kind, raw, mech, info)
    hasher = None
    if kind == OpKind.DIGEST:
        assert info.hash is not None
        hasher = hashlib.new(info.hash)
    else:
        app.require_login()
        validated = gw.key_checks.validated(app, key, kind, info)
        # AES-GCM encryption never goes direct: its descriptor carries the IV drawn at Init,
        # and a node cannot tell a replayed descriptor from a fresh one, so an application
        # could encrypt twice under one IV. Through the daemon the IV is used once.
        if (app.minor >= DIRECT_MINOR and gw.router is not None and kind in DIRECT_KINDS
                and mech.mechanism != M.CLOUDHSM_AES_GCM
                and not (kind is OpKind.ENCRYPT and mech.mechanism == M.AES_GCM)):
            return _init_direct(gw, app, s, kind, mech, info, key, validated)
        if not validated:
            return _init_after_check(gw, app, s, kind, mech, info, key)
        if info.hash:
            hasher = hashlib.new(info.hash)
    return operations.start(s, kind, mech, info, key, hasher)


def _init_direct(gw: Gateway, app: Application, s: Session, kind: OpKind, mech: DecodedMechanism,
                 info: MechanismInfo, key: int, validated: bool) -> Reply | Awaitable[Reply]:
    """A Sign/Verify/Encrypt/DecryptInit whose reply (protocol 1.3) also names the HSMs the
    module may call directly for the single-part call (docs/direct-protocol.md). Answered at
    once when the key check is cached and every holder's ticket is known."""
    assert gw.router is not None
    routes = gw.router.direct_route_cached(app.require_login(), key) if validated else None
    if routes is None:
        return _init_direct_slow(gw, app, s, kind, mech, info, key, validated)
    hasher = hashlib.new(info.hash) if info.hash else None
    rv, body = operations.start(s, kind, mech, info, key, hasher)
    return rv, body + gw.routes.section(app, s.ops[kind], routes)


async def _init_direct_slow(gw: Gateway, app: Application, s: Session, kind: OpKind,
                            mech: DecodedMechanism, info: MechanismInfo, key: int,
                            validated: bool) -> Reply:
    if not validated:
        await gw.key_checks.check(app, key, kind, info)
    assert gw.router is not None
    routes = await gw.router.direct_route(app.require_login(), key)
    if s.ops.get(kind) is not None and not s.ops[kind].speculative:
        raise err(RV.OPERATION_ACTIVE, f"a {kind.value} operation is already active")
    hasher = hashlib.new(info.hash) if info.hash else None
    rv, body = operations.start(s, kind, mech, info, key, hasher)
    return rv, body + gw.routes.section(app, s.ops[kind], routes)


async def _init_after_check(gw: Gateway, app: Application, s: Session, kind: OpKind,
                            mech: DecodedMechanism, info: MechanismInfo, key: int) -> Reply:
    await gw.key_checks.check(app, key, kind, info)
    hasher = hashlib.new(info.hash) if info.hash else None
    return operations.start(s, kind, mech, info, key, hasher)


# ---- one handler per opcode (hsmsim.gateway.dispatch) ----------------------------------------
def encrypt_init(gw: Gateway, app: Application, r: Reader) -> Reply | Awaitable[Reply]:
    return init(gw, app, r, OpKind.ENCRYPT)


def encrypt(gw: Gateway, app: Application, r: Reader) -> Reply | Awaitable[Reply]:
    return operations.single(gw, app, r, OpKind.ENCRYPT)


def encrypt_update(gw: Gateway, app: Application, r: Reader) -> Awaitable[Reply]:
    return operations.update(gw, app, r, OpKind.ENCRYPT, True)


def encrypt_final(gw: Gateway, app: Application, r: Reader) -> Awaitable[Reply]:
    return operations.final(gw, app, r, OpKind.ENCRYPT)


def decrypt_init(gw: Gateway, app: Application, r: Reader) -> Reply | Awaitable[Reply]:
    return init(gw, app, r, OpKind.DECRYPT)


def decrypt(gw: Gateway, app: Application, r: Reader) -> Reply | Awaitable[Reply]:
    return operations.single(gw, app, r, OpKind.DECRYPT)


def decrypt_update(gw: Gateway, app: Application, r: Reader) -> Awaitable[Reply]:
    return operations.update(gw, app, r, OpKind.DECRYPT, True)


def decrypt_final(gw: Gateway, app: Application, r: Reader) -> Awaitable[Reply]:
    return operations.final(gw, app, r, OpKind.DECRYPT)


def digest_init(gw: Gateway, app: Application, r: Reader) -> Reply | Awaitable[Reply]:
    return init(gw, app, r, OpKind.DIGEST)


def digest(gw: Gateway, app: Application, r: Reader) -> Reply | Awaitable[Reply]:
    return operations.single(gw, app, r, OpKind.DIGEST)


def digest_update(gw: Gateway, app: Application, r: Reader) -> Awaitable[Reply]:
    return operations.update(gw, app, r, OpKind.DIGEST, False)


def digest_final(gw: Gateway, app: Application, r: Reader) -> Awaitable[Reply]:
    return operations.final(gw, app, r, OpKind.DIGEST)


def sign_init(gw: Gateway, app: Application, r: Reader) -> Reply | Awaitable[Reply]:
    return init(gw, app, r, OpKind.SIGN)


def sign(gw: Gateway, app: Application, r: Reader) -> Reply | Awaitable[Reply]:
    return operations.single(gw, app, r, OpKind.SIGN)


def sign_update(gw: Gateway, app: Application, r: Reader) -> Awaitable[Reply]:
    return operations.update(gw, app, r, OpKind.SIGN, False)


def sign_final(gw: Gateway, app: Application, r: Reader) -> Awaitable[Reply]:
    return operations.final(gw, app, r, OpKind.SIGN)


def verify_init(gw: Gateway, app: Application, r: Reader) -> Reply | Awaitable[Reply]:
    return init(gw, app, r, OpKind.VERIFY)


def verify(gw: Gateway, app: Application, r: Reader) -> Awaitable[Reply]:
    return operations.verify_single(gw, app, r)


def verify_update(gw: Gateway, app: Application, r: Reader) -> Awaitable[Reply]:
    return operations.update(gw, app, r, OpKind.VERIFY, False)


def verify_final(gw: Gateway, app: Application, r: Reader) -> Awaitable[Reply]:
    return operations.verify_final(gw, app, r)
