"""AWS CloudHSM Client SDK 5's PKCS#11 mechanism table (reference cloudhsm.md §1.4, §1.5): which
mechanisms exist, for which functions, key sizes, in-HSM data limits, single-part-only ones, the
parameters each accepts, and how hash-and-sign mechanisms split into a local hash plus a raw HSM
mechanism. `HASHES` is the one table of the hashes and every mechanism, MGF and KDF value that
names one; the node and the gateway read it (nowhere else maps a mechanism to a hash)."""

from __future__ import annotations

from dataclasses import dataclass

from hsmsim.pkcs11.constants import KDF, MGF, RV, KeyType, Mechanism as M, MechanismFlag as F
from hsmsim.pkcs11.errors import Pkcs11Error
from hsmsim.pkcs11.params import (CtrParams, GcmParams, OaepParams, Param, PssParams, RawParams,
                                  RsaAesKeyWrapParams)

HW = F.HW
ENC = F.ENCRYPT | F.DECRYPT
SV = F.SIGN | F.VERIFY
WU = F.WRAP | F.UNWRAP
EC_FLAGS = F.EC_F_P | F.EC_NAMEDCURVE | F.EC_UNCOMPRESS
GCM_IV_LEN = 12


@dataclass(frozen=True)
class Hash:
    """One hash and every PKCS#11 value that names it. `name` is hashlib's name and the crypto
    core's (hsmsim.core._args.HASHES, which adds its C code; a test checks the two agree)."""

    name: str
    digest: int  # CKM_SHA*
    mgf: int  # CKG_MGF1_SHA* (OAEP, PSS)
    hmac: int  # CKM_SHA*_HMAC
    rsa_pkcs: int  # CKM_SHA*_RSA_PKCS
    rsa_pss: int  # CKM_SHA*_RSA_PKCS_PSS
    ecdsa: int  # CKM_ECDSA_SHA*
    # CKD_ X9.63 KDFs (ECDH1): the standard one and CloudHSM's vendor one compute the same.
    # FIDELITY: the CKD_CLOUDHSM_X963_*_KDF values (VENDOR_DEFINED | 1..5, hsmsim/pkcs11/
    # constants.py) are not verified: CloudHSM's installed header defines them, the public AWS
    # sample header does not. The standard CKD_SHA*_KDF values are accepted too.
    kdfs: tuple[int, int]
    # DER DigestInfo prefix (RFC 8017 §9.2 note 1) for CKM_SHAx_RSA_PKCS done as hash + CKM_RSA_PKCS
    digest_info: bytes


HASHES: tuple[Hash, ...] = (
    Hash("sha1", M.SHA_1, MGF.MGF1_SHA1, M.SHA_1_HMAC, M.SHA1_RSA_PKCS, M.SHA1_RSA_PKCS_PSS,
         M.ECDSA_SHA1, (KDF.SHA1_KDF, KDF.CLOUDHSM_X963_SHA1_KDF),
         bytes.fromhex("3021300906052b0e03021a05000414")),
    Hash("sha224", M.SHA224, MGF.MGF1_SHA224, M.SHA224_HMAC, M.SHA224_RSA_PKCS,
         M.SHA224_RSA_PKCS_PSS, M.ECDSA_SHA224, (KDF.SHA224_KDF, KDF.CLOUDHSM_X963_SHA224_KDF),
         bytes.fromhex("302d300d06096086480165030402040500041c")),
    Hash("sha256", M.SHA256, MGF.MGF1_SHA256, M.SHA256_HMAC, M.SHA256_RSA_PKCS,
         M.SHA256_RSA_PKCS_PSS, M.ECDSA_SHA256, (KDF.SHA256_KDF, KDF.CLOUDHSM_X963_SHA256_KDF),
         bytes.fromhex("3031300d060960864801650304020105000420")),
    Hash("sha384", M.SHA384, MGF.MGF1_SHA384, M.SHA384_HMAC, M.SHA384_RSA_PKCS,
         M.SHA384_RSA_PKCS_PSS, M.ECDSA_SHA384, (KDF.SHA384_KDF, KDF.CLOUDHSM_X963_SHA384_KDF),
         bytes.fromhex("3041300d060960864801650304020205000430")),
    Hash("sha512", M.SHA512, MGF.MGF1_SHA512, M.SHA512_HMAC, M.SHA512_RSA_PKCS,
         M.SHA512_RSA_PKCS_PSS, M.ECDSA_SHA512, (KDF.SHA512_KDF, KDF.CLOUDHSM_X963_SHA512_KDF),
         bytes.fromhex("3051300d060960864801650304020305000440")),
)

