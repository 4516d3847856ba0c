"""The operation state machine (PKCS#11 2.40 §5.2): starting a session's operation, single-part
calls, Update and Final, streamed and buffered multi-part input, and the result kept for the
follow-up call of a length query, so a length query and the call that fetches the output see
the same bytes (same signature, same HSM-generated IV). Any error other than
CKR_BUFFER_TOO_SMALL ends the operation."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Awaitable, Callable
from typing import Any

from hsmsim.gateway.hsm import hsm_call, prepared, run
from hsmsim.gateway.multipart import MAX_BUFFERED, PIECE, CipherStream, streams
from hsmsim.gateway.params import DecodedMechanism
from hsmsim.gateway.policy import limit, single_part_only, wrong_sequence
from hsmsim.gateway.protocol import Reader, Writer
from hsmsim.gateway.reply import OK, OutSpec, Reply, err, sized
from hsmsim.gateway.service import Gateway
from hsmsim.gateway.state import Application, Operation, OpKind, Session
from hsmsim.pkcs11.constants import RV, Mechanism as M
from hsmsim.pkcs11.errors import Pkcs11Error
from hsmsim.pkcs11.mechanisms import GCM_IV_LEN, MechanismInfo
from hsmsim.pkcs11.params import GcmParams, MechanismSpec

Result = tuple[bytes, bytes | None]


def start(s: Session, kind: OpKind, mech: DecodedMechanism, info: MechanismInfo, key: int,
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


def _answer(s: Session, op: Operation, out: OutSpec) -> Reply:
    """The reply from the operation's result (kept for the follow-up call of a length query)."""
    extra = (op.cached_iv or b"") if op.kind == OpKind.ENCRYPT else None
    assert op.cached is not None
    reply, delivered = out.reply(op.cached, extra)
    if delivered:
        s.ops.pop(op.kind, None)
    elif out.speculative:
        op.speculative = True
    return reply


async def _deliver(s: Session, op: Operation, key: bytes, out: OutSpec,
                   compute: Callable[[], Awaitable[Result]]) -> Reply:
    if op.cached is None or op.cached_input != key:
        try:
            op.cached, op.cached_iv = await compute()
            op.cached_input = key
        except Exception:
            s.ops.pop(op.kind, None)
            raise
    return _answer(s, op, out)


def single(gw: Gateway, app: Application, r: Reader, kind: OpKind) -> Reply | Awaitable[Reply]:
    """C_Encrypt, C_Decrypt, C_Digest, C_Sign: answered at once from a kept result or a local
    digest, else an awaitable that asks the HSMs."""
    s = app.session(r.u64())
    data = r.bytes()
    # A speculative result leaves the operation open here while the module may finish it
    # locally; the next Init then replaces it (as CloudHSM lets wrong sequences pass, UG:ki-
    # pkcs11-sdk item 10). With that quirk off, length queries stay plain.
    out = OutSpec(r, allow_speculative=gw.config.quirk_wrong_sequence_ok)
    r.end()
    op = s.op(kind)
    if wrong_sequence(gw.config, op):
        op.updated = False
        op.buffer.clear()
        op.stream, op.total = None, 0
    if op.cached is not None and op.cached_input == data:
        return _answer(s, op, out)
    if kind == OpKind.DIGEST:
        assert op.info.hash is not None
        op.cached, op.cached_iv = hashlib.new(op.info.hash, data).digest(), None
        op.cached_input = data
        return _answer(s, op, out)
    try:
        call = hsm_call(gw.config, app, op, data)
    except Exception:
        s.ops.pop(op.kind, None)
        raise
    if len(data) > PIECE and call.verb != "sign" and streams(op.mech.mechanism):
        # More than one node request carries: streamed in pieces, as multi-part input is.
        return _deliver(s, op, data, out, lambda: _stream_all(gw, app, op, data))
    return _deliver(s, op, data, out, lambda: run(gw.cluster, op, call))


async def update(gw: Gateway, app: Application, r: Reader, kind: OpKind, with_out: bool) -> Reply:
    """C_*Update; `with_out`: Encrypt/DecryptUpdate, whose reply carries output."""
    s = app.session(r.u64())
    data = r.bytes()
    out = OutSpec(r) if with_out else None
    r.end()
    op = s.op(kind)
    single_part_only(s, op)
    op.updated = True
    if out is not None and streams(op.mech.mechanism):
        return await _stream_update(gw, app, s, op, data, out)
    if op.hasher is not None:
        op.hasher.update(data)
    else:
        # HMAC, CMAC and raw RSA go to the HSM whole at Final: the limits are checked here,
        # as the data arrives, so nothing is buffered past them (issue 17 item 5). Input
        # larger than a node request can carry would fail at Final anyway.
        # FIDELITY: so CMAC, raw RSA and (quirk_data_limits off) HMAC take at most 1 MiB.
        op.total += len(data)
        try:
            limit(gw.config, op, op.total)
            if op.total > MAX_BUFFERED:
                raise err(RV.DATA_LEN_RANGE, "more data than one HSM request carries")
        except Pkcs11Error:
            del s.ops[kind]
            raise
        op.buffer += data
    if out is None:
        return OK, b""
    reply, _ = out.reply(b"")
    return reply


