"""p11-kit (Debian's p11-kit and p11-kit-modules): the `.module` file `hsmsim env` writes,
linked into ~/.config/pkcs11/modules, makes p11-kit-proxy.so offer the hsm1 token; through the
proxy pkcs11-tool makes an EC key and signs (verified by pyca) and AES-CBC-PAD encrypts and
decrypts. Without HSMSIM_SOCKET in its environment p11-kit leaves the module out. p11-kit reads
no user configuration for root, and the test never writes /etc: as root the script runs in a
user namespace (`unshare --user`, uid 65534 inside, the same files outside)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from hsmsim.testing.cluster import HsmsimCluster

from .conftest import HERE, assert_recipe_in_source, b64, client_env, require, run_client

SCRIPT = HERE / "p11kit" / "hsmsim-p11kit.sh"
PROXY = Path("/usr/lib/x86_64-linux-gnu/p11-kit-proxy.so")  # the recipe's (Debian amd64) path


def as_user(cmd: list[str]) -> list[str]:
    """cmd as a non-root user: p11-kit skips ~/.config for root."""
    if os.getuid() != 0:
        return cmd
    unshare = require("unshare")["unshare"]
    probe = subprocess.run([unshare, "--user", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("running as root without user namespaces: p11-kit would read only "
                    f"/etc/pkcs11/modules, which tests do not write ({probe.stderr.strip()})")
    return [unshare, "--user", *cmd]


def test_p11kit_proxy(client_cluster: HsmsimCluster, tmp_path: Path) -> None:
    require("p11-kit", "pkcs11-tool")
    if not PROXY.exists():
        pytest.skip(f"{PROXY} missing (Debian's p11-kit-modules; `make deps` installs it)")
    env = client_env(client_cluster, HOME=str(tmp_path), TMPDIR=str(tmp_path))
    module_file = Path(env["HSMSIM_P11KIT_MODULE_FILE"])
    assert module_file.read_text() == f"module: {client_cluster.module_path}\n"
    out = run_client(as_user(["bash", str(SCRIPT)]), env)

    # p11-kit found the module through the link in the scratch HOME, and its token.
    link = tmp_path / ".config" / "pkcs11" / "modules" / "hsmsim.module"
    assert link.is_symlink() and link.resolve() == module_file.resolve()
    modules = b64(out, "modules").decode()
    assert f"hsmsim: {client_cluster.module_path}\n" in modules
    hsmsim_part = modules.split("hsmsim: ", 1)[1]
    assert "    token: hsm1\n" in hsmsim_part and "model: CloudHSM" in hsmsim_part
    # Without HSMSIM_SOCKET p11-kit drops the module (its C_Initialize fails); the module says
    # why on stderr, once, and p11-kit lists no hsmsim module.
    no_socket = b64(out, "modules_no_socket").decode()
    assert f"hsmsim: {client_cluster.module_path}" not in no_socket
    assert "libhsmsim-pkcs11: cannot reach the hsmsim daemon at" in no_socket

    # The EC signature (r || s) made through the proxy, verified by pyca.
    pub = serialization.load_der_public_key(b64(out, "ec_public_der"))
    assert isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.name == "secp256r1"
    sig = b64(out, "ec_signature")
    assert len(sig) == 64
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    pub.verify(der, b64(out, "message"), ec.ECDSA(hashes.SHA256()))

    # AES-256-CBC-PAD: 25 bytes pad to two blocks and decrypt back through the proxy.
    msg = b64(out, "message")
    assert len(b64(out, "cbc_ciphertext")) == (len(msg) // 16 + 1) * 16
    assert b64(out, "cbc_decrypted") == msg


def test_readme_recipe_is_what_runs() -> None:
    assert_recipe_in_source("p11-kit", SCRIPT)