# Lookups over HASHES, each by the value that names the hash (hashlib names as values).
HASH_OF_MECHANISM: dict[int, str] = {h.digest: h.name for h in HASHES}  # CKM_SHA* digests
HASH_OF_MGF: dict[int, str] = {h.mgf: h.name for h in HASHES}
HASH_OF_HMAC: dict[int, str] = {h.hmac: h.name for h in HASHES}
HASH_OF_RSA_PKCS: dict[int, str] = {h.rsa_pkcs: h.name for h in HASHES}
HASH_OF_RSA_PSS: dict[int, str] = {h.rsa_pss: h.name for h in HASHES}
HASH_OF_ECDSA: dict[int, str] = {h.ecdsa: h.name for h in HASHES}
HASH_OF_KDF: dict[int, str] = {k: h.name for h in HASHES for k in h.kdfs}
MGF_OF_HASH: dict[str, int] = {h.name: h.mgf for h in HASHES}
DIGEST_INFO: dict[str, bytes] = {h.name: h.digest_info for h in HASHES}


@dataclass(frozen=True)
class ParamRule:
    """The pParameter a mechanism accepts at C_*Init, C_WrapKey and C_UnwrapKey (`check_params`);
    anything else is CKR_MECHANISM_PARAM_INVALID."""

    kind: type = RawParams  # the CK_*_PARAMS it takes
    what: str = "no parameter"  # named in the refusal
    optional: bool = True  # NULL is accepted too
    raw_lens: frozenset[int] = frozenset({0})  # RawParams: the lengths accepted
    tag_bits: frozenset[int] = frozenset()  # CK_GCM_PARAMS: the ulTagBits accepted
    # CK_GCM_PARAMS pIv: "null" (must be NULL), or "hsm" (an IV; on encryption with
    # quirk_gcm_hsm_iv the zeroed 12-byte buffer the HSM's IV is written into)
    gcm_iv: str = ""
    hash_mgf: bool = False  # OAEP/PSS: the MGF1 hash is the hash (and the mechanism's hash)
    aes_key_bits: frozenset[int] = frozenset()  # CK_RSA_AES_KEY_WRAP_PARAMS.ulAESKeyBits


NO_PARAM = ParamRule()
_GCM_TAGS = frozenset({96, 104, 112, 120, 128})
# UG:pkcs11-mechanisms footnote 1: the HSM generates AES-GCM IVs (quirk_gcm_hsm_iv).
GCM_RULE = ParamRule(GcmParams, "CK_GCM_PARAMS", False, tag_bits=_GCM_TAGS, gcm_iv="hsm")
# UG:pkcs11-mechanisms footnote 3: pIv must be NULL; the IV travels with the data.
CLOUDHSM_GCM_RULE = ParamRule(GcmParams, "CK_GCM_PARAMS with a NULL pIv", False,
                              tag_bits=_GCM_TAGS, gcm_iv="null")
IV16 = ParamRule(RawParams, "a 16-byte IV", False, frozenset({16}))
IV8 = ParamRule(RawParams, "an 8-byte IV", False, frozenset({8}))
CTR_RULE = ParamRule(CtrParams, "CK_AES_CTR_PARAMS", False)
# UG:pkcs11-mechanisms footnote 4: the MGF1 hash must match the OAEP/PSS hash.
OAEP_RULE = ParamRule(OaepParams, "CK_RSA_PKCS_OAEP_PARAMS (SHA-1/224/256/384/512, MGF1 matching)",
                      False, hash_mgf=True)
PSS_RULE = ParamRule(PssParams, "CK_RSA_PKCS_PSS_PARAMS (hash and MGF1 matching the mechanism)",
                     False, hash_mgf=True)
# UG:ki-pkcs11-sdk items 1-2: a NULL or exactly 8-byte IV; default A6A6A6A6A6A6A6A6.
AES_WRAP_IV = ParamRule(RawParams, "a NULL or 8-byte AES key wrap IV", True, frozenset({0, 8}))
# PKCS#11 2.40 §2.1.21: a 128-, 192- or 256-bit ephemeral AES key, wrapped with RSA-OAEP whose
# hash and MGF1 match (footnote 4).
RSA_AES_RULE = ParamRule(RsaAesKeyWrapParams, "CK_RSA_AES_KEY_WRAP_PARAMS (128/192/256-bit AES, "
                         "OAEP hash and MGF1 matching)", False, hash_mgf=True,
                         aes_key_bits=frozenset({128, 192, 256}))


