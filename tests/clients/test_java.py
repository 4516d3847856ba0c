"""Java 17's SunPKCS11 provider, configured by `hsmsim env`'s HSMSIM_SUNPKCS11_CONFIG: EC, RSA
and RSA-PSS signatures verified by the JDK's default provider (and here by pyca), AES-CBC, and what AES/GCM
does, since SunPKCS11 cannot take CloudHSM's HSM-generated IV back."""

from __future__ import annotations

import subprocess
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from hsmsim.testing.cluster import HsmsimCluster

from .conftest import (HERE, assert_recipe_in_source, b64, build_lock, cache_dir, client_env,
                       require, run_build, run_client)

SOURCE = HERE / "java" / "HsmsimJava.java"


def build_java(javac: str) -> Path:
    version = subprocess.run([javac, "-version"], capture_output=True, text=True).stdout
    d = cache_dir("java", [SOURCE], javac, version)
    with build_lock(d):
        if not (d / ".built").exists():
            run_build([javac, "-d", str(d), str(SOURCE)], cwd=d)
            (d / ".built").touch()
    return d


def test_sunpkcs11(client_cluster: HsmsimCluster) -> None:
    tools = require("javac", "java")
    classes = build_java(tools["javac"])
    env = client_env(client_cluster)
    cfg = Path(env["HSMSIM_SUNPKCS11_CONFIG"])
    assert f"library = {client_cluster.module_path}" in cfg.read_text()
    assert f"export HSMSIM_SUNPKCS11_CONFIG={cfg}\n" in client_cluster.cli("env").stdout
    out = run_client([tools["java"], "-cp", str(classes), "HsmsimJava"], env)
    msg = b64(out, "message")

    # Signatures made in the HSM, verified by the JDK's default provider and by pyca.
    assert out["ec_verified"] == "true" and out["ec_provider"] == "SunEC"
    pub = serialization.load_der_public_key(b64(out, "ec_public"))
    assert isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.name == "secp256r1"
    pub.verify(b64(out, "ec_signature"), msg, ec.ECDSA(hashes.SHA256()))
    assert out["rsa_verified"] == "true"
    rsa_pub = serialization.load_der_public_key(b64(out, "rsa_public"))
    assert isinstance(rsa_pub, rsa.RSAPublicKey) and rsa_pub.key_size == 2048
    rsa_pub.verify(b64(out, "rsa_signature"), msg, padding.PKCS1v15(), hashes.SHA256())
    assert out["pss_verified"] == "true"
    rsa_pub.verify(b64(out, "pss_signature"), msg,
                   padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())

    # AES-256-CBC-PAD in the HSM: a 16-byte message pads to two blocks and decrypts back.
    assert len(msg) == 16 and len(b64(out, "cbc_ciphertext")) == 32 and len(b64(out, "cbc_iv")) == 16
    assert out["cbc_roundtrip"] == "true"

    # AES/GCM: SunPKCS11's own random IV is refused at C_EncryptInit (CKR_MECHANISM_PARAM_INVALID);
    # with CloudHSM's zeroed IV the HSM encrypts under an IV of its own that SunPKCS11 never
    # reads back: getIV() stays zero and decryption with it fails the tag check.
    assert out["gcm_random_iv"] == "InvalidKeyException"
    assert len(b64(out, "gcm_zero_iv_ciphertext")) == 16 + 16
    assert b64(out, "gcm_zero_iv_getiv") == bytes(12)
    assert out["gcm_decrypt_with_getiv"] == "AEADBadTagException"


def test_readme_recipe_is_what_runs() -> None:
    assert_recipe_in_source("Java (SunPKCS11)", SOURCE)
