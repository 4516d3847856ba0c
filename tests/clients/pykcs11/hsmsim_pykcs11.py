"""PyKCS11 (PyPI) against hsmsim, as README's "Python (PyKCS11)" recipe shows it; run by
tests/clients/test_pykcs11.py with the environment of `eval "$(hsmsim env)"`. Prints
`key=value` lines (binary values in base64) and ends with `done=true`."""

import base64
import os
import uuid

import PyKCS11
from PyKCS11 import (CKA_CLASS, CKA_DECRYPT, CKA_ENCRYPT, CKA_KEY_TYPE, CKA_LABEL, CKA_MODULUS,
                     CKA_MODULUS_BITS, CKA_PRIVATE, CKA_PUBLIC_EXPONENT, CKA_SENSITIVE, CKA_SIGN,
                     CKA_TOKEN, CKA_VALUE_LEN, CKA_VERIFY, CKK_AES, CKO_PRIVATE_KEY,
                     CKO_PUBLIC_KEY, CKO_SECRET_KEY)


def out(key: str, value: object) -> None:
    if isinstance(value, (bytes, bytearray)):
        value = base64.b64encode(value).decode()
    print(f"{key}={value}", flush=True)


tag = uuid.uuid4().hex[:8]
msg = b"signed and sealed by PyKCS11"
aad = b"header"

lib = PyKCS11.PyKCS11Lib()
lib.load(os.environ["HSMSIM_PKCS11_MODULE"])
slot = lib.getSlotList(tokenPresent=True)[0]                  # token "hsm1"
out("token", lib.getTokenInfo(slot).label.strip())

# PyKCS11's default session is read-only, which CloudHSM refuses (CKR_FUNCTION_FAILED).
try:
    lib.openSession(slot).closeSession()
    out("ro_session", "CKR_OK")
except PyKCS11.PyKCS11Error as e:
    out("ro_session", PyKCS11.CKR[e.value])

session = lib.openSession(slot, PyKCS11.CKF_SERIAL_SESSION | PyKCS11.CKF_RW_SESSION)
session.login(os.environ["HSMSIM_PIN"])                      # "crypto_user:password"

label = f"pykcs11-rsa-{tag}"
pub, priv = session.generateKeyPair(
    [(CKA_CLASS, CKO_PUBLIC_KEY), (CKA_TOKEN, True), (CKA_LABEL, label),
     (CKA_MODULUS_BITS, 2048), (CKA_PUBLIC_EXPONENT, (1, 0, 1)), (CKA_VERIFY, True)],
    [(CKA_CLASS, CKO_PRIVATE_KEY), (CKA_TOKEN, True), (CKA_PRIVATE, True), (CKA_LABEL, label),
     (CKA_SENSITIVE, True), (CKA_SIGN, True)],
    mecha=PyKCS11.MechanismRSAGENERATEKEYPAIR)
sig = bytes(session.sign(priv, msg, PyKCS11.Mechanism(PyKCS11.CKM_SHA256_RSA_PKCS)))
modulus, exponent = session.getAttributeValue(pub, [CKA_MODULUS, CKA_PUBLIC_EXPONENT])
out("message", msg)
out("rsa_signature", sig)
out("rsa_modulus", bytes(modulus))
out("rsa_exponent", bytes(exponent))
found = session.findObjects([(CKA_CLASS, CKO_PRIVATE_KEY), (CKA_LABEL, label)])
out("found_by_label", len(found) == 1 and found[0].value() == priv.value())

aes = session.generateKey(
    [(CKA_CLASS, CKO_SECRET_KEY), (CKA_KEY_TYPE, CKK_AES), (CKA_VALUE_LEN, 32), (CKA_TOKEN, True),
     (CKA_PRIVATE, True), (CKA_LABEL, f"pykcs11-aes-{tag}"), (CKA_ENCRYPT, True),
     (CKA_DECRYPT, True)],
    mecha=PyKCS11.MechanismAESGENERATEKEY)
gcm = PyKCS11.AES_GCM_Mechanism(bytes(12), aad, 128)         # CloudHSM: a zeroed 12-byte IV
ct = bytes(session.encrypt(aes, msg, gcm))                    # ciphertext || tag
iv = bytes(gcm._source_iv)                                    # the HSM's IV (PyKCS11#150)
pt = bytes(session.decrypt(aes, ct, PyKCS11.AES_GCM_Mechanism(iv, aad, 128)))
out("gcm_ciphertext", ct)
out("gcm_iv", iv)
out("gcm_roundtrip", pt == msg)

session.logout()
session.closeSession()
out("done", "true")