@dataclass(frozen=True)
class MechanismInfo:
    """One mechanism as CloudHSM reports and treats it. Key sizes are in bits for RSA/EC and in
    bytes for symmetric keys (PKCS#11 convention)."""

    mechanism: int
    min_key: int
    max_key: int
    flags: int
    key_type: int | None = None  # the key type it works with (None: digests, key generation)
    single_part: bool = False  # Update/Final rejected
    max_data: int | None = None  # in-HSM data limit (UG:pkcs11-mechanisms footnote 2)
    hash: str | None = None  # hashlib name for digests and hash-and-sign
    raw: int | None = None  # the raw HSM mechanism a hash-and-sign mechanism signs the digest with
    # the pParameter it accepts (checked at *Init and wrap/unwrap); None: checked by the node
    # (derivation parameters, hsmsim.node.kdf)
    params: ParamRule | None = NO_PARAM


def _rsa(mech: int, flags: int, *, single: bool = False, hash: str | None = None,
         raw: int | None = None, params: ParamRule = NO_PARAM) -> MechanismInfo:
    return MechanismInfo(mech, 2048, 4096, HW | flags, KeyType.RSA, single, None, hash, raw, params)


def _ec(mech: int, flags: int, *, single: bool = False, hash: str | None = None,
        params: ParamRule | None = NO_PARAM) -> MechanismInfo:
    raw = M.ECDSA if hash else None
    return MechanismInfo(mech, 224, 521, HW | flags | EC_FLAGS, KeyType.EC, single, None, hash, raw,
                         params)


def _aes(mech: int, flags: int, *, single: bool = False, max_data: int | None = None,
         params: ParamRule = NO_PARAM) -> MechanismInfo:
    return MechanismInfo(mech, 16, 32, HW | flags, KeyType.AES, single, max_data, params=params)


def _des3(mech: int, flags: int, *, max_data: int | None = None,
          params: ParamRule = NO_PARAM) -> MechanismInfo:
    return MechanismInfo(mech, 24, 24, HW | flags, KeyType.DES3, False, max_data, params=params)


def _hmac(mech: int, max_data: int) -> MechanismInfo:
    # FIDELITY: HMAC key size range 1..800 bytes from the GENERIC_SECRET key table (§1.5); the
    # exact C_GetMechanismInfo numbers CloudHSM reports are not documented.
    return MechanismInfo(mech, 1, 800, HW | SV, KeyType.GENERIC_SECRET, False, max_data)


def _digest(mech: int, name: str) -> MechanismInfo:
    return MechanismInfo(mech, 0, 0, HW | F.DIGEST, None, False, None, name)


_TABLE: tuple[MechanismInfo, ...] = (
    # key and key-pair generation
    _rsa(M.RSA_PKCS_KEY_PAIR_GEN, F.GENERATE_KEY_PAIR),
    _rsa(M.RSA_X9_31_KEY_PAIR_GEN, F.GENERATE_KEY_PAIR),
    MechanismInfo(M.EC_KEY_PAIR_GEN, 224, 521, HW | F.GENERATE_KEY_PAIR | EC_FLAGS, KeyType.EC),
    MechanismInfo(M.GENERIC_SECRET_KEY_GEN, 1, 800, HW | F.GENERATE, KeyType.GENERIC_SECRET),
    _aes(M.AES_KEY_GEN, F.GENERATE),
    _des3(M.DES3_KEY_GEN, F.GENERATE),
    # RSA sign/verify, encrypt/decrypt, wrap
    _rsa(M.RSA_X_509, SV | ENC),
    _rsa(M.RSA_PKCS, SV | ENC | WU, single=True),
    _rsa(M.RSA_PKCS_PSS, SV, single=True, params=PSS_RULE),
    _rsa(M.RSA_PKCS_OAEP, ENC | WU, single=True, params=OAEP_RULE),
    *(_rsa(h.rsa_pkcs, SV, hash=h.name, raw=M.RSA_PKCS) for h in HASHES),
    *(_rsa(h.rsa_pss, SV, hash=h.name, raw=M.RSA_PKCS_PSS, params=PSS_RULE) for h in HASHES),
    _rsa(M.RSA_AES_KEY_WRAP, WU, params=RSA_AES_RULE),
    # ECDSA and ECDH
    _ec(M.ECDSA, SV, single=True),
    *(_ec(h.ecdsa, SV, hash=h.name) for h in HASHES),
    _ec(M.ECDH1_DERIVE, F.DERIVE, params=None),
    # HMAC (data limits: UG:pkcs11-mechanisms footnote 2) and CMAC
    _hmac(M.SHA_1_HMAC, 16288),
    _hmac(M.SHA224_HMAC, 16256),
    _hmac(M.SHA256_HMAC, 16288),
    _hmac(M.SHA384_HMAC, 16224),
    _hmac(M.SHA512_HMAC, 16224),
    _aes(M.AES_CMAC, SV),
    # digests (hashed locally, no limit)
    *(_digest(h.digest, h.name) for h in HASHES),
    # symmetric encryption
    _aes(M.AES_ECB, ENC),
    _aes(M.AES_CTR, ENC, params=CTR_RULE),
    _aes(M.AES_CBC, ENC, max_data=16272, params=IV16),
    _aes(M.AES_CBC_PAD, ENC, params=IV16),
    _aes(M.AES_GCM, ENC | WU, single=True, max_data=16224, params=GCM_RULE),
    _aes(M.CLOUDHSM_AES_GCM, ENC | WU, single=True, max_data=16224, params=CLOUDHSM_GCM_RULE),
    _des3(M.DES3_ECB, ENC),
    _des3(M.DES3_CBC, ENC, max_data=16280, params=IV8),
    _des3(M.DES3_CBC_PAD, ENC, params=IV8),
    # derivation (vendor SP 800-108 counter KDF; HMAC or CMAC base keys)
    MechanismInfo(M.SP800_108_COUNTER_KDF, 16, 800, HW | F.DERIVE, None, params=None),
    # AES key wrap, CloudHSM vendor variants only
    _aes(M.CLOUDHSM_AES_KEY_WRAP_NO_PAD, WU, params=AES_WRAP_IV),
    _aes(M.CLOUDHSM_AES_KEY_WRAP_PKCS5_PAD, WU, params=AES_WRAP_IV),
    _aes(M.CLOUDHSM_AES_KEY_WRAP_ZERO_PAD, WU, params=AES_WRAP_IV),
)

