"""Who sees what, through the module on a real cluster: a crypto user sees its own keys and every
public key, not another user's private or secret keys; throttled HSMs surface only as CloudHSM's
documented CKR_FUNCTION_FAILED."""

from __future__ import annotations

import threading
from ctypes import byref, c_ulong
from pathlib import Path

import pkcs11
import pytest
from pkcs11 import KeyType, Mechanism

from hsmsim.pkcs11.constants import RV, Attribute as A
from p11helpers import copy_module, use_gateway
from p11raw import Raw, open_session, template

U = c_ulong


@pytest.fixture(scope="module")
def cluster(hsmsim_session_cluster):  # type: ignore[no-untyped-def]
    return hsmsim_session_cluster


def find(raw: Raw, h: int, label: str) -> list[int]:
    t, _keep = template((A.LABEL, label),)
    assert raw.C_FindObjectsInit(U(h), t, U(1)) == RV.OK
    out = (c_ulong * 16)()
    n = U()
    assert raw.C_FindObjects(U(h), out, U(16), byref(n)) == RV.OK
    assert raw.C_FindObjectsFinal(U(h)) == RV.OK
    return list(out[:n.value])


def test_a_crypto_user_sees_own_and_public_keys(cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    r = cluster.cli("user", "create", "--username", "p11other", "--role", "crypto-user", "--password", "otherpass1")
    assert r.returncode == 0 or "exist" in (r.stdout + r.stderr).lower(), r.stderr
    lib = use_gateway(cluster.socket_path)
    with lib.get_token(token_label="hsm1").open(rw=True, user_pin=cluster.pin) as s:
        pub, priv = s.generate_keypair(KeyType.RSA, 2048, store=True, label="p11-vis-rsa")
        s.generate_key(KeyType.AES, 256, store=True, label="p11-vis-aes")
        cluster.wait_converged(30)
        monkeypatch.setenv("HSMSIM_SOCKET", str(cluster.socket_path))
        other = Raw(copy_module(tmp_path))  # a second application in this process
        assert other.C_Initialize(None) == RV.OK
        try:
            h = open_session(other, "p11other:otherpass1")
            assert find(other, h, "p11-vis-aes") == []
            assert find(other, h, "p11-vis-rsa") == [pub.handle]  # only the public half
        finally:
            other.C_Finalize(None)
        assert priv.sign(b"still mine", mechanism=Mechanism.SHA256_RSA_PKCS)


def test_throttled_hsms_give_function_failed(cluster) -> None:  # type: ignore[no-untyped-def]
    lib = use_gateway(cluster.socket_path)
    with lib.get_token(token_label="hsm1").open(rw=True, user_pin=cluster.pin) as s:
        key = s.generate_key(KeyType.AES, 256, store=False)
        errors: list[str] = []
        ok = [0]

        def worker() -> None:
            with lib.get_token(token_label="hsm1").open(rw=True) as ws:
                for _ in range(6):
                    try:
                        ws.generate_random(64)
                        key.encrypt(b"x" * 16, mechanism=Mechanism.AES_ECB)
                        ok[0] += 1
                    except pkcs11.exceptions.PKCS11Error as exc:
                        errors.append(type(exc).__name__)

        for hsm in cluster.hsm_ids:
            cluster.throttle(hsm, 5)
        try:
            ts = [threading.Thread(target=worker) for _ in range(2)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(120)
        finally:
            for hsm in cluster.hsm_ids:
                cluster.throttle(hsm, 0)
        # UG:troubleshoot-hsm-throttling: in PKCS#11 busy errors map to CKR_FUNCTION_FAILED.
        assert set(errors) <= {"FunctionFailed"}, errors
        assert key.encrypt(b"y" * 16, mechanism=Mechanism.AES_ECB)  # fine again once unthrottled
        assert errors or ok[0] == 2 * 6
