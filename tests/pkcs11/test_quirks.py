"""Every CloudHSM quirk and limit the gateway reproduces (reference cloudhsm.md §1.4-§1.8 and its
fidelity checklist), each against the default gateway and, where it can be switched off, against
a gateway with the quirk off."""

from __future__ import annotations

import hashlib
from ctypes import byref, c_ubyte, c_ulong, c_void_p, cast, create_string_buffer, sizeof

import pkcs11
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pkcs11 import Attribute, KeyType, Mechanism
from pkcs11.exceptions import MechanismParamInvalid
from pkcs11.mechanisms import GCMParams

from hsmsim.pkcs11.constants import RV, Attribute as A, Mechanism as M
from hsmsim.pkcs11.mechanisms import MECHANISMS
from p11helpers import REF_PIN, crypto_public
from p11raw import CK_GCM_PARAMS, Raw, mechanism, open_session, template

U = c_ulong
KEY = bytes(range(32))


def aes_key(raw: Raw, h: int, value: bytes = KEY) -> int:
    """A known AES key (CreateObject), so results can be checked with pyca/cryptography."""
    key = U()
    t, _keep = template((A.CLASS, 4), (A.KEY_TYPE, 0x1F), (A.VALUE, value), (A.ENCRYPT, True),
                        (A.DECRYPT, True), (A.WRAP, True), (A.UNWRAP, True), (A.EXTRACTABLE, True))
    assert raw.C_CreateObject(U(h), t, U(7), byref(key)) == RV.OK
    return key.value


def hmac_key(raw: Raw, h: int) -> int:
    key = U()
    t, _keep = template((A.CLASS, 4), (A.KEY_TYPE, 0x10), (A.VALUE, KEY), (A.SIGN, True), (A.VERIFY, True))
    assert raw.C_CreateObject(U(h), t, U(5), byref(key)) == RV.OK
    return key.value


def gcm(iv: object, ivlen: int = 12, aad: bytes = b"", tag_bits: int = 128) -> CK_GCM_PARAMS:
    p = CK_GCM_PARAMS(None if iv is None else cast(iv, c_void_p), ivlen, ivlen * 8, None, 0, tag_bits)
    if aad:
        p._aad = create_string_buffer(aad, len(aad))  # type: ignore[attr-defined]
        p.pAAD, p.ulAADLen = cast(p._aad, c_void_p), len(aad)  # type: ignore[attr-defined]
    return p


def encrypt(raw: Raw, h: int, mech_type: int, param: object, key: int, data: bytes) -> tuple[int, bytes]:
    mech, _keep = mechanism(mech_type, param)
    rv = raw.C_EncryptInit(U(h), byref(mech), U(key))
    if rv != RV.OK:
        return rv, b""
    out, n = create_string_buffer(len(data) + 64), U(len(data) + 64)
    rv = raw.C_Encrypt(U(h), data, U(len(data)), out, byref(n))
    return rv, out.raw[:n.value]


# --- AES-GCM (fidelity checklist 8-12) ------------------------------------------------------------
def test_gcm_iv_generated_by_hsm_written_back(live: Raw) -> None:
    h = open_session(live, REF_PIN)
    key = aes_key(live, h)
    iv = create_string_buffer(12)
    rv, ct = encrypt(live, h, M.AES_GCM, gcm(iv, aad=b"hdr"), key, b"secret data")
    assert rv == RV.OK and len(ct) == len(b"secret data") + 16  # ciphertext || tag, no IV
    hsm_iv = iv.raw[:12]
    assert hsm_iv != bytes(12)
    assert AESGCM(KEY).decrypt(hsm_iv, ct, b"hdr") == b"secret data"


@pytest.mark.parametrize("iv,ivlen", [(b"\x01" + bytes(11), 12), (bytes(16), 16), (None, 0), (bytes(12), 0)])
def test_gcm_rejects_non_zero_or_missing_iv(live: Raw, iv: bytes | None, ivlen: int) -> None:
    h = open_session(live, REF_PIN)
    key = aes_key(live, h)
    buf = None if iv is None else create_string_buffer(iv, len(iv))
    rv, _ = encrypt(live, h, M.AES_GCM, gcm(buf, ivlen), key, b"x")
    assert rv == RV.MECHANISM_PARAM_INVALID


