"""Refused calls are logged with their reason, and the call trace (HSMSIM_GATEWAY_TRACE_CALLS=1)
writes one daemon.log line per PKCS#11 call: function, session, mechanism, lengths, return value
and reason, never data or PINs."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from hsmsim.testing.cluster import HsmsimCluster, start_cluster

pkcs11 = pytest.importorskip("pkcs11", reason="python-pkcs11 is not installed")


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HsmsimCluster]:
    env = {**os.environ, "HSMSIM_GATEWAY_TRACE_CALLS": "1"}
    c = start_cluster(tmp_path_factory.mktemp("trace") / "state", azs=2, env=env)
    try:
        yield c
    finally:
        c.down()


def _log(c: HsmsimCluster) -> str:
    return Path(c.state_dir / "daemon.log").read_text()


def test_a_refused_login_is_logged_with_its_reason_and_no_secret(traced: HsmsimCluster,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HSMSIM_SOCKET", str(traced.socket_path))
    token = traced.pkcs11_lib().get_token(token_label="hsm1")
    with pytest.raises(pkcs11.exceptions.PinIncorrect):
        token.open(user_pin="crypto_user:Wr0ng-guess-7", rw=True)
    with pytest.raises(pkcs11.exceptions.PinIncorrect):
        token.open(user_pin="no-colon-here", rw=True)
    log = _log(traced)
    assert re.search(r"C_Login refused with PIN_INCORRECT: .*wrong username or password "
                     r"\(1 of 5 failed logins before lockout on this HSM\)", log), log[-3000:]
    assert "C_Login refused with PIN_INCORRECT: the PIN must be <user>:<password>" in log
    assert re.search(r"C_Login session=\d+ -> CKR_PIN_INCORRECT \(", log)
    assert "Wr0ng-guess-7" not in log and "no-colon-here" not in log


def test_every_call_is_traced_with_lengths_never_data(traced: HsmsimCluster,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HSMSIM_SOCKET", str(traced.socket_path))
    token = traced.pkcs11_lib().get_token(token_label="hsm1")
    secret = b"trace-me-not-0123456789abcdef!!"
    with token.open(user_pin=traced.pin, rw=True) as s:
        key = s.generate_key(pkcs11.KeyType.AES, 256, template={
            pkcs11.Attribute.ENCRYPT: True, pkcs11.Attribute.DECRYPT: True})
        iv = bytes(16)
        parts = [secret[:20], secret[20:]]
        ct = b"".join(key.encrypt(parts, mechanism=pkcs11.Mechanism.AES_CBC_PAD, mechanism_param=iv))
        # Single-part too: while tracing, no call takes the direct data path past the daemon.
        assert key.decrypt(ct, mechanism=pkcs11.Mechanism.AES_CBC_PAD, mechanism_param=iv) == secret
    log = _log(traced)
    assert re.search(r"C_GenerateKey session=\d+ CKM_AES_KEY_GEN -> CKR_OK", log), log[-3000:]
    assert re.search(r"C_EncryptInit session=\d+ CKM_AES_CBC_PAD -> CKR_OK", log)
    assert re.search(r"C_EncryptUpdate session=\d+ in=20 out=16 -> CKR_OK", log), log[-3000:]
    assert re.search(r"C_EncryptFinal session=\d+ out=16 -> CKR_OK", log)
    assert re.search(r"C_Decrypt session=\d+ in=32 out=\d+ -> CKR_OK", log), log[-3000:]
    assert secret.hex() not in log and secret.decode() not in log and ct.hex() not in log
    assert traced.pin.split(":", 1)[1] not in log
