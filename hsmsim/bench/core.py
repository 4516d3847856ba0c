"""Benchmark of the crypto core against pyca/cryptography: ops/s for AES-256-GCM (single
calls into caller buffers, batches of 1,024) and RSA-2048 signatures, with the ratio
core/pyca taken in the same run. Run with `make bench-core` (python -m hsmsim.bench core).

Both sides are measured in alternating slices so that a noisy, shared machine loads them
alike. Read the ratios with the libraries in the title in mind: the core runs on the
system's libcrypto (OpenSSL 3.0 on Debian 12) while pyca's wheel bundles its own, newer
OpenSSL, whose GCM and RSA code paths are faster per call. The process is tuned with
hsmsim.core.malloc_keep() first (see there), which applies to both sides."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)

from hsmsim.core import AesGcmKey, RsaPrivateKey, malloc_keep

BATCH = 1024
SIZES = ((64, "64 B"), (1024, "1 KiB"), (16384, "16 KiB"))


def _rate_once(fn: Callable[[], Any], seconds: float, per_call: int) -> float:
    calls = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        fn()
        calls += 1
        now = time.perf_counter()
        if now >= deadline:
            return calls * per_call / (now - start)


def _row(
    op: str, size: str, core: Callable[[], Any], pyca: Callable[[], Any], seconds: float,
    per_call: int = 1,
) -> dict[str, Any]:
    """Measures core and pyca in alternating slices (the machine is shared and noisy, so both
    see the same load), and keeps each side's best slice."""
    core()
    pyca()
    rounds = 4
    core_rates: list[float] = []
    pyca_rates: list[float] = []
    for _ in range(rounds):
        core_rates.append(_rate_once(core, seconds / (2 * rounds), per_call))
        pyca_rates.append(_rate_once(pyca, seconds / (2 * rounds), per_call))
    c, p = max(core_rates), max(pyca_rates)
    return {
        "operation": op,
        "size": size,
        "core ops/s": c,
        "pyca ops/s": p,
        "core/pyca": c / p if p else None,
    }


def _aes_rows(seconds: float) -> list[dict[str, Any]]:
    key = os.urandom(32)
    threads = 2
    core, core1, pyca = AesGcmKey(key, batch_threads=threads), AesGcmKey(key), AESGCM(key)
    iv = os.urandom(12)
    rows = []
    for size, label in SIZES:
        data = os.urandom(size)
        out = bytearray(size + 16)
        rows.append(_row("AES-256-GCM encrypt, single call (caller buffer)", label,
                         lambda: core1.encrypt_into(iv, data, out),
                         lambda: pyca.encrypt(iv, data, None), seconds))

        ivs = [os.urandom(12) for _ in range(BATCH)]
        datas = [os.urandom(size) for _ in range(BATCH)]
        cts = core1.encrypt_batch(ivs, datas)
        enc, dec = pyca.encrypt, pyca.decrypt

        def pyca_batch() -> None:
            for i, d in zip(ivs, datas):
                enc(i, d, None)

        def pyca_dec_batch() -> None:
            for i, d in zip(ivs, cts):
                dec(i, d, None)

        rows.append(_row(f"AES-256-GCM encrypt, batch of {BATCH:,} (1 thread in C)",
                         label, lambda: core1.encrypt_batch(ivs, datas), pyca_batch, seconds,
                         BATCH))
        rows.append(_row(f"AES-256-GCM encrypt, batch of {BATCH:,} ({threads} threads in C)",
                         label, lambda: core.encrypt_batch(ivs, datas), pyca_batch, seconds,
                         BATCH))
        rows.append(_row(f"AES-256-GCM decrypt, batch of {BATCH:,} (1 thread in C)",
                         label, lambda: core1.decrypt_batch(ivs, cts), pyca_dec_batch, seconds,
                         BATCH))
    core.close()
    core1.close()
    return rows


def _rsa_rows(seconds: float) -> list[dict[str, Any]]:
    pk = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = pk.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption())
    core = RsaPrivateKey.from_der(der)
    core2 = RsaPrivateKey.from_der(der, batch_threads=2)
    digest = os.urandom(32)
    pre = Prehashed(hashes.SHA256())
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    v15 = padding.PKCS1v15()
    digests = [os.urandom(32) for _ in range(16)]
    return [
        _row("RSA-2048 sign PKCS#1 v1.5 (SHA-256 digest)", "",
             lambda: core.sign_pkcs1v15(digest, "sha256"),
             lambda: pk.sign(digest, v15, pre), seconds),
        _row("RSA-2048 sign PSS (SHA-256, salt 32)", "",
             lambda: core.sign_pss(digest, "sha256", "sha256", 32),
             lambda: pk.sign(digest, pss, pre), seconds),
        _row("RSA-2048 sign PKCS#1 v1.5, batch of 16 (1 thread in C)", "",
             lambda: core.sign_batch_pkcs1v15(digests, "sha256"),
             lambda: [pk.sign(d, v15, pre) for d in digests], seconds, 16),
        _row("RSA-2048 sign PKCS#1 v1.5, batch of 16 (2 threads in C)", "",
             lambda: core2.sign_batch_pkcs1v15(digests, "sha256"),
             lambda: [pk.sign(d, v15, pre) for d in digests], seconds, 16),
    ]


def run(seconds: float = 1.0) -> list[dict[str, Any]]:
    """One row per operation: ops/s for the core and for pyca/cryptography, and their ratio.
    `seconds` is the time spent on each row (half on each side). Applies malloc_keep() to
    this process first, as a node that runs batches does (it serves both sides alike)."""
    malloc_keep()
    return _aes_rows(seconds) + _rsa_rows(seconds)


def render(rows: list[dict[str, Any]]) -> str:
    try:
        from hsmsim.bench.report import render as report_render
    except ImportError:  # pragma: no cover - report.py is the lead's; a fallback table
        cols = list(rows[0])
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(f"{r[c]:,.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |" for r in rows]
        return "### crypto core vs pyca/cryptography\n\n" + "\n".join(lines) + "\n"
    from cryptography.hazmat.backends.openssl.backend import backend

    from hsmsim.core._ffi import libcrypto_version

    title = (
        f"crypto core ({libcrypto_version()}) vs pyca/cryptography "
        f"({backend.openssl_version_text()}), ops/s, one calling thread"
    )
    return report_render(title, rows)


def main() -> str:
    """Prints and returns the markdown table."""
    table = render(run())
    print(table)
    return table


if __name__ == "__main__":
    main()
