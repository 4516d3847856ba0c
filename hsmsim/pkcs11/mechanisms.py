"""AWS CloudHSM Client SDK 5's PKCS#11 mechanism table (reference cloudhsm.md §1.4, §1.5): which
mechanisms exist, for which functions, key sizes, in-HSM data limits, single-part-only ones, and
how hash-and-sign mechanisms split into a local hash plus a raw HSM mechanism."""

from __future__ import annotations

from dataclasses import dataclass

from hsmsim.pkcs11.constants import KeyType, Mechanism as M, MechanismFlag as F

HW = F.HW
ENC = F.ENCRYPT | F.DECRYPT
SV = F.SIGN | F.VERIFY
WU = F.WRAP | F.UNWRAP
EC_FLAGS = F.EC_F_P | F.EC_NAMEDCURVE | F.EC_UNCOMPRESS


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


def _rsa(mech: int, flags: int, *, single: bool = False, hash: str | None = None,
         raw: int | None = None) -> MechanismInfo:
    return MechanismInfo(mech, 2048, 4096, HW | flags, KeyType.RSA, single, None, hash, raw)


def _ec(mech: int, flags: int, *, single: bool = False, hash: str | None = None) -> MechanismInfo:
    raw = M.ECDSA if hash else None
    return MechanismInfo(mech, 224, 521, HW | flags | EC_FLAGS, KeyType.EC, single, None, hash, raw)


def _aes(mech: int, flags: int, *, single: bool = False, max_data: int | None = None) -> MechanismInfo:
    return MechanismInfo(mech, 16, 32, HW | flags, KeyType.AES, single, max_data)


def _des3(mech: int, flags: int, *, max_data: int | None = None) -> MechanismInfo:
    return MechanismInfo(mech, 24, 24, HW | flags, KeyType.DES3, False, max_data)


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
    _rsa(M.RSA_PKCS_PSS, SV, single=True),
    _rsa(M.RSA_PKCS_OAEP, ENC | WU, single=True),
    _rsa(M.SHA1_RSA_PKCS, SV, hash="sha1", raw=M.RSA_PKCS),
    _rsa(M.SHA224_RSA_PKCS, SV, hash="sha224", raw=M.RSA_PKCS),
    _rsa(M.SHA256_RSA_PKCS, SV, hash="sha256", raw=M.RSA_PKCS),
    _rsa(M.SHA384_RSA_PKCS, SV, hash="sha384", raw=M.RSA_PKCS),
    _rsa(M.SHA512_RSA_PKCS, SV, hash="sha512", raw=M.RSA_PKCS),
    _rsa(M.SHA1_RSA_PKCS_PSS, SV, hash="sha1", raw=M.RSA_PKCS_PSS),
    _rsa(M.SHA224_RSA_PKCS_PSS, SV, hash="sha224", raw=M.RSA_PKCS_PSS),
    _rsa(M.SHA256_RSA_PKCS_PSS, SV, hash="sha256", raw=M.RSA_PKCS_PSS),
    _rsa(M.SHA384_RSA_PKCS_PSS, SV, hash="sha384", raw=M.RSA_PKCS_PSS),
    _rsa(M.SHA512_RSA_PKCS_PSS, SV, hash="sha512", raw=M.RSA_PKCS_PSS),
    _rsa(M.RSA_AES_KEY_WRAP, WU),
    # ECDSA and ECDH
    _ec(M.ECDSA, SV, single=True),
    _ec(M.ECDSA_SHA1, SV, hash="sha1"),
    _ec(M.ECDSA_SHA224, SV, hash="sha224"),
    _ec(M.ECDSA_SHA256, SV, hash="sha256"),
    _ec(M.ECDSA_SHA384, SV, hash="sha384"),
    _ec(M.ECDSA_SHA512, SV, hash="sha512"),
    _ec(M.ECDH1_DERIVE, F.DERIVE),
    # HMAC (data limits: UG:pkcs11-mechanisms footnote 2) and CMAC
    _hmac(M.SHA_1_HMAC, 16288),
    _hmac(M.SHA224_HMAC, 16256),
    _hmac(M.SHA256_HMAC, 16288),
    _hmac(M.SHA384_HMAC, 16224),
    _hmac(M.SHA512_HMAC, 16224),
    _aes(M.AES_CMAC, SV),
    # digests (hashed locally, no limit)
    _digest(M.SHA_1, "sha1"),
    _digest(M.SHA224, "sha224"),
    _digest(M.SHA256, "sha256"),
    _digest(M.SHA384, "sha384"),
    _digest(M.SHA512, "sha512"),
    # symmetric encryption
    _aes(M.AES_ECB, ENC),
    _aes(M.AES_CTR, ENC),
    _aes(M.AES_CBC, ENC, max_data=16272),
    _aes(M.AES_CBC_PAD, ENC),
    _aes(M.AES_GCM, ENC | WU, single=True, max_data=16224),
    _aes(M.CLOUDHSM_AES_GCM, ENC | WU, single=True, max_data=16224),
    _des3(M.DES3_ECB, ENC),
    _des3(M.DES3_CBC, ENC, max_data=16280),
    _des3(M.DES3_CBC_PAD, ENC),
    # derivation (vendor SP 800-108 counter KDF; HMAC or CMAC base keys)
    MechanismInfo(M.SP800_108_COUNTER_KDF, 16, 800, HW | F.DERIVE, None),
    # AES key wrap, CloudHSM vendor variants only
    _aes(M.CLOUDHSM_AES_KEY_WRAP_NO_PAD, WU),
    _aes(M.CLOUDHSM_AES_KEY_WRAP_PKCS5_PAD, WU),
    _aes(M.CLOUDHSM_AES_KEY_WRAP_ZERO_PAD, WU),
)

MECHANISMS: dict[int, MechanismInfo] = {int(m.mechanism): m for m in _TABLE}

# DER DigestInfo prefixes (RFC 8017 §9.2 note 1) for CKM_SHAx_RSA_PKCS done as hash + CKM_RSA_PKCS.
DIGEST_INFO: dict[str, bytes] = {
    "sha1": bytes.fromhex("3021300906052b0e03021a05000414"),
    "sha224": bytes.fromhex("302d300d06096086480165030402040500041c"),
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}

# CK_MECHANISM_TYPE of each digest, and the MGF1 that must go with it in OAEP/PSS (footnote 4).
HASH_OF_MECHANISM: dict[int, str] = {
    M.SHA_1: "sha1", M.SHA224: "sha224", M.SHA256: "sha256", M.SHA384: "sha384", M.SHA512: "sha512",
}
MGF_OF_HASH: dict[str, int] = {"sha1": 1, "sha256": 2, "sha384": 3, "sha512": 4, "sha224": 5}

# Disallowed in FIPS-mode clusters after 2023 (UG:pkcs11-mechanisms footnote 5).
FIPS_DISALLOWED = frozenset({M.DES3_KEY_GEN, M.DES3_ECB, M.DES3_CBC, M.DES3_CBC_PAD})
FIPS_DISALLOWED_ENCRYPT = frozenset({M.RSA_PKCS})
