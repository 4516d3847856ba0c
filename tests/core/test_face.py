"""The Python face's contract: precise TypeError/ValueError naming the bad argument before
anything reaches C, authentication failures that say nothing, lifetime (close, context
manager), and hypothesis properties (round trips hold; arbitrary input never crashes)."""

from __future__ import annotations

import hashlib
import os
import threading
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st

import hsmsim
from hsmsim.core import (
    AesGcmKey,
    CoreError,
    DecryptionFailed,
    InvalidSignature,
    InvalidTag,
    KeyFormatError,
    RsaPrivateKey,
    RsaPublicKey,
    native_version,
)
from hsmsim.errors import HsmsimError

KEY = bytes(range(32))


@pytest.fixture(scope="module")
def rsa_ref() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def priv(rsa_ref: rsa.RSAPrivateKey) -> RsaPrivateKey:
    return RsaPrivateKey.from_der(rsa_ref.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))


def test_version_and_exception_tree() -> None:
    assert native_version() == hsmsim.__version__
    for exc in (InvalidTag, InvalidSignature, DecryptionFailed, KeyFormatError):
        assert issubclass(exc, CoreError)
    assert issubclass(CoreError, HsmsimError)
    assert issubclass(KeyFormatError, ValueError)


# ---- AES-GCM argument checks ---------------------------------------------------------------

@pytest.mark.parametrize("key", [b"", b"k" * 15, b"k" * 17, b"k" * 31, b"k" * 33, b"k" * 64])
def test_gcm_key_length(key: bytes) -> None:
    with pytest.raises(ValueError, match="key must be 16, 24 or 32 bytes"):
        AesGcmKey(key)


@pytest.mark.parametrize("key", ["k" * 32, 32, None, [0] * 32])
def test_gcm_key_type(key: Any) -> None:
    with pytest.raises(TypeError, match="key must be bytes"):
        AesGcmKey(key)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"iv": b""}, ValueError, "iv must be 1 to 128 bytes"),
        ({"iv": b"i" * 129}, ValueError, "iv must be 1 to 128 bytes"),
        ({"iv": "twelve bytes"}, TypeError, "iv must be bytes"),
        ({"data": "text"}, TypeError, "data must be bytes"),
        ({"aad": 5}, TypeError, "aad must be bytes"),
        ({"aad": None}, TypeError, "aad must be bytes"),
        ({"tag_len": 3}, ValueError, "tag_len must be 4 to 16"),
        ({"tag_len": 17}, ValueError, "tag_len must be 4 to 16"),
        ({"tag_len": 16.0}, TypeError, "tag_len must be an int"),
        ({"tag_len": True}, TypeError, "tag_len must be an int"),
    ],
)
def test_gcm_argument_errors(kwargs: dict[str, Any], exc: type[Exception], match: str) -> None:
    k = AesGcmKey(KEY)
    args: dict[str, Any] = {"iv": b"i" * 12, "data": b"data", "aad": b"", "tag_len": 16}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        k.encrypt(**args)
    with pytest.raises(exc, match=match):
        k.encrypt_into(out=bytearray(64), **args)
    args["data"] = args["data"] * 5 if isinstance(args["data"], bytes) else args["data"]
    with pytest.raises(exc, match=match):
        k.decrypt(**args)
    with pytest.raises(exc, match=match):
        k.decrypt_into(out=bytearray(64), **args)
    with pytest.raises(exc, match=match.replace("iv ", "ivs\\[0\\] ").replace("data ", "datas\\[0\\] ")
                       .replace("aad ", "aads\\[0\\] ")):
        k.encrypt_batch([args["iv"]], [args["data"]], [args["aad"]], tag_len=args["tag_len"])


def test_gcm_size_limits_and_out_buffers() -> None:
    k = AesGcmKey(KEY)
    iv = b"i" * 12
    with pytest.raises(ValueError, match="data must be at most"):
        k.encrypt(iv, bytes(64 * 1024 * 1024 + 1))
    with pytest.raises(ValueError, match="data must be at least tag_len"):
        k.decrypt(iv, b"short", tag_len=16)
    with pytest.raises(ValueError, match="out must be at least 20 bytes"):
        k.encrypt_into(iv, b"data", bytearray(19))
    with pytest.raises(TypeError, match="out must be a writable buffer"):
        k.encrypt_into(iv, b"data", memoryview(bytes(64)))
    with pytest.raises(TypeError, match="out must be a bytearray or writable memoryview"):
        k.encrypt_into(iv, b"data", bytes(64))  # type: ignore[arg-type]
    out = bytearray(100)
    n = k.encrypt_into(iv, bytearray(b"data"), memoryview(out)[10:], aad=memoryview(b"a"))
    assert n == 20 and bytes(out[10:30]) == k.encrypt(iv, b"data", b"a")
    ct = bytes(out[10:30])
    plain = bytearray(4)
    assert k.decrypt_into(iv, ct, plain, b"a") == 4 and plain == b"data"


