"""Node.js with pkcs11js from npm (its native addon built by node-gyp at install): EC and RSA
signatures verified by Node's crypto module (and here by pyca), AES-GCM with the IV the HSM
writes into the application's zeroed Buffer, and AES-CBC-PAD."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from hsmsim.testing.cluster import HsmsimCluster

from .conftest import (HERE, assert_recipe_in_source, b64, build_lock, cache_dir, client_env,
                       require, run_build, run_client)

NODE = HERE / "node"
SOURCE = NODE / "hsmsim-pkcs11js.js"


def install_pkcs11js(node: str, npm: str) -> Path:
    """node_modules with pkcs11js as package-lock.json pins it, its addon compiled."""
    version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout
    lock = [NODE / "package.json", NODE / "package-lock.json"]
    d = cache_dir("node", lock, version)
    addon = d / "node_modules" / "pkcs11js" / "build" / "Release" / "pkcs11.node"
    with build_lock(d):
        if not (d / ".built").exists():
            for f in lock:
                shutil.copy(f, d / f.name)
            # npm 11 warns about install scripts not approved; pkcs11js's is its node-gyp build,
            # so run scripts explicitly, and rebuild if the install skipped it anyway.
            env = {**os.environ, "npm_config_ignore_scripts": "false", "npm_config_audit": "false",
                   "npm_config_fund": "false", "npm_config_update_notifier": "false"}
            run_build([npm, "ci", "--foreground-scripts"], cwd=d, env=env)
            if not addon.exists():
                run_build([npm, "rebuild", "pkcs11js", "--foreground-scripts"], cwd=d, env=env)
            assert addon.exists(), "npm did not build pkcs11js's addon"
            (d / ".built").touch()
    return d / "node_modules"


def test_pkcs11js(client_cluster: HsmsimCluster) -> None:
    tools = require("node", "npm", "make", "g++")
    modules = install_pkcs11js(tools["node"], tools["npm"])
    out = run_client([tools["node"], str(SOURCE)],
                     client_env(client_cluster, NODE_PATH=str(modules)))
    msg = b64(out, "message")

    # Signatures made in the HSM, verified by Node's crypto and by pyca. PKCS#11's ECDSA
    # signature is r || s.
    assert out["ec_verified"] == "true" and out["rsa_verified"] == "true"
    pub = serialization.load_der_public_key(b64(out, "ec_public"))
    assert isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.name == "secp256r1"
    sig = b64(out, "ec_signature")
    assert len(sig) == 64
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    pub.verify(der, msg, ec.ECDSA(hashes.SHA256()))
    rsa_pub = serialization.load_der_public_key(b64(out, "rsa_public"))
    assert isinstance(rsa_pub, rsa.RSAPublicKey) and rsa_pub.key_size == 2048
    rsa_pub.verify(b64(out, "rsa_signature"), msg, padding.PKCS1v15(), hashes.SHA256())

    # AES-GCM: the zeroed Buffer holds the HSM's IV after C_EncryptInit, and decrypts with it.
    iv = b64(out, "gcm_iv")
    assert len(iv) == 12 and iv != bytes(12)
    assert len(b64(out, "gcm_ciphertext")) == len(msg) + 16
    assert out["gcm_roundtrip"] == "true"
    assert len(b64(out, "cbc_ciphertext")) == 32 and out["cbc_roundtrip"] == "true"


def test_readme_recipe_is_what_runs() -> None:
    assert_recipe_in_source("Node.js (pkcs11js)", SOURCE)
