"""The direct data path as the gateway offers it (docs/direct-protocol.md): the section of a
Sign/Verify/Encrypt/DecryptInit reply (protocol 1.3) that names the HSMs the module may call
for the single-part call, the operation descriptor each carries (MACed per ticket, both kept
in bounded caches), and request flag DIRECT_DONE, which ends an operation finished on an HSM."""

from __future__ import annotations

from typing import Any

from hsmsim.gateway.config import GatewayConfig
from hsmsim.gateway.multipart import PIECE
from hsmsim.gateway.protocol import TLS_DIRECT_MINOR, Op, Writer
from hsmsim.gateway.state import Application, Operation, OpKind
from hsmsim.node import codec as node_codec
from hsmsim.node.direct import descriptor_mac, encode_descriptor
from hsmsim.pkcs11.constants import Mechanism as M
from hsmsim.pkcs11.mechanisms import DIGEST_INFO
from hsmsim.pkcs11.params import GcmParams, MechanismSpec

# The opcodes of each operation kind (request flag DIRECT_DONE names the kind by its opcode).
KIND_OF_OP = {int(o): k for k, ops in (
    (OpKind.ENCRYPT, (Op.EncryptInit, Op.Encrypt, Op.EncryptUpdate, Op.EncryptFinal)),
    (OpKind.DECRYPT, (Op.DecryptInit, Op.Decrypt, Op.DecryptUpdate, Op.DecryptFinal)),
    (OpKind.SIGN, (Op.SignInit, Op.Sign, Op.SignUpdate, Op.SignFinal)),
    (OpKind.VERIFY, (Op.VerifyInit, Op.Verify, Op.VerifyUpdate, Op.VerifyFinal))) for o in ops}
DIRECT_KINDS = (OpKind.ENCRYPT, OpKind.DECRYPT, OpKind.SIGN, OpKind.VERIFY)


class DirectRoutes:
    """Init reply sections for the direct data path, with descriptors and their MACs per ticket
    made once (every Init of a key asks again)."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self._descs: dict[tuple[Any, ...], bytes] = {}
        self._macs: dict[tuple[bytes, bytes], bytes] = {}

    def section(self, app: Application, op: Operation, routes: list[Any]) -> bytes:
        w = Writer()
        # a route's address lists the node's listeners (unix:PATH, then tls:NAME@HOST:PORT):
        # an application connected over TLS gets the TLS one (protocol 1.4; none before), a
        # local one the Unix socket (docs/direct-protocol.md)
        if app.remote:
            want = "tls:" if app.minor >= TLS_DIRECT_MINOR else None
        else:
            want = "unix:"
        picked = []
        for route in routes:
            for a in route.address.split(" "):
                if want is not None and a.startswith(want):
                    picked.append((a.removeprefix("unix:"), route))
                    break
        if not picked:
            return w.u8(0).done()
        desc = self.descriptor(op)
        w.u8(len(picked)).bytes(desc)
        macs = self._macs
        if len(macs) > 65536:
            macs.clear()
        for address, route in picked:
            mac = macs.get((desc, route.ticket))
            if mac is None:
                mac = macs[(desc, route.ticket)] = descriptor_mac(route.key, desc)
            w.bytes(address.encode()).bytes(route.ticket)
            w.bytes(mac).u32(max(1, int(route.timeout_s * 1000)))
        return w.done()

    def descriptor(self, op: Operation) -> bytes:
        """What the HSM does with a direct call's data: the operation as the daemon would run it
        (hsmsim.gateway.hsm: `hsm_call`, `prepared`, policy.limit), MACed per ticket so the
        application cannot alter it."""
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


def direct_done(app: Application, op: int, body: memoryview) -> None:
    """Request flag DIRECT_DONE: the module finished this session's operation of `op`'s kind
    on an HSM; it ends here before the request is handled."""
    kind = KIND_OF_OP.get(op)
    if kind is None or len(body) < 8:
        return
    s = app.sessions.get(int.from_bytes(body[:8], "little"))
    if s is not None:
        s.ops.pop(kind, None)
