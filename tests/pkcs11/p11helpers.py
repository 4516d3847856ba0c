"""Shared helpers for the PKCS#11 tests: the reference gateway process, python-pkcs11 pointed at a
gateway socket, child processes, and private module copies for ctypes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hsmsim.resources import pkcs11_module

REPO = Path(__file__).resolve().parents[2]
REF_PIN = "crypto_user:password1"
SO_PIN = "admin:password1"

try:
    # HSMSIM_TEST_MODULE: run the suite against another build (e.g. one with sanitizers)
    MODULE = Path(os.environ["HSMSIM_TEST_MODULE"]) if os.environ.get("HSMSIM_TEST_MODULE") else pkcs11_module()
except FileNotFoundError:  # pragma: no cover - reported by every test below
    MODULE = None


def require_module() -> Path:
    if MODULE is None:
        pytest.skip("libhsmsim-pkcs11.so is not built (make build)")
    return MODULE


class RefGateway:
    """A gateway process serving the reference cluster on a Unix socket."""

    def __init__(self, sock: Path, settings: dict[str, str]) -> None:
        self.sock = sock
        env = dict(os.environ, PYTHONPATH=str(REPO))
        args = [sys.executable, "-m", "tests.pkcs11.p11ref", str(sock),
                *(f"{k}={v}" for k, v in settings.items())]
        self.proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.proc.kill()
            raise RuntimeError(f"reference gateway did not start: {self.proc.stderr.read()}")  # type: ignore[union-attr]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()




_current: dict[str, object] = {}


def use_gateway(sock: Path):  # type: ignore[no-untyped-def]
    """python-pkcs11's lib for the module (one per process), (re)initialised against `sock`
    whenever it, or the environment another test left behind, points elsewhere."""
    import pkcs11
    stale = os.environ.get("HSMSIM_SOCKET") != str(sock) or _current.get("sock") != str(sock)
    os.environ["HSMSIM_SOCKET"] = str(sock)
    lib = pkcs11.lib(str(require_module()))
    if stale or not lib.initialized:
        if lib.initialized:
            lib.finalize()
        lib.initialize()
        _current["sock"] = str(sock)
    return lib


def run_child(code: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Runs a Python snippet in a fresh process (its own module state)."""
    full = dict(os.environ, PYTHONPATH=str(REPO), **env)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=full, capture_output=True,
                          text=True, timeout=timeout)


def copy_module(tmp_path: Path) -> Path:
    """A private copy of the module: ctypes loads it as a separate library with its own state."""
    dst = tmp_path / "libhsmsim-pkcs11-copy.so"
    shutil.copy(require_module(), dst)
    return dst


def wait_for(pred, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


def crypto_public(pub):  # type: ignore[no-untyped-def]
    """A python-pkcs11 public key as a pyca/cryptography public key (RSA or EC)."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from pkcs11 import Attribute, KeyType
    if pub.key_type == KeyType.RSA:
        n = int.from_bytes(pub[Attribute.MODULUS], "big")
        e = int.from_bytes(pub[Attribute.PUBLIC_EXPONENT], "big")
        return rsa.RSAPublicNumbers(e, n).public_key()
    from pkcs11.util.ec import decode_ec_public_key, encode_ec_public_key
    from cryptography.hazmat.primitives.serialization import load_der_public_key
    del decode_ec_public_key
    assert isinstance(ec.SECP256R1(), ec.EllipticCurve)
    return load_der_public_key(encode_ec_public_key(pub))