MECHANISMS: dict[int, MechanismInfo] = {int(m.mechanism): m for m in _TABLE}

# Disallowed in FIPS-mode clusters after 2023 (UG:pkcs11-mechanisms footnote 5).
FIPS_DISALLOWED = frozenset({M.DES3_KEY_GEN, M.DES3_ECB, M.DES3_CBC, M.DES3_CBC_PAD})
FIPS_DISALLOWED_ENCRYPT = frozenset({M.RSA_PKCS})


def check_params(info: MechanismInfo, p: Param, iv_present: bool, zero_iv: bool) -> None:
    """The mechanism's parameter rule applied to `p`; `iv_present` tells a NULL pIv from an empty
    one, `zero_iv` asks for the zeroed 12-byte GCM IV (encryption with quirk_gcm_hsm_iv)."""
    rule = info.params
    if rule is None or (p is None and rule.optional):
        return
    bad = RV.MECHANISM_PARAM_INVALID
    m = info.mechanism
    if not isinstance(p, rule.kind):
        raise Pkcs11Error(bad, f"mechanism 0x{m:x} takes {rule.what}")
    if isinstance(p, RawParams) and len(p.data) not in rule.raw_lens:
        raise Pkcs11Error(bad, f"mechanism 0x{m:x} takes {rule.what}")
    if isinstance(p, GcmParams):
        if p.tag_bits not in rule.tag_bits:
            raise Pkcs11Error(bad, "ulTagBits must be 96..128 in steps of 8")
        if rule.gcm_iv == "null":
            if iv_present:
                raise Pkcs11Error(bad, "CKM_CLOUDHSM_AES_GCM takes a NULL pIv")
        elif zero_iv:
            if not iv_present or len(p.iv) == 0:
                raise Pkcs11Error(bad, "Expected 'ulIvBits' or 'ulIvLen' to be non-zero")
            if len(p.iv) != GCM_IV_LEN or any(p.iv):
                raise Pkcs11Error(bad, "Iv invalid. Reason: Expect IV to be all 0")
        elif len(p.iv) == 0:
            raise Pkcs11Error(bad, "an IV is required")
    if isinstance(p, RsaAesKeyWrapParams):
        if p.aes_key_bits not in rule.aes_key_bits:
            raise Pkcs11Error(bad, "ulAESKeyBits must be 128, 192 or 256")
        p = p.oaep
    if rule.hash_mgf:
        assert isinstance(p, (OaepParams, PssParams))
        name = HASH_OF_MECHANISM.get(p.hash_alg)
        if name is None or MGF_OF_HASH[name] != p.mgf or (info.hash and info.hash != name):
            raise Pkcs11Error(bad, f"mechanism 0x{m:x} takes {rule.what}")
