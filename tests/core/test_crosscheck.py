"""Random round trips cross-checked against pyca/cryptography in both directions: what the
core makes, pyca opens, and the other way round, for every mode and hash the core offers."""

from __future__ import annotations

import hashlib
import os
import random

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hsmsim.core import (
    AesGcmKey,
    DecryptionFailed,
    InvalidSignature,
    InvalidTag,
    RsaPrivateKey,
    RsaPublicKey,
)

HASHES = {"sha1": hashes.SHA1, "sha224": hashes.SHA224, "sha256": hashes.SHA256,
          "sha384": hashes.SHA384, "sha512": hashes.SHA512}


# ---- AES-GCM -------------------------------------------------------------------------------

@pytest.mark.parametrize("key_len", [16, 24, 32])
def test_gcm_random_both_ways(key_len: int) -> None:
    rng = random.Random(key_len)
    for _ in range(200):
        key = rng.randbytes(key_len)
        iv = rng.randbytes(12)
        data = rng.randbytes(rng.choice([0, 1, 15, 16, 17, 64, 1000, 4096]))
        aad = rng.randbytes(rng.choice([0, 1, 20, 300]))
        core, ref = AesGcmKey(key), AESGCM(key)
        ct = core.encrypt(iv, data, aad)
        assert ct == ref.encrypt(iv, data, aad)
        assert ref.decrypt(iv, ct, aad) == data
        assert core.decrypt(iv, ref.encrypt(iv, data, aad), aad) == data
        out = bytearray(len(data) + 16)
        assert core.encrypt_into(iv, data, memoryview(out), aad) == len(out)
        assert bytes(out) == ct


def test_gcm_short_tags_and_odd_ivs_match_pyca_truncation() -> None:
    """Short tags are the leading bytes of the full tag; other IV lengths go through GHASH."""
    key = os.urandom(32)
    core = AesGcmKey(key)
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    for iv_len in (8, 13, 16, 64, 128):  # pyca takes 8 to 128; NIST vectors cover 1 byte
        iv = os.urandom(iv_len)
        data, aad = os.urandom(77), os.urandom(9)
        enc = Cipher(algorithms.AES(key), modes.GCM(iv)).encryptor()
        enc.authenticate_additional_data(aad)
        full = enc.update(data) + enc.finalize() + enc.tag
        for tag_len in (4, 8, 12, 13, 16):
            ct = core.encrypt(iv, data, aad, tag_len=tag_len)
            assert ct == full[: len(data) + tag_len]
            assert core.decrypt(iv, ct, aad, tag_len=tag_len) == data
            bad = bytearray(ct)
            bad[-1] ^= 0x80
            with pytest.raises(InvalidTag):
                core.decrypt(iv, bytes(bad), aad, tag_len=tag_len)


def test_gcm_batch_matches_single_calls() -> None:
    key = os.urandom(16)
    core, ref = AesGcmKey(key, batch_threads=2), AESGCM(key)
    ivs = [os.urandom(12) for _ in range(600)]
    datas = [os.urandom(i % 2000) for i in range(600)]
    aads = [os.urandom(i % 7) for i in range(600)]
    cts = core.encrypt_batch(ivs, datas, aads)
    assert cts == [ref.encrypt(i, d, a) for i, d, a in zip(ivs, datas, aads)]
    tampered = list(cts)
    tampered[5] = tampered[5][:-1] + bytes([tampered[5][-1] ^ 1])
    tampered[599] = b"\x00" * len(tampered[599])
    got = core.decrypt_batch(ivs, tampered, aads)
    assert got[5] is None and got[599] is None
    assert [g for i, g in enumerate(got) if i not in (5, 599)] == [
        d for i, d in enumerate(datas) if i not in (5, 599)
    ]
    with pytest.raises(InvalidTag):
        core.decrypt(ivs[5], tampered[5], aads[5])


# ---- RSA -----------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=[2048, 3072, 4096])
def keypair(request: pytest.FixtureRequest) -> tuple[rsa.RSAPrivateKey, RsaPrivateKey]:
    bits = request.param
    ref = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    der = ref.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return ref, RsaPrivateKey.from_der(der)


