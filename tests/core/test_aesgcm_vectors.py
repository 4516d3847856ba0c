"""AES-GCM known answers: every NIST CAVP GCM vector (encrypt and decrypt, AES-128/192/256,
IVs of 1 to 128 bytes, tags of 4 to 16 bytes), through single calls and through batches."""

from __future__ import annotations

from typing import Any

import pytest

from hsmsim.core import AesGcmKey, InvalidTag

from vectorfiles import load_rsp

FILES = [f"ciphers/AES/GCM/gcm{kind}{bits}.rsp" for kind in ("EncryptExtIV", "Decrypt")
         for bits in (128, 192, 256)]


def _fields(v: dict[str, Any]) -> tuple[bytes, bytes, bytes, bytes, bytes, bytes | None]:
    pt = None if v["fail"] else bytes.fromhex(v.get("pt", ""))
    return (bytes.fromhex(v["key"]), bytes.fromhex(v["iv"]), bytes.fromhex(v["aad"]),
            bytes.fromhex(v["ct"]), bytes.fromhex(v["tag"]), pt)


@pytest.mark.parametrize("rel", FILES, ids=lambda r: r.rsplit("/", 1)[1])
def test_gcm_vectors_single(rel: str) -> None:
    vectors = load_rsp(rel, "Count")
    assert len(vectors) > 1000
    checked = 0
    for v in vectors:
        key, iv, aad, ct, tag, pt = _fields(v)
        k = AesGcmKey(key)
        if pt is None:
            with pytest.raises(InvalidTag):
                k.decrypt(iv, ct + tag, aad, tag_len=len(tag))
            out = bytearray(b"\xaa" * len(ct))
            with pytest.raises(InvalidTag):
                k.decrypt_into(iv, ct + tag, out, aad, tag_len=len(tag))
            assert out == bytes(len(ct)), "plaintext of a failed decrypt must be wiped"
        else:
            assert k.encrypt(iv, pt, aad, tag_len=len(tag)) == ct + tag
            assert k.decrypt(iv, ct + tag, aad, tag_len=len(tag)) == pt
        checked += 1
    assert checked == len(vectors)


@pytest.mark.parametrize("rel", [FILES[0], FILES[5]], ids=lambda r: r.rsplit("/", 1)[1])
def test_gcm_vectors_batched(rel: str) -> None:
    """The vectors through the batch entry points. Every NIST vector has its own key, so
    these are one-message batches; many-message batches are cross-checked against pyca in
    test_crosscheck.py."""
    for v in load_rsp(rel, "Count"):
        key, iv, aad, ct, tag, pt = _fields(v)
        k = AesGcmKey(key, batch_threads=1)
        assert k.decrypt_batch([iv], [ct + tag], [aad], tag_len=len(tag)) == [pt]
        if pt is not None:
            assert k.encrypt_batch([iv], [pt], [aad], tag_len=len(tag)) == [ct + tag]
