"""The HSM side of an operation: what the cluster must run for one Encrypt, Decrypt or Sign
(the CloudHSM data limits checked, AES-GCM and hash-and-sign rewritten into what the HSM
computes) and how its answer becomes the application's output."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, NamedTuple

from hsmsim.cluster.api import ClusterClient, Login
from hsmsim.gateway.config import GatewayConfig
from hsmsim.gateway.policy import limit
from hsmsim.gateway.reply import err
from hsmsim.gateway.state import Application, Operation, OpKind
from hsmsim.pkcs11.constants import RV, Mechanism as M
from hsmsim.pkcs11.mechanisms import DIGEST_INFO, GCM_IV_LEN
from hsmsim.pkcs11.params import GcmParams, MechanismSpec

Output = Callable[[Any], tuple[bytes, bytes | None]]


def _with_iv(r: Any) -> tuple[bytes, bytes | None]:
    return r.data, r.iv


def _iv_first(r: Any) -> tuple[bytes, bytes | None]:
    return (r.iv or b"") + r.data, None  # CKM_CLOUDHSM_AES_GCM: IV || ciphertext || tag


def _as_output(r: Any) -> tuple[bytes, bytes | None]:
    return bytes(r), None


def _with_chosen_iv(iv: bytes) -> Output:
    """CKM_AES_GCM encryption: the node's answer, which must use the IV chosen at C_EncryptInit
    (the application already holds it in pIv)."""
    def output(r: Any) -> tuple[bytes, bytes | None]:
        if r.iv != iv:
            raise err(RV.DEVICE_ERROR, "the HSM did not use the IV chosen at C_EncryptInit")
        return r.data, r.iv
    return output


class HsmCall(NamedTuple):
    """One call the cluster runs for an operation, and how its answer becomes the output.
    (A NamedTuple, not a frozen dataclass: it is built on every Encrypt, Decrypt and Sign.)"""

    verb: str  # "encrypt", "decrypt" or "sign"
    login: Login
    spec: MechanismSpec
    data: bytes
    output: Output


def prepared(config: GatewayConfig, op: Operation, data: bytes,
             digest: bytes | None) -> tuple[MechanismSpec, bytes]:
    """Hash-and-sign: the local digest and the raw mechanism the HSM applies to it."""
    info = op.info
    if info.hash is None:
        limit(config, op, len(data))
        return op.mech.spec, data
    if digest is None:
        digest = hashlib.new(info.hash, data).digest()
    if info.raw == M.RSA_PKCS:
        return MechanismSpec(M.RSA_PKCS), DIGEST_INFO[info.hash] + digest
    if info.raw == M.RSA_PKCS_PSS:
        return MechanismSpec(M.RSA_PKCS_PSS, op.mech.spec.param), digest
    return MechanismSpec(M.ECDSA), digest


def hsm_call(config: GatewayConfig, app: Application, op: Operation, data: bytes,
             digest: bytes | None = None) -> HsmCall:
    """What the cluster must run for one Encrypt/Decrypt/Sign: the CloudHSM limits are
    checked here, GCM and hash-and-sign are rewritten into what the HSM computes."""
    login = app.require_login()
    m, p = op.mech.mechanism, op.mech.spec.param
    if op.kind == OpKind.SIGN:
        spec, payload = prepared(config, op, data, digest)
        return HsmCall("sign", login, spec, payload, _as_output)
    if op.kind == OpKind.ENCRYPT:
        limit(config, op, len(data))
        if m == M.AES_GCM:
            # The IV chosen at C_EncryptInit (operations.start), whatever quirk_gcm_hsm_iv says.
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
            raise err(RV.ENCRYPTED_DATA_LEN_RANGE, "IV || ciphertext || tag expected")
        limit(config, op, len(data) - GCM_IV_LEN - p.tag_bits // 8)
        spec = MechanismSpec(M.AES_GCM, GcmParams(data[:GCM_IV_LEN], p.aad, p.tag_bits))
        return HsmCall("decrypt", login, spec, data[GCM_IV_LEN:], _as_output)
    if m == M.AES_GCM:
        assert isinstance(p, GcmParams)
        limit(config, op, max(0, len(data) - p.tag_bits // 8))
    else:
        limit(config, op, len(data))
    return HsmCall("decrypt", login, op.mech.spec, data, _as_output)


async def run(cluster: ClusterClient, op: Operation, call: HsmCall) -> tuple[bytes, bytes | None]:
    """The HSM's answer to `call` through the cluster (retries and failover included)."""
    if call.verb == "encrypt":
        return call.output(await cluster.encrypt(call.login, op.key, call.spec, call.data))
    if call.verb == "decrypt":
        return call.output(await cluster.decrypt(call.login, op.key, call.spec, call.data))
    return call.output(await cluster.sign(call.login, op.key, call.spec, call.data))
