"""CloudHSM's policy and quirks as the gateway applies them: which mechanism serves which
function (FIPS mode included), the mechanism parameters CloudHSM accepts, the wrap mechanisms
and how they reach the nodes, the in-HSM data limits, single-part-only mechanisms and the
wrong-sequence quirk. Pure checks over the request and the session; no cluster calls."""

from __future__ import annotations

from typing import Any

from hsmsim.gateway.config import GatewayConfig
from hsmsim.gateway.params import DecodedMechanism
from hsmsim.gateway.reply import err
from hsmsim.gateway.state import Operation, OpKind, Session
from hsmsim.pkcs11.constants import RV, Mechanism as M, MechanismFlag as F
from hsmsim.pkcs11.mechanisms import (FIPS_DISALLOWED, FIPS_DISALLOWED_ENCRYPT, GCM_IV_LEN,
                                      MECHANISMS, MechanismInfo)
from hsmsim.pkcs11.mechanisms import check_params as table_check_params
from hsmsim.pkcs11.params import GcmParams, MechanismSpec, RawParams

AES_WRAP_DEFAULT_IV = bytes.fromhex("A6A6A6A6A6A6A6A6")
GCM = (M.AES_GCM, M.CLOUDHSM_AES_GCM)
_VENDOR_WRAPS = (M.CLOUDHSM_AES_KEY_WRAP_NO_PAD, M.CLOUDHSM_AES_KEY_WRAP_PKCS5_PAD,
                 M.CLOUDHSM_AES_KEY_WRAP_ZERO_PAD)
_FLAG = {OpKind.ENCRYPT: F.ENCRYPT, OpKind.DECRYPT: F.DECRYPT, OpKind.SIGN: F.SIGN,
         OpKind.VERIFY: F.VERIFY, OpKind.DIGEST: F.DIGEST}


def mechanism_for(config: GatewayConfig, mech: DecodedMechanism, kind: OpKind) -> MechanismInfo:
    """The mechanism's table entry, if it may serve `kind` on this cluster."""
    info = MECHANISMS.get(mech.mechanism)
    if info is None or not info.flags & _FLAG[kind]:
        raise err(RV.MECHANISM_INVALID, f"mechanism 0x{mech.mechanism:x} cannot {kind.value}")
    if config.fips_mode and (mech.mechanism in FIPS_DISALLOWED or (
            kind == OpKind.ENCRYPT and mech.mechanism in FIPS_DISALLOWED_ENCRYPT)):
        raise err(RV.MECHANISM_INVALID, "disallowed in FIPS mode")
    return info


def check_params(config: GatewayConfig, mech: DecodedMechanism, kind: OpKind,
                 info: MechanismInfo) -> None:
    """The parameter rule of the mechanism table (hsmsim.pkcs11.mechanisms, `ParamRule`)."""
    zero_iv = kind == OpKind.ENCRYPT and config.quirk_gcm_hsm_iv
    table_check_params(info, mech.spec.param, mech.iv_present, zero_iv)


def wrap_mechanism(config: GatewayConfig, mech: DecodedMechanism, flag: int,
                   encrypting: bool) -> MechanismInfo:
    """The table entry of a C_WrapKey (`flag` F.WRAP) or C_UnwrapKey mechanism, its parameter
    checked."""
    info = MECHANISMS.get(mech.mechanism)
    if info is None or not info.flags & flag:
        raise err(RV.MECHANISM_INVALID, f"mechanism 0x{mech.mechanism:x} cannot wrap/unwrap")
    if config.fips_mode and mech.mechanism in FIPS_DISALLOWED_ENCRYPT:
        # UG:pkcs11-mechanisms fn 5: CKM_RSA_PKCS wrapping is disallowed in FIPS mode.
        # FIDELITY: unwrap is refused too; the footnote names wrap only, and what a FIPS
        # cluster does with a CKM_RSA_PKCS unwrap is undocumented.
        raise err(RV.MECHANISM_INVALID, "disallowed in FIPS mode")
    check_params(config, mech, OpKind.ENCRYPT if encrypting else OpKind.DECRYPT, info)
    return info


def wrap_spec(mech: DecodedMechanism) -> MechanismSpec:
    """The mechanism sent to the cluster. Both GCM wraps go as CKM_CLOUDHSM_AES_GCM
    (IV || ciphertext || tag); vendor AES wraps carry an explicit 8-byte IV."""
    m, p = mech.mechanism, mech.spec.param
    if m in GCM:
        # The cluster gets the IV-prefixed vendor form; the HSM generates the IV.
        assert isinstance(p, GcmParams)
        return MechanismSpec(M.CLOUDHSM_AES_GCM, GcmParams(b"", p.aad, p.tag_bits))
    if m in _VENDOR_WRAPS:
        iv = p.data if isinstance(p, RawParams) and p.data else AES_WRAP_DEFAULT_IV
        if iv != AES_WRAP_DEFAULT_IV:
            # FIDELITY: the nodes' AES key wrap (SoftHSM2) uses the default IV only; CloudHSM
            # accepts any 8-byte IV.
            raise err(RV.MECHANISM_PARAM_INVALID, "only the default AES key wrap IV is supported")
        if m == M.CLOUDHSM_AES_KEY_WRAP_PKCS5_PAD:
            # FIDELITY: carried out as RFC 5649 (CKM_AES_KEY_WRAP_PAD), not CloudHSM's
            # RFC 3394 over PKCS#5-padded key bytes: round trips work, the bytes differ.
            return MechanismSpec(M.AES_KEY_WRAP_PAD)
        # NO_PAD is RFC 3394; ZERO_PAD equals it for keys whose length is a multiple of 8
        # (every AES key). FIDELITY: other lengths fail instead of being zero-padded.
        return MechanismSpec(M.AES_KEY_WRAP)
    return mech.spec


def check_key_type(key_type: Any, info: MechanismInfo) -> None:
    if info.key_type is not None and key_type is not None and key_type != info.key_type:
        raise err(RV.KEY_TYPE_INCONSISTENT, "the key type does not fit the mechanism")


def limit(config: GatewayConfig, op: Operation, n: int) -> None:
    if config.quirk_data_limits and op.info.max_data is not None and n > op.info.max_data:
        # FIDELITY: UG:pkcs11-mechanisms footnote 2 gives the limits, not the return value;
        # we answer CKR_DATA_LEN_RANGE.
        raise err(RV.DATA_LEN_RANGE, f"at most {op.info.max_data} bytes in the HSM")


def single_part_only(s: Session, op: Operation) -> None:
    if op.info.single_part:
        # UG:ki-pkcs11-sdk item 7 (GCM) and UG:pkcs11-mechanisms "single-part only".
        del s.ops[op.kind]
        raise err(RV.MECHANISM_INVALID, "this mechanism is single-part only")


def wrong_sequence(config: GatewayConfig, op: Operation) -> bool:
    """A single-part call after Update: True means "ignore the buffered parts" (the quirk)."""
    if not op.updated:
        return False
    if config.quirk_wrong_sequence_ok:
        # Reproduced CloudHSM behaviour (UG:ki-pkcs11-sdk item 10): success, wrong result.
        return True
    raise err(RV.OPERATION_ACTIVE, "a multi-part operation is active")