def test_gcm_batch_shape_errors() -> None:
    k = AesGcmKey(KEY)
    with pytest.raises(ValueError, match="ivs must have one iv per message"):
        k.encrypt_batch([b"i" * 12], [b"a", b"b"])
    with pytest.raises(ValueError, match="aads must have one aad per message"):
        k.encrypt_batch([b"i" * 12], [b"a"], [b"x", b"y"])
    with pytest.raises(TypeError, match="datas must be a sequence of bytes"):
        k.encrypt_batch([b"i" * 12], b"a")
    with pytest.raises(TypeError, match="datas\\[1\\] must be bytes"):
        k.encrypt_batch([b"i" * 12] * 2, [b"a", "b"])
    with pytest.raises(ValueError, match="datas\\[0\\] must be at least tag_len"):
        k.decrypt_batch([b"i" * 12], [b"abc"])
    assert k.encrypt_batch([], []) == [] and k.decrypt_batch([], []) == []
    with pytest.raises(ValueError, match="batch_threads must be 1 to 8"):
        AesGcmKey(KEY, batch_threads=0)


def test_gcm_invalid_tag_reveals_nothing() -> None:
    k = AesGcmKey(KEY)
    iv = b"i" * 12
    ct = k.encrypt(iv, b"secret", b"aad")
    failures = []
    for bad in (ct[:-1] + bytes([ct[-1] ^ 1]), bytes([ct[0] ^ 1]) + ct[1:]):
        with pytest.raises(InvalidTag) as info:
            k.decrypt(iv, bad, b"aad")
        failures.append(str(info.value))
    with pytest.raises(InvalidTag) as info:
        k.decrypt(iv, ct, b"other aad")
    failures.append(str(info.value))
    assert set(failures) == {"authentication failed"}


def test_gcm_close_and_context_manager() -> None:
    with AesGcmKey(KEY) as k:
        assert k.decrypt(b"i" * 12, k.encrypt(b"i" * 12, b"x")) == b"x"
    for call in (lambda: k.encrypt(b"i" * 12, b"x"),
                 lambda: k.encrypt_into(b"i" * 12, b"x", bytearray(32)),
                 lambda: k.encrypt_batch([b"i" * 12], [b"x"])):
        with pytest.raises(ValueError, match="key is closed"):
            call()
    k.close()  # idempotent
    assert "closed" in repr(k)


def test_gcm_threads_share_a_key() -> None:
    """Several threads on one key (more than the C context's pool of 8 working copies)."""
    k = AesGcmKey(KEY, batch_threads=2)
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for i in range(300):
                iv = seed.to_bytes(4, "big") + i.to_bytes(8, "big")
                data = os.urandom(i % 300)
                assert k.decrypt(iv, k.encrypt(iv, data, b"t"), b"t") == data
                if i % 50 == 0:
                    cts = k.encrypt_batch([iv] * 300, [data] * 300)
                    assert k.decrypt_batch([iv] * 300, cts) == [data] * 300
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@settings(max_examples=150, deadline=None)
@given(key=st.sampled_from([b"k" * 16, b"k" * 24, b"k" * 32]), iv=st.binary(min_size=1, max_size=128),
       data=st.binary(max_size=600), aad=st.binary(max_size=100), tag_len=st.integers(4, 16))
def test_gcm_roundtrip_property(key: bytes, iv: bytes, data: bytes, aad: bytes,
                                tag_len: int) -> None:
    k = AesGcmKey(key)
    ct = k.encrypt(iv, data, aad, tag_len)
    assert len(ct) == len(data) + tag_len
    assert k.decrypt(iv, ct, aad, tag_len) == data
    assert k.decrypt_batch([iv], [ct], [aad], tag_len) == [data]


