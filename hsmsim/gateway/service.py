"""The gateway's PKCS#11 semantics: one handler per opcode, turning a decoded request into calls on
the `ClusterClient` with CloudHSM Client SDK 5 behaviour (login per application, RW sessions only,
mechanism table, local hashing, GCM IV rules, data limits, output-length conventions, quirks)."""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from hsmsim.cluster.api import ClusterClient, DirectRouting, Login
from hsmsim.gateway.config import GatewayConfig
from hsmsim.gateway.multipart import MAX_BUFFERED, PIECE, CipherStream, streams
from hsmsim.gateway.params import DecodedMechanism, decode_mechanism
from hsmsim.gateway.protocol import DIRECT_MINOR, Op, Reader, Writer
from hsmsim.gateway.state import Application, HandleSource, Operation, OpKind, Session
from hsmsim.node import codec as node_codec
from hsmsim.node.direct import descriptor_mac, encode_descriptor
from hsmsim.gateway.templates import (check_secret_template, decode_find_template, decode_template,
                                      key_pair_templates, with_defaults)
from hsmsim.pkcs11 import attributes
from hsmsim.pkcs11.constants import (RV, UNAVAILABLE_INFORMATION, Attribute as A, KeyType, Mechanism as M,
                                     MechanismFlag as F, ObjectClass, SessionFlag, UserType)
from hsmsim.pkcs11.errors import Pkcs11Error
from hsmsim.pkcs11.mechanisms import (DIGEST_INFO, FIPS_DISALLOWED, FIPS_DISALLOWED_ENCRYPT,
                                      HASH_OF_MECHANISM, MECHANISMS, MGF_OF_HASH, MechanismInfo)
from hsmsim.pkcs11.params import (GcmParams, MechanismSpec, OaepParams, PssParams, RawParams,
                                  RsaAesKeyWrapParams)

log = logging.getLogger(__name__)

Reply = tuple[int, bytes]
OK = int(RV.OK)
GCM_IV_LEN = 12
CKF_RNG = 0x1
CKF_LOGIN_REQUIRED = 0x4
CKF_USER_PIN_INITIALIZED = 0x8
CKF_TOKEN_INITIALIZED = 0x400
CKF_TOKEN_PRESENT = 0x1
CKF_HW_SLOT = 0x4
AES_WRAP_DEFAULT_IV = bytes.fromhex("A6A6A6A6A6A6A6A6")
_GCM = (M.AES_GCM, M.CLOUDHSM_AES_GCM)
_VENDOR_WRAPS = (M.CLOUDHSM_AES_KEY_WRAP_NO_PAD, M.CLOUDHSM_AES_KEY_WRAP_PKCS5_PAD,
                 M.CLOUDHSM_AES_KEY_WRAP_ZERO_PAD)
_USAGE = {OpKind.ENCRYPT: A.ENCRYPT, OpKind.DECRYPT: A.DECRYPT, OpKind.SIGN: A.SIGN,
          OpKind.VERIFY: A.VERIFY}
_FLAG = {OpKind.ENCRYPT: F.ENCRYPT, OpKind.DECRYPT: F.DECRYPT, OpKind.SIGN: F.SIGN,
         OpKind.VERIFY: F.VERIFY, OpKind.DIGEST: F.DIGEST}
# The opcodes of each operation kind (request flag DIRECT_DONE names the kind by its opcode).
_KIND_OF_OP = {int(o): k for k, ops in (
    (OpKind.ENCRYPT, (Op.EncryptInit, Op.Encrypt, Op.EncryptUpdate, Op.EncryptFinal)),
    (OpKind.DECRYPT, (Op.DecryptInit, Op.Decrypt, Op.DecryptUpdate, Op.DecryptFinal)),
    (OpKind.SIGN, (Op.SignInit, Op.Sign, Op.SignUpdate, Op.SignFinal)),
    (OpKind.VERIFY, (Op.VerifyInit, Op.Verify, Op.VerifyUpdate, Op.VerifyFinal))) for o in ops}
_DIRECT_KINDS = (OpKind.ENCRYPT, OpKind.DECRYPT, OpKind.SIGN, OpKind.VERIFY)


_SESSION_INFO = struct.Struct("<QQQQ")  # slot, state, flags, device error


def _err(rv: RV, msg: str) -> Pkcs11Error:
    return Pkcs11Error(rv, msg)


def _with_iv(r: Any) -> tuple[bytes, bytes | None]:
    return r.data, r.iv


def _iv_first(r: Any) -> tuple[bytes, bytes | None]:
    return (r.iv or b"") + r.data, None  # CKM_CLOUDHSM_AES_GCM: IV || ciphertext || tag


def _as_output(r: Any) -> tuple[bytes, bytes | None]:
    return bytes(r), None


def _with_chosen_iv(iv: bytes) -> Callable[[Any], tuple[bytes, bytes | None]]:
    """CKM_AES_GCM encryption: the node's answer, which must use the IV chosen at C_EncryptInit
    (the application already holds it in pIv)."""
    def output(r: Any) -> tuple[bytes, bytes | None]:
        if r.iv != iv:
            raise _err(RV.DEVICE_ERROR, "the HSM did not use the IV chosen at C_EncryptInit")
        return r.data, r.iv
    return output


class HsmCall(NamedTuple):
    """One call the cluster runs for an operation, and how its answer becomes the output.
    (A NamedTuple, not a frozen dataclass: it is built on every Encrypt, Decrypt and Sign.)"""

    verb: str  # "encrypt", "decrypt" or "sign"
    login: Login
    spec: MechanismSpec
    data: bytes
    output: Callable[[Any], tuple[bytes, bytes | None]]


class OutSpec:
    """The caller's output buffer: absent (a length query), its capacity, or (protocol 1.1,
    value 2) a length query whose result the module keeps to answer the follow-up call."""

    __slots__ = ("present", "capacity", "speculative")

    def __init__(self, r: Reader, allow_speculative: bool = False) -> None:
        kind = r.u8()
        self.present = kind == 1
        self.speculative = kind == 2 and allow_speculative
        self.capacity = r.u64()

    def reply(self, data: bytes, extra: bytes | None = None) -> tuple[Reply, bool]:
        """(reply, delivered): the PKCS#11 output-length convention."""
        w = Writer().u64(len(data))
        if self.speculative:
            rv = OK
            w.u8(1).bytes(data)
        elif not self.present:
            rv = OK
            w.u8(0).bytes(b"")
        elif self.capacity < len(data):
            rv = int(RV.BUFFER_TOO_SMALL)
            w.u8(0).bytes(b"")
        else:
            rv = OK
            w.u8(1).bytes(data)
        if extra is not None:
            w.bytes(extra)
        delivered = self.present and rv == OK
        return (rv, w.done()), delivered