def test_gcm_through_python_pkcs11(ref_session) -> None:  # type: ignore[no-untyped-def]
    key = ref_session.generate_key(KeyType.AES, 256)
    nonce = bytes(bytearray(12))  # a fresh zeroed buffer: CloudHSM writes its IV into it
    ct = key.encrypt(b"payload", mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce, b"a", 128))
    assert nonce != bytes(12)
    assert key.decrypt(ct, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce, b"a", 128)) == b"payload"
    with pytest.raises(MechanismParamInvalid):
        key.encrypt(b"payload", mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(b"\x07" * 12, b"", 128))


def test_cloudhsm_aes_gcm_prepends_the_iv(live: Raw) -> None:
    assert M.CLOUDHSM_AES_GCM == 0x80000000 | 0x1087
    h = open_session(live, REF_PIN)
    key = aes_key(live, h)
    rv, out = encrypt(live, h, M.CLOUDHSM_AES_GCM, gcm(None, 0), key, b"vendor gcm")
    assert rv == RV.OK and len(out) == 12 + 10 + 16
    assert AESGCM(KEY).decrypt(out[:12], out[12:], None) == b"vendor gcm"
    mech, _keep = mechanism(M.CLOUDHSM_AES_GCM, gcm(None, 0))
    assert live.C_DecryptInit(U(h), byref(mech), U(key)) == RV.OK
    pt, n = create_string_buffer(64), U(64)
    assert live.C_Decrypt(U(h), out, U(len(out)), pt, byref(n)) == RV.OK and pt.raw[:n.value] == b"vendor gcm"
    iv = create_string_buffer(12)  # pIv must be NULL for the vendor mechanism
    rv, _ = encrypt(live, h, M.CLOUDHSM_AES_GCM, gcm(iv), key, b"x")
    assert rv == RV.MECHANISM_PARAM_INVALID


def test_gcm_has_no_multipart(live: Raw) -> None:
    h = open_session(live, REF_PIN)
    key = aes_key(live, h)
    iv = create_string_buffer(12)
    mech, _keep = mechanism(M.AES_GCM, gcm(iv))
    assert live.C_EncryptInit(U(h), byref(mech), U(key)) == RV.OK
    out, n = create_string_buffer(64), U(64)
    assert live.C_EncryptUpdate(U(h), b"part", U(4), out, byref(n)) == RV.MECHANISM_INVALID
    iv2 = create_string_buffer(b"\x01" * 12, 12)
    mech, _keep2 = mechanism(M.AES_GCM, gcm(iv2))
    assert live.C_DecryptInit(U(h), byref(mech), U(key)) == RV.OK
    assert live.C_DecryptUpdate(U(h), b"part", U(4), out, byref(n)) == RV.MECHANISM_INVALID


# --- data limits (checklist 12) and local hashing (14) ----------------------------------------------
@pytest.mark.parametrize("mech_type,limit", [(M.AES_GCM, 16224), (M.CLOUDHSM_AES_GCM, 16224), (M.AES_CBC, 16272)])
def test_hsm_data_limits_for_ciphers(live: Raw, strict: Raw, mech_type: int, limit: int) -> None:
    for raw, over_rv in ((live, RV.DATA_LEN_RANGE), (strict, RV.OK)):
        h = open_session(raw, REF_PIN)
        key = aes_key(raw, h)
        size = limit - limit % 16 if mech_type == M.AES_CBC else limit
        over = size + 16
        for n, want in ((size, RV.OK), (over, over_rv)):
            if mech_type == M.AES_GCM:
                param: object = gcm(create_string_buffer(12))
            elif mech_type == M.CLOUDHSM_AES_GCM:
                param = gcm(None, 0)
            else:
                param = bytes(16)
            rv, _ = encrypt(raw, h, mech_type, param, key, b"d" * n)
            assert rv == want, (raw is live, n)


@pytest.mark.parametrize("mech_type,limit", [(M.SHA_1_HMAC, 16288), (M.SHA224_HMAC, 16256), (M.SHA256_HMAC, 16288),
                                             (M.SHA384_HMAC, 16224), (M.SHA512_HMAC, 16224)])