def test_rsa_key_loading_forms(keypair: tuple[rsa.RSAPrivateKey, RsaPrivateKey]) -> None:
    ref, core = keypair
    pn = ref.private_numbers()
    trad = ref.private_bytes(serialization.Encoding.DER,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())
    comps = RsaPrivateKey.from_components(pn.public_numbers.n, pn.public_numbers.e, pn.d, pn.p,
                                          pn.q, pn.dmp1, pn.dmq1, pn.iqmp)
    spki = ref.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    pkcs1_pub = ref.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.PKCS1)
    digest = hashlib.sha256(b"forms").digest()
    sig = core.sign_pkcs1v15(digest, "sha256")
    for k in (RsaPrivateKey.from_der(trad), comps):
        assert k.key_size == ref.key_size
        assert k.sign_pkcs1v15(digest, "sha256") == sig
    for pub in (RsaPublicKey.from_der(spki), RsaPublicKey.from_der(pkcs1_pub),
                RsaPublicKey.from_components(pn.public_numbers.n, pn.public_numbers.e),
                core.public_key()):
        assert pub.key_size == ref.key_size
        assert pub.public_bytes_der() == spki
        assert (pub.n, pub.e) == (pn.public_numbers.n, pn.public_numbers.e)
        pub.verify_pkcs1v15(sig, digest, "sha256")


@pytest.mark.parametrize("hash_name", list(HASHES))
def test_rsa_pkcs1v15_both_ways(keypair: tuple[rsa.RSAPrivateKey, RsaPrivateKey],
                                hash_name: str) -> None:
    ref, core = keypair
    h = HASHES[hash_name]()
    digest = hashlib.new(hash_name, os.urandom(40)).digest()
    sig = core.sign_pkcs1v15(digest, hash_name)
    assert sig == ref.sign(digest, padding.PKCS1v15(), Prehashed(h))  # deterministic
    ref.public_key().verify(sig, digest, padding.PKCS1v15(), Prehashed(h))
    core.public_key().verify_pkcs1v15(sig, digest, hash_name)
    with pytest.raises(InvalidSignature):
        core.public_key().verify_pkcs1v15(sig[:-1] + bytes([sig[-1] ^ 1]), digest, hash_name)


@pytest.mark.parametrize("hash_name, mgf1", [("sha256", "sha256"), ("sha1", "sha1"),
                                             ("sha384", "sha256"), ("sha512", "sha1"),
                                             ("sha224", "sha512")])
def test_rsa_pss_both_ways(keypair: tuple[rsa.RSAPrivateKey, RsaPrivateKey], hash_name: str,
                           mgf1: str) -> None:
    ref, core = keypair
    h, m = HASHES[hash_name](), HASHES[mgf1]()
    digest = hashlib.new(hash_name, os.urandom(40)).digest()
    for salt_len in (0, h.digest_size, 7):
        pss = padding.PSS(mgf=padding.MGF1(m), salt_length=salt_len)
        sig = core.sign_pss(digest, hash_name, mgf1, salt_len)
        ref.public_key().verify(sig, digest, pss, Prehashed(h))
        core.public_key().verify_pss(ref.sign(digest, pss, Prehashed(h)), digest, hash_name,
                                     mgf1, salt_len)
    with pytest.raises(InvalidSignature):
        core.public_key().verify_pss(sig, digest, hash_name, mgf1, salt_len + 1)


@pytest.mark.parametrize("hash_name, mgf1", [("sha1", "sha1"), ("sha256", "sha256"),
                                             ("sha512", "sha1"), ("sha224", "sha384")])
def test_rsa_oaep_both_ways(keypair: tuple[rsa.RSAPrivateKey, RsaPrivateKey], hash_name: str,
                            mgf1: str) -> None:
    ref, core = keypair
    pad = padding.OAEP(mgf=padding.MGF1(HASHES[mgf1]()), algorithm=HASHES[hash_name](),
                       label=b"the label")
    msg = os.urandom(30)
    ct = core.public_key().encrypt_oaep(msg, hash_name, mgf1, b"the label")
    assert ref.decrypt(ct, pad) == msg
    assert core.decrypt_oaep(ref.public_key().encrypt(msg, pad), hash_name, mgf1,
                             b"the label") == msg
    with pytest.raises(DecryptionFailed):
        core.decrypt_oaep(ct, hash_name, mgf1, b"another label")
    with pytest.raises(DecryptionFailed):
        core.decrypt_oaep(ct, "sha1" if hash_name != "sha1" else "sha256", mgf1, b"the label")


