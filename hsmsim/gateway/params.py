"""Decodes the module's flat mechanism encoding (docs/gateway-protocol.md, "Mechanisms") into a
`MechanismSpec` with `hsmsim.pkcs11.params` values."""

from __future__ import annotations

from dataclasses import dataclass

from hsmsim.gateway.protocol import ParamKind, Reader, Writer
from hsmsim.pkcs11.constants import RV
from hsmsim.pkcs11.errors import Pkcs11Error
from hsmsim.pkcs11.params import (CtrParams, Ecdh1Params, GcmParams, MechanismSpec, OaepParams,
                                  PssParams, RawParams, RsaAesKeyWrapParams)

CKZ_DATA_SPECIFIED = 1


@dataclass(frozen=True)
class DecodedMechanism:
    """A mechanism as the application passed it; `iv_present` tells a NULL pIv (CK_GCM_PARAMS)
    from an empty one."""

    spec: MechanismSpec
    iv_present: bool = False

    @property
    def mechanism(self) -> int:
        return self.spec.mechanism


def _bad(mech: int) -> Pkcs11Error:
    return Pkcs11Error(RV.MECHANISM_PARAM_INVALID, f"bad parameter for mechanism 0x{mech:x}")


def _oaep(r: Reader, mech: int) -> OaepParams:
    hash_alg, mgf, source = r.u64(), r.u64(), r.u64()
    label = r.bytes()
    if source not in (0, CKZ_DATA_SPECIFIED) or (source == 0 and label):
        raise _bad(mech)
    return OaepParams(hash_alg, mgf, label)


def decode_mechanism(r: Reader) -> DecodedMechanism:
    mech = r.u64()
    kind = r.u8()
    if kind == ParamKind.NONE:
        return DecodedMechanism(MechanismSpec(mech))
    if kind == ParamKind.RAW:
        return DecodedMechanism(MechanismSpec(mech, RawParams(r.bytes())))
    if kind == ParamKind.GCM:
        present = r.u8() != 0
        iv = r.bytes()
        r.u64()  # ulIvBits: informational (CloudHSM samples clear it)
        aad = r.bytes()
        tag_bits = r.u64()
        return DecodedMechanism(MechanismSpec(mech, GcmParams(iv, aad, tag_bits)), present)
    if kind == ParamKind.OAEP:
        return DecodedMechanism(MechanismSpec(mech, _oaep(r, mech)))
    if kind == ParamKind.RSA_AES:
        # CK_RSA_AES_KEY_WRAP_PARAMS: ulAESKeyBits, then the OAEP parameters (never NULL).
        bits = r.u64()
        return DecodedMechanism(MechanismSpec(mech, RsaAesKeyWrapParams(bits, _oaep(r, mech))))
    if kind == ParamKind.PSS:
        return DecodedMechanism(MechanismSpec(mech, PssParams(r.u64(), r.u64(), r.u64())))
    if kind == ParamKind.CTR:
        bits = r.u64()
        cb = r.bytes()
        if len(cb) != 16 or not 0 < bits <= 128:
            raise _bad(mech)
        return DecodedMechanism(MechanismSpec(mech, CtrParams(bits, cb)))
    if kind == ParamKind.ECDH1:
        kdf = r.u64()
        shared = r.bytes()
        public = r.bytes()
        return DecodedMechanism(MechanismSpec(mech, Ecdh1Params(kdf, public, shared)))
    if kind == ParamKind.KDF108:
        # Carried to the cluster re-encoded as raw bytes: u64 prf, u32 n, n x (u64 type, bytes).
        w = Writer().u64(r.u64())
        n = r.count(64)
        w.u32(n)
        for _ in range(n):
            w.u64(r.u64()).bytes(r.bytes())
        return DecodedMechanism(MechanismSpec(mech, RawParams(w.done())))
    raise _bad(mech)