async def _stream_update(gw: Gateway, app: Application, s: Session, op: Operation, data: bytes,
                         out: OutSpec) -> Reply:
    """Encrypt/DecryptUpdate for the streamed modes (hsmsim.gateway.multipart): every complete
    block goes to the HSMs now and comes back in this reply."""
    try:
        login = app.require_login()
        if op.stream is None:
            op.stream = CipherStream.start(op.mech.spec, op.kind == OpKind.ENCRYPT)
        # CloudHSM's documented limits count the whole message, checked as it arrives.
        limit(gw.config, op, op.total + len(data))
        n = op.stream.update_size(len(data))
        early = sized(out, n, False)
        if early is not None:
            return early
        result = await op.stream.update(gw.cluster, login, op.key, data)
        op.total += len(data)
    except BaseException:  # cancelled too: the chaining state may be half-way
        s.ops.pop(op.kind, None)  # PKCS#11 §5.2: an error other than BUFFER_TOO_SMALL ends it
        raise
    reply, _ = out.reply(result)
    return reply


async def _stream_all(gw: Gateway, app: Application, op: Operation, data: bytes) -> Result:
    """A single-part Encrypt/Decrypt too large for one node request, in pieces."""
    login = app.require_login()
    stream = CipherStream.start(op.mech.spec, op.kind == OpKind.ENCRYPT)
    head = await stream.update(gw.cluster, login, op.key, data)
    return head + await stream.final(gw.cluster, login, op.key), None


async def _stream_final(gw: Gateway, app: Application, s: Session, op: Operation,
                        out: OutSpec) -> Reply:
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
        early = sized(out, size, op.kind == OpKind.ENCRYPT)
        if early is not None:
            return early
    login = app.require_login()

    async def compute() -> Result:
        return await stream.final(gw.cluster, login, op.key), None
    # CBC-PAD decryption: the length query runs the last block (the result is kept for the
    # follow-up call), so the answer is exact.
    return await _deliver(s, op, b"", out, compute)


async def final(gw: Gateway, app: Application, r: Reader, kind: OpKind) -> Reply:
    """C_EncryptFinal, C_DecryptFinal, C_DigestFinal, C_SignFinal."""
    s = app.session(r.u64())
    out = OutSpec(r)
    r.end()
    op = s.op(kind)
    single_part_only(s, op)
    if kind in (OpKind.ENCRYPT, OpKind.DECRYPT) and streams(op.mech.mechanism):
        return await _stream_final(gw, app, s, op, out)
    data = bytes(op.buffer)
    if kind == OpKind.DIGEST:
        async def dig() -> Result:
            assert op.hasher is not None
            return op.hasher.copy().digest(), None
        return await _deliver(s, op, b"", out, dig)
    digest = op.hasher.copy().digest() if kind == OpKind.SIGN and op.hasher is not None else None

    async def compute() -> Result:
        return await run(gw.cluster, op, hsm_call(gw.config, app, op, data, digest))
    return await _deliver(s, op, b"", out, compute)


async def verify(gw: Gateway, app: Application, s: Session, op: Operation, data: bytes,
                 digest: bytes | None, signature: bytes) -> Reply:
    """C_Verify and C_VerifyFinal: the HSM checks; the operation ends either way."""
    try:
        spec, payload = prepared(gw.config, op, data, digest)
        await gw.cluster.verify(app.require_login(), op.key, spec, payload, signature)
    finally:
        s.ops.pop(OpKind.VERIFY, None)
    return OK, b""


async def verify_single(gw: Gateway, app: Application, r: Reader) -> Reply:
    s = app.session(r.u64())
    data = r.bytes()
    sig = r.bytes()
    r.end()
    op = s.op(OpKind.VERIFY)
    if wrong_sequence(gw.config, op):
        op.updated = False
    return await verify(gw, app, s, op, data, None, sig)


async def verify_final(gw: Gateway, app: Application, r: Reader) -> Reply:
    s = app.session(r.u64())
    sig = r.bytes()
    r.end()
    op = s.op(OpKind.VERIFY)
    single_part_only(s, op)
    digest = op.hasher.copy().digest() if op.hasher is not None else None
    return await verify(gw, app, s, op, bytes(op.buffer), digest, sig)
