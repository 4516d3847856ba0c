"""PyKCS11 from PyPI: its default read-only session refused as CloudHSM refuses it, an RSA key
pair with explicit usage attributes, a SHA256-RSA-PKCS signature verified by pyca, a find by
label, and AES-GCM with the HSM's IV, which PyKCS11 shows only in the mechanism's private
`_source_iv` buffer (the module writes it into pIv at C_EncryptInit)."""

from __future__ import annotations

import sys

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from hsmsim.testing.cluster import HsmsimCluster

from .conftest import HERE, assert_recipe_in_source, b64, client_env, run_client

SCRIPT = HERE / "pykcs11" / "hsmsim_pykcs11.py"


def test_pykcs11(client_cluster: HsmsimCluster) -> None:
    pytest.importorskip("PyKCS11", reason="PyKCS11 is in the test extras (`make venv`)")
    out = run_client([sys.executable, str(SCRIPT)], client_env(client_cluster))
    msg = b64(out, "message")

    assert out["token"] == "hsm1"
    assert out["ro_session"] == "CKR_FUNCTION_FAILED"

    pub = rsa.RSAPublicNumbers(int.from_bytes(b64(out, "rsa_exponent"), "big"),
                               int.from_bytes(b64(out, "rsa_modulus"), "big")).public_key()
    assert pub.key_size == 2048
    pub.verify(b64(out, "rsa_signature"), msg, padding.PKCS1v15(), hashes.SHA256())
    assert out["found_by_label"] == "True"

    # GCM: the HSM's IV (not the zeroed one given) reached PyKCS11's buffer, and the HSM
    # decrypted with it.
    iv = b64(out, "gcm_iv")
    assert len(iv) == 12 and iv != bytes(12)
    assert len(b64(out, "gcm_ciphertext")) == len(msg) + 16
    assert out["gcm_roundtrip"] == "True"


def test_readme_recipe_is_what_runs() -> None:
    assert_recipe_in_source("Python (PyKCS11)", SCRIPT)