def test_rsa_pkcs1v15_encryption_both_ways(
    keypair: tuple[rsa.RSAPrivateKey, RsaPrivateKey],
) -> None:
    ref, core = keypair
    msg = os.urandom(48)
    assert ref.decrypt(core.public_key().encrypt_pkcs1v15(msg), padding.PKCS1v15()) == msg
    assert core.decrypt_pkcs1v15(ref.public_key().encrypt(msg, padding.PKCS1v15())) == msg
    with pytest.raises(DecryptionFailed):  # an OAEP ciphertext is not a valid v1.5 one
        core.decrypt_pkcs1v15(core.public_key().encrypt_oaep(msg, "sha1", "sha1"))


def test_rsa_raw_and_batches(keypair: tuple[rsa.RSAPrivateKey, RsaPrivateKey]) -> None:
    ref, core = keypair
    pub = core.public_key()
    pn = ref.private_numbers()
    n, d = pn.public_numbers.n, pn.d
    x = int.from_bytes(os.urandom(ref.key_size // 8), "big") % n
    xb = x.to_bytes(ref.key_size // 8, "big")
    assert core.sign_raw(xb) == pow(x, d, n).to_bytes(len(xb), "big")
    assert pub.encrypt_raw(core.sign_raw(xb)) == xb
    assert core.decrypt_raw(pub.encrypt_raw(xb)) == xb

    digests = [hashlib.sha384(bytes([i])).digest() for i in range(9)]
    sigs = core.sign_batch_pkcs1v15(digests, "sha384")
    assert sigs == [core.sign_pkcs1v15(dg, "sha384") for dg in digests]
    for sig, dg in zip(core.sign_batch_pss(digests, "sha384", "sha256", 48), digests):
        ref.public_key().verify(sig, dg, padding.PSS(padding.MGF1(hashes.SHA256()), 48),
                                Prehashed(hashes.SHA384()))
    raw_items = [b"raw message", b"\x00", b"x" * (ref.key_size // 8 - 11)]
    for sig, item in zip(core.sign_batch_pkcs1v15(raw_items, None), raw_items):
        pub.verify_pkcs1v15(sig, item, None)


@pytest.mark.parametrize("threads", [1, 3])
def test_gcm_batch_of_large_messages(threads: int) -> None:
    """Large messages go to C one pointer each (no packed copy); results are the same."""
    key = os.urandom(32)
    core, ref = AesGcmKey(key, batch_threads=threads), AESGCM(key)
    rng = random.Random(threads)
    ivs = [rng.randbytes(rng.choice([12, 16])) for _ in range(40)]
    datas = [rng.randbytes(rng.randrange(4096, 40000)) for _ in range(39)] + [b""]
    aads = [rng.randbytes(rng.randrange(0, 40)) for _ in range(40)]
    cts = core.encrypt_batch(ivs, datas, aads, tag_len=12)
    for iv, d, a, ct in zip(ivs, datas, aads, cts):
        assert core.decrypt(iv, ct, a, tag_len=12) == d
        if len(iv) == 12:
            assert ct == ref.encrypt(iv, d, a)[: len(d) + 12]
    cts[3] = bytes(len(cts[3]))
    got = core.decrypt_batch(ivs, cts, aads, tag_len=12)
    assert got[3] is None and got[:3] == datas[:3] and got[4:] == datas[4:]


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_rsa_sign_batch_threads(keypair: tuple[rsa.RSAPrivateKey, RsaPrivateKey],
                                threads: int) -> None:
    ref, core = keypair
    der = ref.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    k = RsaPrivateKey.from_der(der, batch_threads=threads)
    assert k.batch_threads == threads
    digests = [hashlib.sha256(bytes([i])).digest() for i in range(7)]
    assert k.sign_batch_pkcs1v15(digests, "sha256") == [
        ref.sign(d, padding.PKCS1v15(), Prehashed(hashes.SHA256())) for d in digests
    ]
    pss = padding.PSS(padding.MGF1(hashes.SHA256()), 32)
    for sig, d in zip(k.sign_batch_pss(digests, "sha256", "sha256", 32), digests):
        ref.public_key().verify(sig, d, pss, Prehashed(hashes.SHA256()))
