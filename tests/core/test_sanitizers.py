"""The C core under AddressSanitizer, UBSan and LeakSanitizer: a C harness
(tests/core/native/asan_harness.c) that calls every entry point, error paths included, is
compiled together with native/core/*.c and must run clean."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "native"))
import build_native  # noqa: E402


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on PATH")
def test_core_is_clean_under_sanitizers(tmp_path: Path) -> None:
    exe = tmp_path / "harness"
    cmd = [
        "cc", "-g", "-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
        "-fno-omit-frame-pointer", f"-I{build_native.CORE_DIR}",
        f'-DHSMSIM_VERSION="{build_native.package_version()}"',
        str(ROOT / "tests" / "core" / "native" / "asan_harness.c"),
        *(str(ROOT / s) for s in build_native.core_sources()),
        "-lcrypto", "-lpthread", "-o", str(exe),
    ]
    built = subprocess.run(cmd, capture_output=True, text=True)
    if built.returncode and "asan" in built.stderr.lower():
        pytest.skip(f"sanitizer runtime not available: {built.stderr[-300:]}")
    assert built.returncode == 0, built.stderr
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = tmp_path / "k.der"
    der.write_bytes(key.private_bytes(serialization.Encoding.DER,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0",
               UBSAN_OPTIONS="print_stacktrace=1")
    env.pop("LD_PRELOAD", None)
    run = subprocess.run([str(exe), str(der)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert run.returncode == 0 and "all ok" in run.stdout, run.stdout + run.stderr[-3000:]