def test_hmac_data_limits(live: Raw, mech_type: int, limit: int) -> None:
    h = open_session(live, REF_PIN)
    key = hmac_key(live, h)
    mech, _ = mechanism(mech_type)
    for n, want in ((limit, RV.OK), (limit + 1, RV.DATA_LEN_RANGE)):
        assert live.C_SignInit(U(h), byref(mech), U(key)) == RV.OK
        out, size = create_string_buffer(64), U(64)
        assert live.C_Sign(U(h), b"m" * n, U(n), out, byref(size)) == want
    # multi-part counts the total
    assert live.C_SignInit(U(h), byref(mech), U(key)) == RV.OK
    assert live.C_SignUpdate(U(h), b"m" * limit, U(limit)) == RV.OK
    assert live.C_SignUpdate(U(h), b"m", U(1)) == RV.DATA_LEN_RANGE


def test_hash_and_sign_has_no_size_limit(ref_session) -> None:  # type: ignore[no-untyped-def]
    pub, priv = ref_session.generate_keypair(KeyType.RSA, 2048, store=False)
    data = b"z" * (3 * 1024 * 1024)
    sig = priv.sign(data, mechanism=Mechanism.SHA256_RSA_PKCS)
    crypto_public(pub).verify(sig, data, padding.PKCS1v15(), hashes.SHA256())
    # multi-part hash-and-sign gives the same signature (PKCS#1 v1.5 is deterministic)
    assert priv.sign((data[i:i + 65536] for i in range(0, len(data), 65536)),
                     mechanism=Mechanism.SHA256_RSA_PKCS) == sig
    digest = ref_session.digest(data, mechanism=Mechanism.SHA256)
    assert digest == hashlib.sha256(data).digest()


# --- single-part-only mechanisms (13) and wrong sequences (25) -----------------------------------------
def test_single_part_only_mechanisms_reject_update(live: Raw) -> None:
    h = open_session(live, REF_PIN)
    pub, priv = U(), U()
    mech, _ = mechanism(M.RSA_PKCS_KEY_PAIR_GEN)
    tpub, _k1 = template((A.MODULUS_BITS, 2048), (A.PUBLIC_EXPONENT, b"\x01\x00\x01"), (A.VERIFY, True))
    tpriv, _k2 = template((A.SIGN, True),)
    assert live.C_GenerateKeyPair(U(h), byref(mech), tpub, U(3), tpriv, U(1), byref(pub), byref(priv)) == RV.OK
    for m in (M.RSA_PKCS, M.ECDSA):
        sm, _ = mechanism(m)
        rv = live.C_SignInit(U(h), byref(sm), priv)
        if m == M.ECDSA:
            assert rv == RV.KEY_TYPE_INCONSISTENT  # an RSA key
            continue
        assert rv == RV.OK
        assert live.C_SignUpdate(U(h), b"abc", U(3)) == RV.MECHANISM_INVALID
        assert live.C_SignUpdate(U(h), b"abc", U(3)) == RV.OPERATION_NOT_INITIALIZED  # terminated


def test_wrong_sequence_succeeds_with_wrong_result(live: Raw, strict: Raw) -> None:
    block1, block2 = b"A" * 16, b"B" * 16
    expected_whole = Cipher(algorithms.AES(KEY), modes.ECB()).encryptor().update(block1 + block2)
    for raw in (live, strict):
        h = open_session(raw, REF_PIN)
        key = aes_key(raw, h)
        mech, _ = mechanism(M.AES_ECB)
        assert raw.C_EncryptInit(U(h), byref(mech), U(key)) == RV.OK
        out, n = create_string_buffer(64), U(64)
        assert raw.C_EncryptUpdate(U(h), block1, U(16), out, byref(n)) == RV.OK
        n = U(64)
        rv = raw.C_Encrypt(U(h), block2, U(16), out, byref(n))
        if raw is live:
            # UG:ki-pkcs11-sdk item 10: success, but the first part is lost
            assert rv == RV.OK and out.raw[:n.value] != expected_whole
            assert out.raw[:n.value] == expected_whole[16:]
        else:
            assert rv == RV.OPERATION_ACTIVE
        t, _k = template()
        assert raw.C_FindObjectsInit(U(h), t, U(0)) == RV.OK
        assert raw.C_FindObjectsInit(U(h), t, U(0)) == (RV.OK if raw is live else RV.OPERATION_ACTIVE)