class Gateway:
    """All applications of one daemon and the handlers that serve them."""

    def __init__(self, cluster: ClusterClient, config: GatewayConfig) -> None:
        self.cluster = cluster
        self.config = config
        self.apps: dict[bytes, Application] = {}
        self.handles = HandleSource()
        self._validated: dict[tuple[int, int, OpKind], tuple[float, Any]] = {}
        self._mechs: dict[tuple[OpKind, bytes], tuple[DecodedMechanism, MechanismInfo]] = {}
        self._serial = b"hsmsim"
        # the daemon's cluster routes direct calls; a ClusterClient without it never offers them.
        # While the call trace is on no direct route is offered either: every call then passes
        # the daemon and is in the trace (slower, but complete).
        self._router: DirectRouting | None = (
            cluster if hasattr(cluster, "direct_route") and not config.trace_calls
            else None)  # type: ignore[assignment]
        # descriptors and their MACs per ticket, made once (every Init of a key asks again)
        self._descs: dict[tuple[Any, ...], bytes] = {}
        self._macs: dict[tuple[bytes, bytes], bytes] = {}
        # sync handlers answer at once; a few (the *Init calls) may instead return an awaitable
        # when they need the cluster
        self.sync: dict[int, Callable[[Application, Reader], Reply | Awaitable[Reply]]] = {}
        self.async_: dict[int, Callable[[Application, Reader], Awaitable[Reply]]] = {}
        for op in Op:
            fn = getattr(self, f"op_{op.name}", None)
            if fn is None:
                continue
            if inspect.iscoroutinefunction(fn):
                self.async_[int(op)] = fn
            else:
                self.sync[int(op)] = fn

    async def prepare(self) -> None:
        try:
            info = await self.cluster.info()
            self._serial = info.cluster_id.removeprefix("cluster-").encode()[:16]
        except Exception:  # the token serial is cosmetic; never fail start-up on it
            log.warning("cluster info unavailable for the token serial number")

    # ---- application lifetime -----------------------------------------------------------------
    async def close_application(self, app: Application) -> None:
        """The last connection left or C_Finalize: sessions close (session objects die), logout."""
        self.apps.pop(app.token, None)
        login = app.login
        for handle in list(app.sessions):
            await self._close_session(app, handle)
        app.login = None
        if login is not None:
            try:
                await self.cluster.logout(login)
            except Exception as exc:  # noqa: BLE001 - best effort at teardown
                log.info("logout at application close failed: %s", type(exc).__name__)

    async def _close_session(self, app: Application, handle: int) -> None:
        app.sessions.pop(handle, None)
        if app.login is not None:  # its session objects die: forget keys checked at init
            self._forget_validated(login_id=app.login.login_id)
        try:
            await self.cluster.close_session(app.login, handle)
        except Exception as exc:  # noqa: BLE001 - the session is gone either way
            log.info("close_session failed: %s", type(exc).__name__)
        if not app.sessions and app.login is not None:
            # PKCS#11: closing the application's last session ends its login. (CloudHSM keeps
            # the others logged in when one closes, which per-application login gives.)
            # FIDELITY: what CloudHSM does when the last session closes is not documented.
            login, app.login = app.login, None
            try:
                await self.cluster.logout(login)
            except Exception as exc:  # noqa: BLE001
                log.info("logout failed: %s", type(exc).__name__)

    # ---- slot, token, mechanisms (synchronous) ----------------------------------------------------
    def _slot(self, slot: int) -> None:
        if slot != self.config.slot_id:
            raise _err(RV.SLOT_ID_INVALID, f"slot {slot} does not exist")

    def op_Finalize(self, app: Application, r: Reader) -> Reply:
        r.end()
        return OK, b""  # the server closes the application after replying

    def op_GetSlotList(self, app: Application, r: Reader) -> Reply:
        r.u8()
        r.end()
        return OK, Writer().ulongs([self.config.slot_id]).done()

    def op_GetSlotInfo(self, app: Application, r: Reader) -> Reply:
        self._slot(r.u64())
        r.end()
        w = Writer().bytes(b"hsmsim CloudHSM cluster").bytes(b"hsmsim")
        w.u64(CKF_TOKEN_PRESENT | CKF_HW_SLOT).u8(1).u8(0).u8(1).u8(0)
        return OK, w.done()

    def op_GetTokenInfo(self, app: Application, r: Reader) -> Reply:
        self._slot(r.u64())
        r.end()
        flags = CKF_RNG | CKF_LOGIN_REQUIRED | CKF_TOKEN_INITIALIZED
        if self.config.user_pin_initialized_flag:
            flags |= CKF_USER_PIN_INITIALIZED
        n = len(app.sessions)
        w = Writer().bytes(self.config.token_label.encode()).bytes(b"hsmsim").bytes(b"CloudHSM")
        w.bytes(self._serial).u64(flags)
        w.u64(self.config.max_sessions).u64(n).u64(self.config.max_sessions).u64(n)
        w.u64(128).u64(3)  # PIN = "<user>:<password>"
        for _ in range(4):
            w.u64(UNAVAILABLE_INFORMATION)
        w.u8(1).u8(0).u8(5).u8(16).bytes(b"")
        return OK, w.done()

    def op_GetMechanismList(self, app: Application, r: Reader) -> Reply:
        self._slot(r.u64())
        r.end()
        mechs = [m for m in MECHANISMS if not (self.config.fips_mode and m in FIPS_DISALLOWED)]
        return OK, Writer().ulongs(mechs).done()

    def op_GetMechanismInfo(self, app: Application, r: Reader) -> Reply:
        self._slot(r.u64())
        mech = r.u64()
        r.end()
        info = MECHANISMS.get(mech)
        if info is None or (self.config.fips_mode and mech in FIPS_DISALLOWED):
            raise _err(RV.MECHANISM_INVALID, f"mechanism 0x{mech:x} is not supported")
        return OK, Writer().u64(info.min_key).u64(info.max_key).u64(info.flags).done()

    # ---- sessions and login --------------------------------------------------------------------
    def op_OpenSession(self, app: Application, r: Reader) -> Reply:
        self._slot(r.u64())
        flags = r.u64()
        r.end()
        if not flags & SessionFlag.SERIAL_SESSION:
            raise _err(RV.SESSION_PARALLEL_NOT_SUPPORTED, "CKF_SERIAL_SESSION must be set")
        if not flags & SessionFlag.RW_SESSION:
            if self.config.quirk_ro_session_fails:
                # Reproduced CloudHSM behaviour (UG:ki-pkcs11-sdk item 11).
                raise _err(RV.FUNCTION_FAILED, "read-only sessions are not supported")
            if app.login is not None and app.login.user_type == UserType.SO:
                raise _err(RV.SESSION_READ_WRITE_SO_EXISTS, "the SO is logged in")
        if len(app.sessions) >= self.config.max_sessions:
            raise _err(RV.SESSION_COUNT, "1,024 sessions per application")
        s = Session(self.handles.next(), flags)
        app.sessions[s.handle] = s
        return OK, Writer().u64(s.handle).done()

    async def op_CloseSession(self, app: Application, r: Reader) -> Reply:
        handle = r.u64()
        r.end()
        app.session(handle)
        await self._close_session(app, handle)
        return OK, b""

    async def op_CloseAllSessions(self, app: Application, r: Reader) -> Reply:
        self._slot(r.u64())
        r.end()
        for handle in list(app.sessions):
            await self._close_session(app, handle)
        return OK, b""

    def op_GetSessionInfo(self, app: Application, r: Reader) -> Reply:
        s = app.session(r.u64())
        r.end()
        return OK, _SESSION_INFO.pack(self.config.slot_id, app.state(s), int(s.flags), 0)

    async def op_Login(self, app: Application, r: Reader) -> Reply:
        s_handle = r.u64()
        user_type = r.u64()
        pin = r.bytes()
        r.end()
        app.session(s_handle)
        if user_type not in (UserType.SO, UserType.USER):
            raise _err(RV.USER_TYPE_INVALID, "only CKU_SO (CO) and CKU_USER (CU) can log in")
        if app.login is not None:
            # CloudHSM: login is per application; a second C_Login on any session says so.
            if app.login.user_type == user_type:
                raise _err(RV.USER_ALREADY_LOGGED_IN, "the application is already logged in")
            raise _err(RV.USER_ANOTHER_ALREADY_LOGGED_IN, "another user type is logged in")
        if user_type == UserType.SO and any(not s.flags & SessionFlag.RW_SESSION
                                            for s in app.sessions.values()):
            raise _err(RV.SESSION_READ_ONLY_EXISTS, "close read-only sessions before an SO login")
        try:
            text = pin.decode("utf-8")
        except UnicodeDecodeError:
            raise _err(RV.PIN_INCORRECT, "the PIN is not UTF-8") from None
        username, sep, password = text.partition(":")
        if not sep or not username or not password:
            # UG:pkcs11-pin: the PIN is "<user>:<password>"; anything else is a failed login.
            raise _err(RV.PIN_INCORRECT, "the PIN must be <user>:<password>")
        login = await self.cluster.login(UserType(user_type), username, password)
        if self.apps.get(app.token) is not app:  # the application ended while we waited
            await self.cluster.logout(login)
            raise _err(RV.SESSION_CLOSED, "the application has ended")
        app.login = login
        return OK, b""

    async def op_Logout(self, app: Application, r: Reader) -> Reply:
        app.session(r.u64())
        r.end()
        login = app.require_login()
        app.login = None  # C_Logout logs out every session of the application
        self._forget_validated(login_id=login.login_id)
        for s in app.sessions.values():
            s.ops.clear()
            s.found = None
            s.wrap_cache = None
        await self.cluster.logout(login)
        return OK, b""

    # ---- objects ----------------------------------------------------------------------------------
    async def op_CreateObject(self, app: Application, r: Reader) -> Reply:
        s = app.session(r.u64())
        t = decode_template(r)
        r.end()
        login = app.require_login()
        cls = t.get(A.CLASS)
        if not isinstance(cls, int) or isinstance(cls, bool):
            raise _err(RV.TEMPLATE_INCOMPLETE, "CKA_CLASS is required")
        if cls in (ObjectClass.PUBLIC_KEY, ObjectClass.PRIVATE_KEY, ObjectClass.SECRET_KEY):
            if A.KEY_TYPE not in t:
                raise _err(RV.TEMPLATE_INCOMPLETE, "CKA_KEY_TYPE is required")
            t = with_defaults(t, cls)
        handle = await self.cluster.create_object(login, t, s.handle)
        return OK, Writer().u64(handle).done()

    async def op_CopyObject(self, app: Application, r: Reader) -> Reply:
        s = app.session(r.u64())
        handle = r.u64()
        t = decode_template(r)
        r.end()
        login = app.require_login()
        if self.config.quirk_unsupported_api:
            # FIDELITY: C_CopyObject is not in the SDK 5 API list (UG:pkcs11-apis); the return
            # code for unlisted functions is not documented, we use CKR_FUNCTION_NOT_SUPPORTED.
            raise _err(RV.FUNCTION_NOT_SUPPORTED, "C_CopyObject is not supported")
        new = await self.cluster.copy_object(login, handle, t, s.handle)
        return OK, Writer().u64(new).done()

    async def op_DestroyObject(self, app: Application, r: Reader) -> Reply:
        app.session(r.u64())
        handle = r.u64()
        r.end()
        await self.cluster.destroy_object(app.require_login(), handle)
        self._forget_validated(handle=handle)
        return OK, b""

    def op_GetObjectSize(self, app: Application, r: Reader) -> Reply:
        app.session(r.u64())
        r.u64()
        r.end()
        app.require_login()
        # FIDELITY: not in the SDK 5 API list (UG:pkcs11-apis); the size is unavailable anyway.
        if self.config.quirk_unsupported_api:
            raise _err(RV.FUNCTION_NOT_SUPPORTED, "C_GetObjectSize is not supported")
        return OK, Writer().u64(UNAVAILABLE_INFORMATION).done()

    async def op_GetAttributeValue(self, app: Application, r: Reader) -> Reply:
        app.session(r.u64())
        handle = r.u64()
        n = r.count()
        wanted = [(r.u64(), r.u8() != 0, r.u64()) for _ in range(n)]
        r.end()
        login = app.require_login()
        results = await self.cluster.get_attributes(login, handle, [t for t, _, _ in wanted])
        if len(results) != len(wanted):
            raise _err(RV.GENERAL_ERROR, "cluster returned a different number of attributes")
        w = Writer().u32(n)
        seen: set[int] = set()
        for (attr, present, cap), res in zip(wanted, results):
            if res.rv != OK or res.value is None:
                seen.add(res.rv or int(RV.ATTRIBUTE_TYPE_INVALID))
                w.u64(UNAVAILABLE_INFORMATION).u8(0).bytes(b"")
                continue
            raw = attributes.encode(attr, res.value)
            if not present:
                w.u64(len(raw)).u8(0).bytes(b"")
            elif cap < len(raw):
                seen.add(int(RV.BUFFER_TOO_SMALL))
                w.u64(UNAVAILABLE_INFORMATION).u8(0).bytes(b"")
            else:
                w.u64(len(raw)).u8(1).bytes(raw)
        rv = OK
        for candidate in (RV.ATTRIBUTE_SENSITIVE, RV.ATTRIBUTE_TYPE_INVALID, RV.BUFFER_TOO_SMALL):
            if int(candidate) in seen:
                rv = int(candidate)
                break
        return rv, w.done()

    async def op_SetAttributeValue(self, app: Application, r: Reader) -> Reply:
        app.session(r.u64())
        handle = r.u64()
        t = decode_template(r)
        r.end()
        login = app.require_login()
        if self.config.quirk_unsupported_api:
            # UG:pkcs11-apis: C_SetAttributeValue is supported only for certificate objects
            # (UG:pkcs11-certificate-storage-api); key attributes change through CloudHSM CLI.
            res = await self.cluster.get_attributes(login, handle, [A.CLASS])
            if not res or res[0].value != ObjectClass.CERTIFICATE:
                raise _err(RV.FUNCTION_NOT_SUPPORTED, "C_SetAttributeValue works on certificates only")
        await self.cluster.set_attributes(login, handle, t)
        return OK, b""

    async def op_FindObjectsInit(self, app: Application, r: Reader) -> Reply:
        s = app.session(r.u64())
        t = decode_find_template(r)
        r.end()
        if s.found is not None and not self.config.quirk_wrong_sequence_ok:
            raise _err(RV.OPERATION_ACTIVE, "a search is already active")
        # Reproduced quirk (UG:ki-pkcs11-sdk item 10): a second C_FindObjectsInit succeeds.
        if app.login is None or t is None:
            # FIDELITY: without a login CloudHSM shows nothing; we answer an empty search. An
            # attribute type no object has (decode_find_template) matches nothing either.
            s.found = []
            return OK, b""
        s.found = list(await self.cluster.find_objects(app.login, t, s.handle))
        return OK, b""

    def op_FindObjects(self, app: Application, r: Reader) -> Reply:
        s = app.session(r.u64())
        limit = r.u64()
        r.end()
        if s.found is None:
            raise _err(RV.OPERATION_NOT_INITIALIZED, "C_FindObjectsInit first")
        n = min(limit, len(s.found), 1 << 20)
        batch, s.found = s.found[:n], s.found[n:]
        return OK, Writer().ulongs(batch).done()

    def op_FindObjectsFinal(self, app: Application, r: Reader) -> Reply:
        s = app.session(r.u64())
        r.end()
        if s.found is None:
            raise _err(RV.OPERATION_NOT_INITIALIZED, "no search is active")
        s.found = None
        return OK, b""

    # ---- operation set-up -----------------------------------------------------------------------
    def _mechanism(self, mech: DecodedMechanism, kind: OpKind) -> MechanismInfo:
        info = MECHANISMS.get(mech.mechanism)
        if info is None or not info.flags & _FLAG[kind]:
            raise _err(RV.MECHANISM_INVALID, f"mechanism 0x{mech.mechanism:x} cannot {kind.value}")
        if self.config.fips_mode and (mech.mechanism in FIPS_DISALLOWED or (
                kind == OpKind.ENCRYPT and mech.mechanism in FIPS_DISALLOWED_ENCRYPT)):
            raise _err(RV.MECHANISM_INVALID, "disallowed in FIPS mode")
        return info

    def _check_params(self, mech: DecodedMechanism, kind: OpKind, info: MechanismInfo) -> None:
        m, p = mech.mechanism, mech.spec.param
        bad = RV.MECHANISM_PARAM_INVALID
        if m in _GCM:
            if not isinstance(p, GcmParams):
                raise _err(bad, "AES-GCM needs CK_GCM_PARAMS")
            if p.tag_bits not in (96, 104, 112, 120, 128):
                raise _err(bad, "ulTagBits must be 96..128 in steps of 8")
            if m == M.CLOUDHSM_AES_GCM:
                # UG:pkcs11-mechanisms footnote 3: pIv must be NULL; the IV travels with the data.
                if mech.iv_present:
                    raise _err(bad, "CKM_CLOUDHSM_AES_GCM takes a NULL pIv")
            elif kind == OpKind.ENCRYPT and self.config.quirk_gcm_hsm_iv:
                if not mech.iv_present or len(p.iv) == 0:
                    raise _err(bad, "Expected 'ulIvBits' or 'ulIvLen' to be non-zero")
                if len(p.iv) != GCM_IV_LEN or any(p.iv):
                    raise _err(bad, "Iv invalid. Reason: Expect IV to be all 0")
            elif len(p.iv) == 0:
                raise _err(bad, "an IV is required")
        elif m in (M.AES_CBC, M.AES_CBC_PAD, M.DES3_CBC, M.DES3_CBC_PAD):
            size = 16 if m in (M.AES_CBC, M.AES_CBC_PAD) else 8
            if not isinstance(p, RawParams) or len(p.data) != size:
                raise _err(bad, f"the IV must be {size} bytes")
        elif m == M.AES_CTR:
            if p is None or type(p).__name__ != "CtrParams":
                raise _err(bad, "AES-CTR needs CK_AES_CTR_PARAMS")
        elif m == M.RSA_PKCS_OAEP:
            if not isinstance(p, OaepParams):
                raise _err(bad, "OAEP needs CK_RSA_PKCS_OAEP_PARAMS")
            name = HASH_OF_MECHANISM.get(p.hash_alg)
            # UG:pkcs11-mechanisms footnote 4: the MGF1 hash must match the OAEP hash.
            if name is None or MGF_OF_HASH[name] != p.mgf:
                raise _err(bad, "OAEP hash and MGF1 must match (SHA-1/224/256/384/512)")
        elif m == M.RSA_PKCS_PSS or info.raw == M.RSA_PKCS_PSS:
            if not isinstance(p, PssParams):
                raise _err(bad, "PSS needs CK_RSA_PKCS_PSS_PARAMS")
            name = HASH_OF_MECHANISM.get(p.hash_alg)
            if name is None or MGF_OF_HASH[name] != p.mgf or (info.hash and info.hash != name):
                raise _err(bad, "PSS hash and MGF1 must match the mechanism")
        elif p is not None and not (isinstance(p, RawParams) and not p.data):
            if m not in _VENDOR_WRAPS:
                raise _err(bad, f"mechanism 0x{m:x} takes no parameter")

    def _key_validated(self, app: Application, key: int, kind: OpKind, info: MechanismInfo) -> bool:
        """True when validate-key-at-init needs no round trip (off, or a cached success); the
        cached key type is checked here."""
        if not self.config.validate_key_at_init:
            return True
        login = app.require_login()
        hit = self._validated.get((login.login_id, key, kind))
        if hit is None or hit[0] <= time.monotonic():
            return False
        self._check_key_type(hit[1], info)
        return True

    @staticmethod
    def _check_key_type(key_type: Any, info: MechanismInfo) -> None:
        if info.key_type is not None and key_type is not None and key_type != info.key_type:
            raise _err(RV.KEY_TYPE_INCONSISTENT, "the key type does not fit the mechanism")

    async def _check_key(self, app: Application, key: int, kind: OpKind, info: MechanismInfo) -> None:
        """UG:configure-sdk-5 validate-key-at-init: one round trip to check the key (callers
        first try `_key_validated`)."""
        login = app.require_login()
        now = time.monotonic()
        try:
            res = await self.cluster.get_attributes(login, key, [A.KEY_TYPE, _USAGE[kind]])
        except Pkcs11Error as exc:
            if exc.rv in (RV.OBJECT_HANDLE_INVALID, RV.KEY_HANDLE_INVALID):
                raise _err(RV.KEY_HANDLE_INVALID, "no such key") from None
            raise
        key_type, usage = res[0].value, res[1].value
        if usage is False:
            raise _err(RV.KEY_FUNCTION_NOT_PERMITTED, f"the key does not allow {kind.value}")
        if self.config.validate_key_cache_seconds > 0:
            if len(self._validated) > 100_000:
                self._validated.clear()
            self._validated[(login.login_id, key, kind)] = (
                now + self.config.validate_key_cache_seconds, key_type)
        self._check_key_type(key_type, info)

    def _forget_validated(self, *, handle: int | None = None, login_id: int | None = None) -> None:
        for k in [k for k in self._validated if k[1] == handle or k[0] == login_id]:
            del self._validated[k]

    def _init(self, app: Application, r: Reader, kind: OpKind) -> Reply | Awaitable[Reply]:
        """Answered at once unless the key needs a validation round trip (then an awaitable:
        the server runs it as a task). Saves a task and a loop pass per cached *Init."""
        s = app.session(r.u64())
        # The same mechanism bytes decode and check the same way every time (they depend on
        # nothing else): remember the decoded mechanism of those that passed.
        start = r.tell()
        raw = r.span(start, -8 if kind != OpKind.DIGEST else None)
        known = self._mechs.get((kind, raw))
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
            raise _err(RV.OPERATION_ACTIVE, f"a {kind.value} operation is already active")
        if known is None:
            info = self._mechanism(mech, kind)
            self._check_params(mech, kind, info)
            if consumed == len(raw):
                if len(self._mechs) >= 1024:
                    self._mechs.clear()
                self._mechs[(kind, raw)] = (mech, info)
        hasher = None
        if kind == OpKind.DIGEST:
            assert info.hash is not None
            hasher = hashlib.new(info.hash)
        else:
            app.require_login()
            validated = self._key_validated(app, key, kind, info)
            # AES-GCM encryption never goes direct: its descriptor carries the IV drawn at Init,
            # and a node cannot tell a replayed descriptor from a fresh one, so an application
            # could encrypt twice under one IV. Through the daemon the IV is used once.
            if (app.minor >= DIRECT_MINOR and self._router is not None and kind in _DIRECT_KINDS
                    and mech.mechanism != M.CLOUDHSM_AES_GCM
                    and not (kind is OpKind.ENCRYPT and mech.mechanism == M.AES_GCM)):
                return self._init_direct(app, s, kind, mech, info, key, validated)
            if not validated:
                return self._init_after_check(app, s, kind, mech, info, key)
            if info.hash:
                hasher = hashlib.new(info.hash)
        return self._start(s, kind, mech, info, key, hasher)

    def _init_direct(self, app: Application, s: Session, kind: OpKind, mech: DecodedMechanism,
                     info: MechanismInfo, key: int, validated: bool) -> Reply | Awaitable[Reply]:
        """A Sign/Verify/Encrypt/DecryptInit whose reply (protocol 1.3) also names the HSMs the
        module may call directly for the single-part call (docs/direct-protocol.md). Answered at
        once when the key check is cached and every holder's ticket is known."""
        assert self._router is not None
        routes = self._router.direct_route_cached(app.require_login(), key) if validated else None
        if routes is None:
            return self._init_direct_slow(app, s, kind, mech, info, key, validated)
        hasher = hashlib.new(info.hash) if info.hash else None
        rv, body = self._start(s, kind, mech, info, key, hasher)
        return rv, body + self._direct_section(s.ops[kind], routes)

    async def _init_direct_slow(self, app: Application, s: Session, kind: OpKind,
                                mech: DecodedMechanism, info: MechanismInfo, key: int,
                                validated: bool) -> Reply:
        if not validated:
            await self._check_key(app, key, kind, info)
        assert self._router is not None
        routes = await self._router.direct_route(app.require_login(), key)
        if s.ops.get(kind) is not None and not s.ops[kind].speculative:
            raise _err(RV.OPERATION_ACTIVE, f"a {kind.value} operation is already active")
        hasher = hashlib.new(info.hash) if info.hash else None
        rv, body = self._start(s, kind, mech, info, key, hasher)
        return rv, body + self._direct_section(s.ops[kind], routes)

    def _direct_section(self, op: Operation, routes: list[Any]) -> bytes:
        w = Writer()
        if not routes:
            return w.u8(0).done()
        desc = self._descriptor(op)
        w.u8(len(routes)).bytes(desc)
        macs = self._macs
        if len(macs) > 65536:
            macs.clear()
        for route in routes:
            mac = macs.get((desc, route.ticket))
            if mac is None:
                mac = macs[(desc, route.ticket)] = descriptor_mac(route.key, desc)
            w.bytes(route.address.removeprefix("unix:").encode()).bytes(route.ticket)
            w.bytes(mac).u32(max(1, int(route.timeout_s * 1000)))
        return w.done()

    def _descriptor(self, op: Operation) -> bytes:
        """What the HSM does with a direct call's data: the operation as the daemon would run it
        (`_hsm_call`, `_prepared`, `_limit`), MACed per ticket so the application cannot alter it."""
        m, p = op.mech.mechanism, op.mech.spec.param
        # a GCM encryption's descriptor carries its own IV: never the same twice
        cache = None if (op.kind == OpKind.ENCRYPT and m == M.AES_GCM) else (op.kind, op.mech.spec, op.key)
        if cache is not None:
            known = self._descs.get(cache)
            if known is not None:
                return known
        limit = op.info.max_data if self.config.quirk_data_limits else None
        spec, hash_name, prefix, overhead = op.mech.spec, None, b"", 0
        if op.kind in (OpKind.SIGN, OpKind.VERIFY) and op.info.hash is not None:
            hash_name, limit = op.info.hash, None
            if op.info.raw == M.RSA_PKCS:
                spec, prefix = MechanismSpec(M.RSA_PKCS), DIGEST_INFO[op.info.hash]
            elif op.info.raw == M.RSA_PKCS_PSS:
                spec = MechanismSpec(M.RSA_PKCS_PSS, p)
            else:
                spec = MechanismSpec(M.ECDSA)
        elif op.kind == OpKind.DECRYPT and m == M.AES_GCM:
            assert isinstance(p, GcmParams)
            overhead = p.tag_bits // 8
        desc = encode_descriptor(op.kind.value, op.key, node_codec.mech_to_wire(spec), hash_name,
                                 prefix, limit, overhead, PIECE)
        if cache is not None:
            if len(self._descs) > 4096:
                self._descs.clear()
            self._descs[cache] = desc
        return desc

    def direct_done(self, app: Application, op: int, body: memoryview) -> None:
        """Request flag DIRECT_DONE: the module finished this session's operation of `op`'s kind
        on an HSM; it ends here before the request is handled."""
        kind = _KIND_OF_OP.get(op)
        if kind is None or len(body) < 8:
            return
        s = app.sessions.get(int.from_bytes(body[:8], "little"))
        if s is not None:
            s.ops.pop(kind, None)

    async def _init_after_check(self, app: Application, s: Session, kind: OpKind, mech: DecodedMechanism,
                                info: MechanismInfo, key: int) -> Reply:
        await self._check_key(app, key, kind, info)
        hasher = hashlib.new(info.hash) if info.hash else None
        return self._start(s, kind, mech, info, key, hasher)

    @staticmethod
    def _start(s: Session, kind: OpKind, mech: DecodedMechanism, info: MechanismInfo, key: int,
               hasher: Any) -> Reply:
        """Makes the session's operation. The EncryptInit reply (protocol 1.2) carries `bytes iv`:
        for CKM_AES_GCM the IV of this encryption, else empty."""
        if kind != OpKind.ENCRYPT:
            s.ops[kind] = Operation(kind, mech, info, key, hasher)
            return OK, b""
        iv = b""
        if mech.mechanism == M.AES_GCM:
            # FIDELITY: CloudHSM's HSM draws the IV at C_Encrypt and the library writes it into
            # pIv then. We draw it here, on the daemon's side (never from the application), and
            # the module writes it into pIv before C_EncryptInit returns: a module that wrote
            # through pIv at C_Encrypt would write into memory the caller may have freed (Java's
            # SunPKCS11 does). The node encrypts with this IV (GcmParams.iv_chosen); one
            # EncryptInit gives one IV, and only one ciphertext under it reaches the application.
            p = mech.spec.param
            assert isinstance(p, GcmParams)
            iv = os.urandom(GCM_IV_LEN)
            chosen = GcmParams(iv, p.aad, p.tag_bits, iv_chosen=True)
            mech = DecodedMechanism(MechanismSpec(M.AES_GCM, chosen), mech.iv_present)
        s.ops[kind] = Operation(kind, mech, info, key, hasher)
        return OK, Writer().bytes(iv).done()

    def op_EncryptInit(self, app: Application, r: Reader) -> Reply | Awaitable[Reply]:
        return self._init(app, r, OpKind.ENCRYPT)

    def op_DecryptInit(self, app: Application, r: Reader) -> Reply | Awaitable[Reply]:
        return self._init(app, r, OpKind.DECRYPT)

    def op_SignInit(self, app: Application, r: Reader) -> Reply | Awaitable[Reply]:
        return self._init(app, r, OpKind.SIGN)

    def op_VerifyInit(self, app: Application, r: Reader) -> Reply | Awaitable[Reply]:
        return self._init(app, r, OpKind.VERIFY)

    def op_DigestInit(self, app: Application, r: Reader) -> Reply | Awaitable[Reply]:
        return self._init(app, r, OpKind.DIGEST)

    # ---- the HSM side of each operation ------------------------------------------------------------
    def _limit(self, op: Operation, n: int) -> None:
        if self.config.quirk_data_limits and op.info.max_data is not None and n > op.info.max_data:
            # FIDELITY: UG:pkcs11-mechanisms footnote 2 gives the limits, not the return value;
            # we answer CKR_DATA_LEN_RANGE.
            raise _err(RV.DATA_LEN_RANGE, f"at most {op.info.max_data} bytes in the HSM")

    def _hsm_call(self, app: Application, op: Operation, data: bytes,
                  digest: bytes | None = None) -> HsmCall:
        """What the cluster must run for one Encrypt/Decrypt/Sign: the CloudHSM limits are
        checked here, GCM and hash-and-sign are rewritten into what the HSM computes."""
        login = app.require_login()
        m, p = op.mech.mechanism, op.mech.spec.param
        if op.kind == OpKind.SIGN:
            spec, payload = self._prepared(op, data, digest)
            return HsmCall("sign", login, spec, payload, _as_output)
        if op.kind == OpKind.ENCRYPT:
            self._limit(op, len(data))
            if m == M.AES_GCM:
                # The IV chosen at C_EncryptInit (`_start`), whatever quirk_gcm_hsm_iv says.
                assert isinstance(p, GcmParams) and p.iv_chosen
                return HsmCall("encrypt", login, op.mech.spec, data, _with_chosen_iv(p.iv))
            if m == M.CLOUDHSM_AES_GCM:
                assert isinstance(p, GcmParams)
                spec = MechanismSpec(M.AES_GCM, GcmParams(b"", p.aad, p.tag_bits))
                return HsmCall("encrypt", login, spec, data, _iv_first)
            return HsmCall("encrypt", login, op.mech.spec, data, _with_iv)
        if m == M.CLOUDHSM_AES_GCM:
            assert isinstance(p, GcmParams)
            if len(data) < GCM_IV_LEN + p.tag_bits // 8:
                raise _err(RV.ENCRYPTED_DATA_LEN_RANGE, "IV || ciphertext || tag expected")
            self._limit(op, len(data) - GCM_IV_LEN - p.tag_bits // 8)
            spec = MechanismSpec(M.AES_GCM, GcmParams(data[:GCM_IV_LEN], p.aad, p.tag_bits))
            return HsmCall("decrypt", login, spec, data[GCM_IV_LEN:], _as_output)
        if m == M.AES_GCM:
            assert isinstance(p, GcmParams)
            self._limit(op, max(0, len(data) - p.tag_bits // 8))
        else:
            self._limit(op, len(data))
        return HsmCall("decrypt", login, op.mech.spec, data, _as_output)

    async def _run(self, op: Operation, call: HsmCall) -> tuple[bytes, bytes | None]:
        """The HSM's answer to `call` through the cluster (retries and failover included)."""
        if call.verb == "encrypt":
            return call.output(await self.cluster.encrypt(call.login, op.key, call.spec, call.data))
        if call.verb == "decrypt":
            return call.output(await self.cluster.decrypt(call.login, op.key, call.spec, call.data))
        return call.output(await self.cluster.sign(call.login, op.key, call.spec, call.data))

    def _prepared(self, op: Operation, data: bytes, digest: bytes | None) -> tuple[MechanismSpec, bytes]:
        """Hash-and-sign: the local digest and the raw mechanism the HSM applies to it."""
        info = op.info
        if info.hash is None:
            self._limit(op, len(data))
            return op.mech.spec, data
        if digest is None:
            digest = hashlib.new(info.hash, data).digest()
        if info.raw == M.RSA_PKCS:
            return MechanismSpec(M.RSA_PKCS), DIGEST_INFO[info.hash] + digest
        if info.raw == M.RSA_PKCS_PSS:
            return MechanismSpec(M.RSA_PKCS_PSS, op.mech.spec.param), digest
        return MechanismSpec(M.ECDSA), digest

    # ---- single-part and multi-part calls ------------------------------------------------------------
    def _single_part_only(self, s: Session, op: Operation) -> None:
        if op.info.single_part:
            # UG:ki-pkcs11-sdk item 7 (GCM) and UG:pkcs11-mechanisms "single-part only".
            del s.ops[op.kind]
            raise _err(RV.MECHANISM_INVALID, "this mechanism is single-part only")

    def _wrong_sequence(self, s: Session, op: Operation) -> bool:
        """A single-part call after Update: True means "ignore the buffered parts" (the quirk)."""
        if not op.updated:
            return False
        if self.config.quirk_wrong_sequence_ok:
            # Reproduced CloudHSM behaviour (UG:ki-pkcs11-sdk item 10): success, wrong result.
            return True
        raise _err(RV.OPERATION_ACTIVE, "a multi-part operation is active")

    def _answer(self, s: Session, op: Operation, out: OutSpec) -> Reply:
        """The reply from the operation's result (kept for the follow-up call of a length query)."""
        extra = (op.cached_iv or b"") if op.kind == OpKind.ENCRYPT else None
        assert op.cached is not None
        reply, delivered = out.reply(op.cached, extra)
        if delivered:
            s.ops.pop(op.kind, None)
        elif out.speculative:
            op.speculative = True
        return reply

    async def _deliver(self, s: Session, op: Operation, key: bytes, out: OutSpec,
                       compute: Callable[[], Awaitable[tuple[bytes, bytes | None]]]) -> Reply:
        if op.cached is None or op.cached_input != key:
            try:
                op.cached, op.cached_iv = await compute()
                op.cached_input = key
            except Exception:
                s.ops.pop(op.kind, None)
                raise
        return self._answer(s, op, out)

    def _single(self, app: Application, r: Reader, kind: OpKind) -> Reply | Awaitable[Reply]:
        s = app.session(r.u64())
        data = r.bytes()
        # A speculative result leaves the operation open here while the module may finish it
        # locally; the next Init then replaces it (as CloudHSM lets wrong sequences pass, UG:ki-
        # pkcs11-sdk item 10). With that quirk off, length queries stay plain.
        out = OutSpec(r, allow_speculative=self.config.quirk_wrong_sequence_ok)
        r.end()
        op = s.op(kind)
        if self._wrong_sequence(s, op):
            op.updated = False
            op.buffer.clear()
            op.stream, op.total = None, 0
        if op.cached is not None and op.cached_input == data:
            return self._answer(s, op, out)
        if kind == OpKind.DIGEST:
            assert op.info.hash is not None
            op.cached, op.cached_iv = hashlib.new(op.info.hash, data).digest(), None
            op.cached_input = data
            return self._answer(s, op, out)
        try:
            call = self._hsm_call(app, op, data)
        except Exception:
            s.ops.pop(op.kind, None)
            raise
        if len(data) > PIECE and call.verb != "sign" and streams(op.mech.mechanism):
            # More than one node request carries: streamed in pieces, as multi-part input is.
            return self._deliver(s, op, data, out, lambda: self._stream_all(app, op, data))
        return self._deliver(s, op, data, out, lambda: self._run(op, call))

    async def _update(self, app: Application, r: Reader, kind: OpKind, with_out: bool) -> Reply:
        s = app.session(r.u64())
        data = r.bytes()
        out = OutSpec(r) if with_out else None
        r.end()
        op = s.op(kind)
        self._single_part_only(s, op)
        op.updated = True
        if out is not None and streams(op.mech.mechanism):
            return await self._stream_update(app, s, op, data, out)
        if op.hasher is not None:
            op.hasher.update(data)
        else:
            # HMAC, CMAC and raw RSA go to the HSM whole at Final: the limits are checked here,
            # as the data arrives, so nothing is buffered past them (issue 17 item 5). Input
            # larger than a node request can carry would fail at Final anyway.
            # FIDELITY: so CMAC, raw RSA and (quirk_data_limits off) HMAC take at most 1 MiB.
            op.total += len(data)
            try:
                self._limit(op, op.total)
                if op.total > MAX_BUFFERED:
                    raise _err(RV.DATA_LEN_RANGE, "more data than one HSM request carries")
            except Pkcs11Error:
                del s.ops[kind]
                raise
            op.buffer += data
        if out is None:
            return OK, b""
        reply, _ = out.reply(b"")
        return reply

    @staticmethod
    def _sized(out: OutSpec, n: int, iv: bool) -> Reply | None:
        """The reply to a length query or a too-small buffer for `n` output bytes (`iv`: with
        EncryptFinal's empty IV), else None (the caller computes the output). Neither consumes
        input nor ends the operation."""
        if out.present and out.capacity >= n:
            return None
        rv = OK if not out.present else int(RV.BUFFER_TOO_SMALL)
        w = Writer().u64(n).u8(0).bytes(b"")
        if iv:
            w.bytes(b"")  # no HSM-generated IV
        return rv, w.done()

    async def _stream_update(self, app: Application, s: Session, op: Operation, data: bytes,
                             out: OutSpec) -> Reply:
        """Encrypt/DecryptUpdate for the streamed modes (hsmsim.gateway.multipart): every complete
        block goes to the HSMs now and comes back in this reply."""
        try:
            login = app.require_login()
            if op.stream is None:
                op.stream = CipherStream.start(op.mech.spec, op.kind == OpKind.ENCRYPT)
            # CloudHSM's documented limits count the whole message, checked as it arrives.
            self._limit(op, op.total + len(data))
            n = op.stream.update_size(len(data))
            sized = self._sized(out, n, False)
            if sized is not None:
                return sized
            result = await op.stream.update(self.cluster, login, op.key, data)
            op.total += len(data)
        except BaseException:  # cancelled too: the chaining state may be half-way
            s.ops.pop(op.kind, None)  # PKCS#11 §5.2: an error other than BUFFER_TOO_SMALL ends it
            raise
        reply, _ = out.reply(result)
        return reply

    async def _stream_all(self, app: Application, op: Operation, data: bytes) -> tuple[bytes, bytes | None]:
        """A single-part Encrypt/Decrypt too large for one node request, in pieces."""
        login = app.require_login()
        stream = CipherStream.start(op.mech.spec, op.kind == OpKind.ENCRYPT)
        head = await stream.update(self.cluster, login, op.key, data)
        return head + await stream.final(self.cluster, login, op.key), None

    async def _stream_final(self, app: Application, s: Session, op: Operation, out: OutSpec) -> Reply:
        stream = op.stream
        if stream is None:  # Final with no Update
            stream = op.stream = CipherStream.start(op.mech.spec, op.kind == OpKind.ENCRYPT)
        size = stream.final_size()
        if size is not None and op.cached is None:
            try:
                stream.check_final()
            except Pkcs11Error:
                s.ops.pop(op.kind, None)
                raise
            sized = self._sized(out, size, op.kind == OpKind.ENCRYPT)
            if sized is not None:
                return sized
        login = app.require_login()

        async def compute() -> tuple[bytes, bytes | None]:
            return await stream.final(self.cluster, login, op.key), None
        # CBC-PAD decryption: the length query runs the last block (the result is kept for the
        # follow-up call), so the answer is exact.
        return await self._deliver(s, op, b"", out, compute)

    async def _final(self, app: Application, r: Reader, kind: OpKind) -> Reply:
        s = app.session(r.u64())
        out = OutSpec(r)
        r.end()
        op = s.op(kind)
        self._single_part_only(s, op)
        if kind in (OpKind.ENCRYPT, OpKind.DECRYPT) and streams(op.mech.mechanism):
            return await self._stream_final(app, s, op, out)
        data = bytes(op.buffer)
        if kind == OpKind.DIGEST:
            async def dig() -> tuple[bytes, bytes | None]:
                assert op.hasher is not None
                return op.hasher.copy().digest(), None
            return await self._deliver(s, op, b"", out, dig)
        digest = op.hasher.copy().digest() if kind == OpKind.SIGN and op.hasher is not None else None

        async def compute() -> tuple[bytes, bytes | None]:
            return await self._run(op, self._hsm_call(app, op, data, digest))
        return await self._deliver(s, op, b"", out, compute)

    def op_Encrypt(self, app: Application, r: Reader) -> Reply | Awaitable[Reply]:
        return self._single(app, r, OpKind.ENCRYPT)

    async def op_EncryptUpdate(self, app: Application, r: Reader) -> Reply:
        return await self._update(app, r, OpKind.ENCRYPT, True)

    async def op_EncryptFinal(self, app: Application, r: Reader) -> Reply:
        return await self._final(app, r, OpKind.ENCRYPT)

    def op_Decrypt(self, app: Application, r: Reader) -> Reply | Awaitable[Reply]:
        return self._single(app, r, OpKind.DECRYPT)

    async def op_DecryptUpdate(self, app: Application, r: Reader) -> Reply:
        return await self._update(app, r, OpKind.DECRYPT, True)

    async def op_DecryptFinal(self, app: Application, r: Reader) -> Reply:
        return await self._final(app, r, OpKind.DECRYPT)

    def op_Digest(self, app: Application, r: Reader) -> Reply | Awaitable[Reply]:
        return self._single(app, r, OpKind.DIGEST)

    async def op_DigestUpdate(self, app: Application, r: Reader) -> Reply:
        return await self._update(app, r, OpKind.DIGEST, False)

    async def op_DigestFinal(self, app: Application, r: Reader) -> Reply:
        return await self._final(app, r, OpKind.DIGEST)

    def op_Sign(self, app: Application, r: Reader) -> Reply | Awaitable[Reply]:
        return self._single(app, r, OpKind.SIGN)

    async def op_SignUpdate(self, app: Application, r: Reader) -> Reply:
        return await self._update(app, r, OpKind.SIGN, False)

    async def op_SignFinal(self, app: Application, r: Reader) -> Reply:
        return await self._final(app, r, OpKind.SIGN)

    async def _verify(self, app: Application, s: Session, op: Operation, data: bytes,
                      digest: bytes | None, signature: bytes) -> Reply:
        try:
            spec, payload = self._prepared(op, data, digest)
            await self.cluster.verify(app.require_login(), op.key, spec, payload, signature)
        finally:
            s.ops.pop(OpKind.VERIFY, None)
        return OK, b""

    async def op_Verify(self, app: Application, r: Reader) -> Reply:
        s = app.session(r.u64())
        data = r.bytes()
        sig = r.bytes()
        r.end()
        op = s.op(OpKind.VERIFY)
        if self._wrong_sequence(s, op):
            op.updated = False
        return await self._verify(app, s, op, data, None, sig)

    async def op_VerifyUpdate(self, app: Application, r: Reader) -> Reply:
        return await self._update(app, r, OpKind.VERIFY, False)

    async def op_VerifyFinal(self, app: Application, r: Reader) -> Reply:
        s = app.session(r.u64())
        sig = r.bytes()
        r.end()
        op = s.op(OpKind.VERIFY)
        self._single_part_only(s, op)
        digest = op.hasher.copy().digest() if op.hasher is not None else None
        return await self._verify(app, s, op, bytes(op.buffer), digest, sig)

    # ---- keys -------------------------------------------------------------------------------------------
    async def op_GenerateKey(self, app: Application, r: Reader) -> Reply:
        s = app.session(r.u64())
        mech = decode_mechanism(r)
        t = decode_template(r)
        r.end()
        login = app.require_login()
        info = MECHANISMS.get(mech.mechanism)
        if info is None or not info.flags & F.GENERATE or (
                self.config.fips_mode and mech.mechanism in FIPS_DISALLOWED):
            raise _err(RV.MECHANISM_INVALID, "not a key generation mechanism")
        key_type = info.key_type if info.key_type is not None else KeyType.GENERIC_SECRET
        if t.get(A.KEY_TYPE, key_type) != key_type or t.get(A.CLASS, ObjectClass.SECRET_KEY) != ObjectClass.SECRET_KEY:
            raise _err(RV.TEMPLATE_INCONSISTENT, "CKA_CLASS/CKA_KEY_TYPE do not fit the mechanism")
        check_secret_template(t, key_type)
        t = with_defaults(t, ObjectClass.SECRET_KEY)
        handle = await self.cluster.generate_key(login, mech.spec, t, s.handle)
        return OK, Writer().u64(handle).done()

    async def op_GenerateKeyPair(self, app: Application, r: Reader) -> Reply:
        s = app.session(r.u64())
        mech = decode_mechanism(r)
        pub = decode_template(r)
        priv = decode_template(r)
        r.end()
        login = app.require_login()
        info = MECHANISMS.get(mech.mechanism)
        if info is None or not info.flags & F.GENERATE_KEY_PAIR:
            raise _err(RV.MECHANISM_INVALID, "not a key-pair generation mechanism")
        assert info.key_type is not None
        pub, priv = key_pair_templates(self.config, info.key_type, pub, priv)
        spec = mech.spec
        if spec.mechanism == M.RSA_X9_31_KEY_PAIR_GEN:
            # UG:pkcs11-mechanisms: "functionally identical" to CKM_RSA_PKCS_KEY_PAIR_GEN.
            # FIDELITY: the nodes generate the pair the PKCS#1 way (no X9.31 prime conditions).
            spec = MechanismSpec(M.RSA_PKCS_KEY_PAIR_GEN)
        h_pub, h_priv = await self.cluster.generate_key_pair(login, spec, pub, priv, s.handle)
        return OK, Writer().u64(h_pub).u64(h_priv).done()

    def _wrap_mechanism(self, mech: DecodedMechanism, flag: int, encrypting: bool) -> MechanismInfo:
        info = MECHANISMS.get(mech.mechanism)
        if info is None or not info.flags & flag:
            raise _err(RV.MECHANISM_INVALID, f"mechanism 0x{mech.mechanism:x} cannot wrap/unwrap")
        if self.config.fips_mode and mech.mechanism in FIPS_DISALLOWED_ENCRYPT:
            # UG:pkcs11-mechanisms fn 5: CKM_RSA_PKCS wrapping is disallowed in FIPS mode.
            # FIDELITY: unwrap is refused too; the footnote names wrap only, and what a FIPS
            # cluster does with a CKM_RSA_PKCS unwrap is undocumented.
            raise _err(RV.MECHANISM_INVALID, "disallowed in FIPS mode")
        p = mech.spec.param
        if mech.mechanism in _VENDOR_WRAPS:
            # UG:ki-pkcs11-sdk items 1-2: a NULL or exactly 8-byte IV; default A6A6A6A6A6A6A6A6.
            if p is not None and not (isinstance(p, RawParams) and len(p.data) in (0, 8)):
                raise _err(RV.MECHANISM_PARAM_INVALID, "the AES key wrap IV is NULL or 8 bytes")
        elif mech.mechanism == M.RSA_AES_KEY_WRAP:
            self._check_rsa_aes(p)
        else:
            self._check_params(mech, OpKind.ENCRYPT if encrypting else OpKind.DECRYPT, info)
        return info

    @staticmethod
    def _check_rsa_aes(p: object) -> None:
        """CK_RSA_AES_KEY_WRAP_PARAMS (PKCS#11 2.40 §2.1.21): a 128-, 192- or 256-bit ephemeral
        AES key, wrapped with RSA-OAEP whose hash and MGF1 match (UG:pkcs11-mechanisms fn 4)."""
        bad = RV.MECHANISM_PARAM_INVALID
        if not isinstance(p, RsaAesKeyWrapParams):
            raise _err(bad, "CKM_RSA_AES_KEY_WRAP needs CK_RSA_AES_KEY_WRAP_PARAMS")
        if p.aes_key_bits not in (128, 192, 256):
            raise _err(bad, "ulAESKeyBits must be 128, 192 or 256")
        name = HASH_OF_MECHANISM.get(p.oaep.hash_alg)
        if name is None or MGF_OF_HASH[name] != p.oaep.mgf:
            raise _err(bad, "OAEP hash and MGF1 must match (SHA-1/224/256/384/512)")

    def _wrap_spec(self, mech: DecodedMechanism) -> MechanismSpec:
        """The mechanism sent to the cluster. Both GCM wraps go as CKM_CLOUDHSM_AES_GCM
        (IV || ciphertext || tag); vendor AES wraps carry an explicit 8-byte IV."""
        m, p = mech.mechanism, mech.spec.param
        if m in _GCM:
            # The cluster gets the IV-prefixed vendor form; the HSM generates the IV.
            assert isinstance(p, GcmParams)
            return MechanismSpec(M.CLOUDHSM_AES_GCM, GcmParams(b"", p.aad, p.tag_bits))
        if m in _VENDOR_WRAPS:
            iv = p.data if isinstance(p, RawParams) and p.data else AES_WRAP_DEFAULT_IV
            if iv != AES_WRAP_DEFAULT_IV:
                # FIDELITY: the nodes' AES key wrap (SoftHSM2) uses the default IV only; CloudHSM
                # accepts any 8-byte IV.
                raise _err(RV.MECHANISM_PARAM_INVALID, "only the default AES key wrap IV is supported")
            if m == M.CLOUDHSM_AES_KEY_WRAP_PKCS5_PAD:
                # FIDELITY: carried out as RFC 5649 (CKM_AES_KEY_WRAP_PAD), not CloudHSM's
                # RFC 3394 over PKCS#5-padded key bytes: round trips work, the bytes differ.
                return MechanismSpec(M.AES_KEY_WRAP_PAD)
            # NO_PAD is RFC 3394; ZERO_PAD equals it for keys whose length is a multiple of 8
            # (every AES key). FIDELITY: other lengths fail instead of being zero-padded.
            return MechanismSpec(M.AES_KEY_WRAP)
        return mech.spec

    async def op_WrapKey(self, app: Application, r: Reader) -> Reply:
        s = app.session(r.u64())
        mech = decode_mechanism(r)
        wrapping = r.u64()
        key = r.u64()
        out = OutSpec(r)
        r.end()
        login = app.require_login()
        self._wrap_mechanism(mech, F.WRAP, True)
        cache_key = (mech, wrapping, key)
        if s.wrap_cache is not None and s.wrap_cache[0] == cache_key:
            wrapped, iv = s.wrap_cache[1], s.wrap_cache[2]
        else:
            blob = await self.cluster.wrap_key(login, wrapping, self._wrap_spec(mech), key)
            wrapped, iv = blob, None
            if mech.mechanism == M.AES_GCM:
                wrapped, iv = blob[GCM_IV_LEN:], blob[:GCM_IV_LEN]
            s.wrap_cache = (cache_key, wrapped, iv)
        reply, delivered = out.reply(wrapped, iv or b"")
        if delivered:
            s.wrap_cache = None
        return reply

    async def op_UnwrapKey(self, app: Application, r: Reader) -> Reply:
        s = app.session(r.u64())
        mech = decode_mechanism(r)
        unwrapping = r.u64()
        wrapped = r.bytes()
        t = decode_template(r)
        r.end()
        login = app.require_login()
        self._wrap_mechanism(mech, F.UNWRAP, False)
        if mech.mechanism == M.AES_GCM:
            p = mech.spec.param
            assert isinstance(p, GcmParams)
            wrapped = p.iv + wrapped
        cls = t.get(A.CLASS)
        if not isinstance(cls, int) or A.KEY_TYPE not in t:
            raise _err(RV.TEMPLATE_INCOMPLETE, "CKA_CLASS and CKA_KEY_TYPE are required")
        t = with_defaults(t, cls)
        handle = await self.cluster.unwrap_key(login, unwrapping, self._wrap_spec(mech), wrapped, t, s.handle)
        return OK, Writer().u64(handle).done()

    async def op_DeriveKey(self, app: Application, r: Reader) -> Reply:
        s = app.session(r.u64())
        mech = decode_mechanism(r)
        base = r.u64()
        t = decode_template(r)
        r.end()
        login = app.require_login()
        info = MECHANISMS.get(mech.mechanism)
        if info is None or not info.flags & F.DERIVE:
            raise _err(RV.MECHANISM_INVALID, "not a derivation mechanism")
        cls = t.get(A.CLASS, ObjectClass.SECRET_KEY)
        if not isinstance(cls, int):
            raise _err(RV.ATTRIBUTE_VALUE_INVALID, "bad CKA_CLASS")
        t = with_defaults(t, cls)
        handle = await self.cluster.derive_key(login, base, mech.spec, t, s.handle)
        return OK, Writer().u64(handle).done()

    async def op_GenerateRandom(self, app: Application, r: Reader) -> Reply:
        app.session(r.u64())
        n = r.u64()
        r.end()
        if n > self.config.max_frame - 4096:
            raise _err(RV.ARGUMENTS_BAD, "too many random bytes in one call")
        data = await self.cluster.generate_random(app.login, n) if n else b""
        return OK, Writer().bytes(data).done()
