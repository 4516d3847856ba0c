"""Go's crypto11 (Debian's golang-github-thalesignite-crypto11-dev, built in GOPATH mode: no
module proxy): EC and RSA (PKCS#1 v1.5 and PSS) signatures verified by crypto/ecdsa and
crypto/rsa (and here by pyca), a key found by label, AES-CBC, and AES-GCM: crypto11's Seal
loses the HSM's IV, the vendor mechanism CKM_CLOUDHSM_AES_GCM carries it in its output."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from hsmsim.testing.cluster import HsmsimCluster

from .conftest import (HERE, assert_recipe_in_source, b64, build_lock, cache_dir, client_env,
                       require, run_build, run_client)

SOURCE = HERE / "go" / "main.go"
GOCODE = Path("/usr/share/gocode")
CRYPTO11 = GOCODE / "src" / "github.com" / "ThalesIgnite" / "crypto11"


def build_go(go: str) -> Path:
    if not CRYPTO11.is_dir():
        pytest.skip(f"{CRYPTO11} missing: Debian's golang-github-thalesignite-crypto11-dev "
                    "(`make deps` installs it)")
    version = subprocess.run([go, "version"], capture_output=True, text=True).stdout
    d = cache_dir("go", [SOURCE, *sorted(CRYPTO11.glob("*.go"))], version)
    binary = d / "hsmsim-go"
    with build_lock(d):
        if not (d / ".built").exists():
            # GOPATH mode against Debian's Go sources: nothing is fetched.
            env = {**os.environ, "GO111MODULE": "off", "GOFLAGS": "", "GOPROXY": "off",
                   "GOPATH": f"{GOCODE}:{d / 'gopath'}", "GOCACHE": str(d.parent / "gocache")}
            run_build([go, "build", "-o", str(binary), "."], cwd=SOURCE.parent, env=env)
            (d / ".built").touch()
    return binary


def test_crypto11(client_cluster: HsmsimCluster) -> None:
    binary = build_go(require("go")["go"])
    out = run_client([str(binary)], client_env(client_cluster))
    msg = b64(out, "message")

    # Signatures made in the HSM, verified by crypto/ecdsa and crypto/rsa, and by pyca.
    assert out["ec_verified"] == "true"
    pub = serialization.load_der_public_key(b64(out, "ec_public"))
    assert isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.name == "secp256r1"
    pub.verify(b64(out, "ec_signature"), msg, ec.ECDSA(hashes.SHA256()))
    assert out["rsa_verified"] == "true" and out["pss_verified"] == "true"
    rsa_pub = serialization.load_der_public_key(b64(out, "rsa_public"))
    assert isinstance(rsa_pub, rsa.RSAPublicKey) and rsa_pub.key_size == 2048
    rsa_pub.verify(b64(out, "rsa_signature"), msg, padding.PKCS1v15(), hashes.SHA256())
    assert out["found_by_label"] == "true"

    # AES-256-CBC with PKCS#7 padding: 14 bytes pad to one block and decrypt back.
    assert len(msg) == 14 and len(b64(out, "cbc_ciphertext")) == 16
    assert out["cbc_roundtrip"] == "true"

    # crypto11's Seal: the HSM encrypted under its own IV, the nonce slice is still zero, and
    # Open with it fails.
    assert b64(out, "gcm_seal_nonce_after") == bytes(12)
    assert out["gcm_open_with_nonce"] == "false"
    # CKM_CLOUDHSM_AES_GCM: IV (12) || ciphertext || tag (16), and it opens again.
    sealed = b64(out, "vendor_gcm_sealed")
    assert len(sealed) == 12 + len(msg) + 16 and sealed[:12] != bytes(12)
    assert out["vendor_gcm_roundtrip"] == "true"


def test_readme_recipe_is_what_runs() -> None:
    assert_recipe_in_source("Go (crypto11)", SOURCE)
