"""Shared helpers for the PKCS#11 tests: real test clusters, python-pkcs11 pointed at a gateway
socket, child processes, and private module copies for ctypes."""

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


class ClusterGateway:
    """A real cluster (node processes with SoftHSM2 tokens and the daemon) for the module and
    gateway tests, with fixed passwords (REF_PIN, SO_PIN) and `settings` in its [gateway]
    section. `sock` becomes a link to the daemon's gateway socket. Starting it again on the same
    `sock` reopens the same cluster, as `hsmsim up` does after `hsmsim down`."""

    def __init__(self, sock: Path, settings: dict[str, str]) -> None:
        from hsmsim.testing.cluster import free_port, run_cli
        self.sock = sock
        self.state = sock.parent / f"{sock.stem}-cluster"
        if (self.state / "cluster.json").exists():
            r = run_cli(["up", "--detach", "--state", str(self.state)], timeout=120)
        else:
            self.state.mkdir(parents=True, exist_ok=True)
            gateway = "".join(f'{k} = "{v}"\n' for k, v in settings.items())
            (self.state / "hsmsim.toml").write_text(
                f"[kms]\nport = {free_port()}\n[gateway]\n{gateway}")
            r = run_cli(["up", "--detach", "--state", str(self.state), "--azs", "2",
                         "--admin-password", SO_PIN.split(":", 1)[1],
                         "--cu-password", REF_PIN.split(":", 1)[1]], timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"the test cluster did not start: {r.stderr}")
        if not sock.is_symlink():
            sock.symlink_to(self.state / "gateway.sock")

    def alive(self) -> bool:
        try:
            os.kill(int((self.state / "daemon.pid").read_text()), 0)
        except (OSError, ValueError):
            return False
        return True

    def stop(self) -> None:
        from hsmsim.testing.cluster import run_cli
        run_cli(["down", "--state", str(self.state)], timeout=60)


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