@settings(max_examples=200, deadline=None)
@given(iv=st.one_of(st.binary(max_size=140), st.text(max_size=3), st.integers(), st.none()),
       data=st.one_of(st.binary(max_size=64), st.text(max_size=3), st.none()),
       tag_len=st.one_of(st.integers(-5, 40), st.floats(allow_nan=False), st.none()))
def test_gcm_arbitrary_input_never_crashes(iv: Any, data: Any, tag_len: Any) -> None:
    k = AesGcmKey(KEY)
    for call in (lambda: k.encrypt(iv, data, b"", tag_len),
                 lambda: k.decrypt(iv, data, b"", tag_len),
                 lambda: k.decrypt_into(iv, data, bytearray(200), b"", tag_len)):
        try:
            call()
        except (TypeError, ValueError, InvalidTag) as exc:
            assert str(exc)


# ---- RSA argument checks -------------------------------------------------------------------

def test_rsa_key_loading_errors(rsa_ref: rsa.RSAPrivateKey) -> None:
    with pytest.raises(KeyFormatError, match="der is not an RSA private key"):
        RsaPrivateKey.from_der(b"\x30\x03\x02\x01\x00")
    spki = rsa_ref.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(KeyFormatError):
        RsaPrivateKey.from_der(spki)
    with pytest.raises(KeyFormatError, match="der is not an RSA public key"):
        RsaPublicKey.from_der(spki + b"\x00")  # trailing bytes
    with pytest.raises(TypeError, match="der must be bytes"):
        RsaPublicKey.from_der("pem?")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="der must not be empty"):
        RsaPublicKey.from_der(b"")
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ValueError, match="key size must be 2048 to 4096 bits, got 1024"):
        RsaPrivateKey.from_der(small.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
    pn = rsa_ref.private_numbers()
    n, e = pn.public_numbers.n, pn.public_numbers.e
    good = [n, e, pn.d, pn.p, pn.q, pn.dmp1, pn.dmq1, pn.iqmp]
    for i, (name, bad) in enumerate([("p and q", pn.p + 2), ("d must", pn.d + 2),
                                     ("dp and dq", pn.dmp1 + 1), ("qinv", pn.iqmp + 1)]):
        args = list(good)
        args[{"p and q": 3, "d must": 2, "dp and dq": 5, "qinv": 7}[name]] = bad
        with pytest.raises(ValueError, match=name):
            RsaPrivateKey.from_components(*args)
    with pytest.raises(TypeError, match="qinv must be an int"):
        RsaPrivateKey.from_components(*good[:7], str(pn.iqmp))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="e must be odd"):
        RsaPublicKey.from_components(n, 4)


def test_rsa_argument_errors(priv: RsaPrivateKey) -> None:
    pub = priv.public_key()
    d = hashlib.sha256(b"x").digest()
    with pytest.raises(ValueError, match="hash must be one of sha1, sha224"):
        priv.sign_pkcs1v15(d, "md5")
    with pytest.raises(TypeError, match="hash must be a str"):
        priv.sign_pkcs1v15(d, 256)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="data must be the 32-byte sha256 digest"):
        priv.sign_pkcs1v15(d + b"x", "sha256")
    with pytest.raises(ValueError, match="data must be 1 to 245 bytes"):
        priv.sign_pkcs1v15(bytes(246), None)
    with pytest.raises(ValueError, match="salt_len must be 0 to 222"):
        priv.sign_pss(d, "sha256", "sha256", 223)
    with pytest.raises(ValueError, match="mgf1_hash must be one of"):
        priv.sign_pss(d, "sha256", "SHA256", 32)
    with pytest.raises(TypeError, match="salt_len must be an int"):
        priv.sign_pss(d, "sha256", "sha256", "32")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="digests\\[1\\] must be 32 bytes"):
        priv.sign_batch_pss([d, d[:-1]], "sha256", "sha256", 32)
    with pytest.raises(ValueError, match="data must be at most 190 bytes for OAEP"):
        pub.encrypt_oaep(bytes(191), "sha256", "sha256")
    with pytest.raises(ValueError, match="data must be at most 245 bytes"):
        pub.encrypt_pkcs1v15(bytes(246))
    with pytest.raises(ValueError, match="data must be 256 bytes"):
        priv.decrypt_oaep(bytes(255), "sha1", "sha1")
    with pytest.raises(TypeError, match="label must be bytes"):
        priv.decrypt_oaep(bytes(256), "sha1", "sha1", "label")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="data must be an integer below the modulus"):
        priv.sign_raw(b"\xff" * 256)
    with pytest.raises(TypeError, match="signature must be bytes"):
        pub.verify_pkcs1v15(None, d, "sha256")  # type: ignore[arg-type]