# --- templates and attributes (20-22) --------------------------------------------------------------------
def test_rsa_private_template_quirk(live: Raw, strict: Raw) -> None:
    for raw in (live, strict):
        h = open_session(raw, REF_PIN)
        pub, priv = U(), U()
        mech, _ = mechanism(M.RSA_PKCS_KEY_PAIR_GEN)
        tpub, _k1 = template((A.MODULUS_BITS, 2048), (A.PUBLIC_EXPONENT, b"\x01\x00\x01"))
        tpriv, _k2 = template((A.SIGN, True), (A.MODULUS_BITS, 2048))
        rv = raw.C_GenerateKeyPair(U(h), byref(mech), tpub, U(2), tpriv, U(2), byref(pub), byref(priv))
        if raw is strict:
            assert rv == RV.TEMPLATE_INCONSISTENT
            continue
        assert rv == RV.OK  # UG:ki-pkcs11-sdk item 6: a key with every usage flag false
        flags, _k3 = template((A.SIGN, True), (A.DECRYPT, True), (A.UNWRAP, True))
        assert raw.C_GetAttributeValue(U(h), priv, flags, U(3)) == RV.OK
        assert all(c_ubyte.from_address(flags[i].pValue).value == 0 for i in range(3))


def test_attribute_defaults_and_read_only(ref_session) -> None:  # type: ignore[no-untyped-def]
    key = ref_session.generate_key(KeyType.AES, 128)
    assert key[Attribute.SENSITIVE] is True
    assert key[Attribute.EXTRACTABLE] is True
    assert key[Attribute.TOKEN] is False
    assert key[Attribute.LOCAL] is True
    with pytest.raises(pkcs11.exceptions.AttributeSensitive):
        key[Attribute.VALUE]
    with pytest.raises(pkcs11.exceptions.AttributeReadOnly):
        ref_session.generate_key(KeyType.AES, 128, template={Attribute.LOCAL: False})


@pytest.mark.parametrize("bits", [1024, 2100, 4352])
def test_rsa_key_sizes(ref_session, bits: int) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(pkcs11.exceptions.KeySizeRange):
        ref_session.generate_keypair(KeyType.RSA, bits)


def test_aes_key_sizes(ref_session) -> None:  # type: ignore[no-untyped-def]
    # A length AES does not have is a bad CKA_VALUE_LEN (PKCS#11, SoftHSM2; CloudHSM answers
    # key-generation templates it refuses with CKR_ATTRIBUTE_VALUE_INVALID, reference §1.6).
    with pytest.raises(pkcs11.exceptions.AttributeValueInvalid):
        ref_session.generate_key(KeyType.AES, 160)


# --- API surface, mechanisms, parameters (16, 17, 24, 35) ----------------------------------------------------
def test_mechanism_list_is_cloudhsms(ref_token) -> None:  # type: ignore[no-untyped-def]
    listed = {int(m) for m in ref_token.slot.get_mechanisms()}
    assert listed == set(MECHANISMS)
    assert int(Mechanism.AES_KEY_WRAP) not in listed and int(Mechanism.SHA256_RSA_PKCS) in listed
    info = ref_token.slot.get_mechanism_info(Mechanism.RSA_PKCS_KEY_PAIR_GEN)
    assert (info.min_key_length, info.max_key_length) == (2048, 4096)
    info = ref_token.slot.get_mechanism_info(Mechanism.AES_KEY_GEN)
    assert (info.min_key_length, info.max_key_length) == (16, 32)
    with pytest.raises(pkcs11.exceptions.MechanismInvalid):
        ref_token.slot.get_mechanism_info(Mechanism.AES_KEY_WRAP)


def test_copy_and_set_attribute_are_unsupported(live: Raw, strict: Raw) -> None:
    for raw in (live, strict):
        h = open_session(raw, REF_PIN)
        key = aes_key(raw, h)
        new = U()
        t, _k = template((A.LABEL, "copy"),)
        want = RV.FUNCTION_NOT_SUPPORTED if raw is live else RV.OK
        assert raw.C_CopyObject(U(h), U(key), t, U(1), byref(new)) == want
        assert raw.C_SetAttributeValue(U(h), U(key), t, U(1)) == want
        assert raw.C_GetObjectSize(U(h), U(key), byref(new)) == want


