"""No password, PIN or key material reaches a log, an audit record, the object index, the
journal, the KMS store or a backup: after logins (good and bad), token keys with known
values, a masked sync to every HSM and a backup, none of those bytes appear in any file of the
state directory outside secrets/ (the 0600 password files) and the SoftHSM2 token directories
(encrypted by SoftHSM2)."""

from __future__ import annotations

from pathlib import Path

import pkcs11
import pytest
from pkcs11 import Attribute, KeyType, ObjectClass

WRONG = "Wr0ng-Passw0rd-xyz"
AES_VALUE = bytes.fromhex("8d2e60365f17c7df1040d7501b4a7b5a8d2e60365f17c7df1040d7501b4a7b5a")
HMAC_VALUE = b"hsmsim-test-hmac-key-material-0123456789"


def files_outside_secrets(state: Path) -> list[Path]:
    return [p for p in state.rglob("*") if p.is_file() and not p.is_socket()
            and "secrets" not in p.relative_to(state).parts and "tokens" not in p.parts]


def test_secrets_stay_out_of_every_file(hsmsim_cluster) -> None:  # type: ignore[no-untyped-def]
    lib = hsmsim_cluster.pkcs11_lib()
    token = lib.get_token(token_label="hsm1")
    with pytest.raises(pkcs11.PinIncorrect):
        token.open(user_pin=f"crypto_user:{WRONG}", rw=True)
    with token.open(user_pin=hsmsim_cluster.pin, rw=True) as session:
        session.create_object({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
                               Attribute.VALUE: AES_VALUE, Attribute.TOKEN: True,
                               Attribute.ENCRYPT: True, Attribute.LABEL: "secret-aes"})
        session.create_object({Attribute.CLASS: ObjectClass.SECRET_KEY,
                               Attribute.KEY_TYPE: KeyType.GENERIC_SECRET, Attribute.VALUE: HMAC_VALUE,
                               Attribute.TOKEN: True, Attribute.SIGN: True, Attribute.LABEL: "secret-hmac"})
    hsmsim_cluster.wait_converged(30)
    assert hsmsim_cluster.cli("backup", "create").returncode == 0

    state = Path(hsmsim_cluster.state_dir)
    passwords = [p.read_text().strip() for p in (state / "secrets").glob("*.password")]
    assert passwords and all(passwords)
    needles = {
        **{f"password {i}": pw.encode() for i, pw in enumerate(passwords)},
        "wrong password": WRONG.encode(),
        "AES key": AES_VALUE, "AES key (hex)": AES_VALUE.hex().encode(),
        "HMAC key": HMAC_VALUE, "HMAC key (hex)": HMAC_VALUE.hex().encode(),
    }
    files = files_outside_secrets(state)
    assert any(f.name == "audit.jsonl" for f in files) and any(f.name == "daemon.log" for f in files)
    leaks = [f"{what} in {f.relative_to(state)}" for f in files
             for what, needle in needles.items() if needle in f.read_bytes()]
    assert not leaks, leaks