def test_rsa_failures_reveal_nothing(priv: RsaPrivateKey) -> None:
    pub = priv.public_key()
    d = hashlib.sha256(b"x").digest()
    sig = priv.sign_pkcs1v15(d, "sha256")
    messages = set()
    for bad_sig in (sig[:-1], sig + b"\x00", bytes(256), sig[:-1] + bytes([sig[-1] ^ 1])):
        with pytest.raises(InvalidSignature) as info:
            pub.verify_pkcs1v15(bad_sig, d, "sha256")
        messages.add(str(info.value))
    with pytest.raises(InvalidSignature) as info:
        pub.verify_pss(sig, d, "sha256", "sha256", 32)  # a v1.5 signature is not PSS
    messages.add(str(info.value))
    assert messages == {"signature verification failed"}
    ct = pub.encrypt_oaep(b"m", "sha256", "sha256")
    outs = set()
    for call in (lambda: priv.decrypt_oaep(ct, "sha256", "sha1"),
                 lambda: priv.decrypt_oaep(ct, "sha256", "sha256", b"L"),
                 lambda: priv.decrypt_oaep(bytes(256), "sha256", "sha256")):
        with pytest.raises(DecryptionFailed) as dinfo:
            call()
        outs.add(str(dinfo.value))
    assert outs == {"decryption failed"}


def test_rsa_batch_threads_checked(rsa_ref: rsa.RSAPrivateKey) -> None:
    der = rsa_ref.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    with pytest.raises(ValueError, match="batch_threads must be 1 to 8, got 9"):
        RsaPrivateKey.from_der(der, batch_threads=9)
    with pytest.raises(TypeError, match="batch_threads must be an int"):
        RsaPrivateKey.from_der(der, batch_threads=1.5)  # type: ignore[arg-type]


def test_rsa_close(priv: RsaPrivateKey) -> None:
    k = priv.public_key()
    with k:
        assert k.key_size == 2048
    with pytest.raises(ValueError, match="key is closed"):
        k.encrypt_pkcs1v15(b"x")


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=300), hash_name=st.one_of(st.none(), st.sampled_from(
    ["sha1", "sha224", "sha256", "sha384", "sha512", "md5", ""])), salt=st.integers(-3, 300))
def test_rsa_arbitrary_input_never_crashes(priv: RsaPrivateKey, data: bytes,
                                           hash_name: str | None, salt: int) -> None:
    pub = priv.public_key()
    calls = [
        lambda: pub.verify_pkcs1v15(priv.sign_pkcs1v15(data, hash_name), data, hash_name),
        lambda: pub.verify_pss(priv.sign_pss(data, hash_name or "sha1", "sha256", salt), data,
                               hash_name or "sha1", "sha256", salt),
        lambda: priv.decrypt_oaep(data, hash_name or "sha1", "sha1"),
        lambda: priv.decrypt_pkcs1v15(data),
        lambda: priv.decrypt_oaep(pub.encrypt_oaep(data, hash_name or "sha1", "sha1"),
                                  hash_name or "sha1", "sha1"),
    ]
    for call in calls:
        try:
            call()
        except (ValueError, TypeError, DecryptionFailed, InvalidSignature) as exc:
            assert str(exc)


def test_malloc_keep_checks_its_argument() -> None:
    from hsmsim.core import malloc_keep

    assert malloc_keep(64 * 1024 * 1024) in (True, False)
    with pytest.raises(TypeError, match="keep_bytes must be an int"):
        malloc_keep(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="keep_bytes must be 0 to"):
        malloc_keep(-1)


def test_gcm_close_while_other_threads_use_the_key() -> None:
    """close() in one thread while others are mid-call: the C context lives until the last
    call in flight returns; later calls get ValueError, and nothing crashes."""
    k = AesGcmKey(KEY)
    outcomes: list[str] = []
    started = threading.Barrier(5)

    def work() -> None:
        started.wait()
        out = bytearray(4096 + 16)
        try:
            while True:
                k.encrypt_into(b"i" * 12, bytes(4096), out)
                k.encrypt_batch([b"i" * 12] * 8, [bytes(512)] * 8)
        except ValueError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    started.wait()
    k.close()
    for t in threads:
        t.join(timeout=30)
    assert outcomes == ["key is closed"] * 4