def test_oaep_hash_must_match_mgf(ref_session) -> None:  # type: ignore[no-untyped-def]
    pub, priv = ref_session.generate_keypair(KeyType.RSA, 2048)
    with pytest.raises(MechanismParamInvalid):
        pub.encrypt(b"x", mechanism=Mechanism.RSA_PKCS_OAEP,
                    mechanism_param=(Mechanism.SHA256, pkcs11.MGF.SHA1, None))
    ct = pub.encrypt(b"x", mechanism=Mechanism.RSA_PKCS_OAEP,
                     mechanism_param=(Mechanism.SHA256, pkcs11.MGF.SHA256, None))
    assert priv.decrypt(ct, mechanism=Mechanism.RSA_PKCS_OAEP,
                        mechanism_param=(Mechanism.SHA256, pkcs11.MGF.SHA256, None)) == b"x"


@pytest.mark.parametrize("iv,ok", [(None, True), (bytes.fromhex("A6A6A6A6A6A6A6A6"), True), (b"\x01" * 4, False),
                                   (b"\x01" * 16, False),
                                   (b"\x01" * 8, False)])  # FIDELITY: the nodes only use the default IV
def test_vendor_aes_key_wrap_iv(live: Raw, iv: bytes | None, ok: bool) -> None:
    h = open_session(live, REF_PIN)
    wrapping, key = aes_key(live, h), aes_key(live, h, bytes(16))
    mech, _keep = mechanism(M.CLOUDHSM_AES_KEY_WRAP_NO_PAD, iv)
    n = U(0)
    rv = live.C_WrapKey(U(h), byref(mech), U(wrapping), U(key), None, byref(n))
    assert rv == (RV.OK if ok else RV.MECHANISM_PARAM_INVALID)
    if ok:
        assert n.value == 24


def test_fips_mode_has_no_des3(ref_token) -> None:  # type: ignore[no-untyped-def]
    # a non-FIPS cluster (the default) lists 3DES; fips_mode=true removes it (unit-level check)
    from hsmsim.gateway.config import GatewayConfig
    from hsmsim.gateway.ops_token import get_mechanism_list
    from hsmsim.gateway.service import Gateway
    from hsmsim.gateway.protocol import Reader, Writer
    assert int(Mechanism.DES3_CBC) in {int(m) for m in ref_token.slot.get_mechanisms()}
    gw = Gateway(None, GatewayConfig(fips_mode=True))  # type: ignore[arg-type]
    rv, body = get_mechanism_list(gw, None, Reader(Writer().u64(1).done()))  # type: ignore[arg-type]
    r = Reader(body)
    mechs = {r.u64() for _ in range(r.u32())}
    assert rv == 0 and M.DES3_CBC not in mechs and M.AES_GCM in mechs
    assert sizeof(CK_GCM_PARAMS) == 48


def test_set_attribute_value_works_on_certificates(live: Raw) -> None:
    """UG:pkcs11-certificate-storage-api: C_SetAttributeValue is supported for certificates."""
    h = open_session(live, REF_PIN)
    cert = U()
    t, _keep = template((A.CLASS, 1), (A.CERTIFICATE_TYPE, 0), (A.TOKEN, True), (A.PRIVATE, False),
                        (A.SUBJECT, b"\x30\x00"), (A.VALUE, b"\x30\x03\x02\x01\x01"), (A.LABEL, "cert"))
    assert live.C_CreateObject(U(h), t, U(7), byref(cert)) == RV.OK
    new_label, _k = template((A.LABEL, "renamed"),)
    assert live.C_SetAttributeValue(U(h), cert, new_label, U(1)) == RV.OK
    buf = create_string_buffer(16)
    q = (type(new_label[0]) * 1)(type(new_label[0])(A.LABEL, cast(buf, c_void_p), 16))
    assert live.C_GetAttributeValue(U(h), cert, q, U(1)) == RV.OK
    assert buf.raw[:q[0].ulValueLen] == b"renamed"
