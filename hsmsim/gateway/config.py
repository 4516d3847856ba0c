"""The gateway's configuration section ("gateway"): slot/token identity, limits, and one switch per
reproduced CloudHSM quirk (each on by default, as CloudHSM behaves today)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GatewayConfig:
    slot_id: int = 1
    # Remote applications: "host:port" to also serve the protocol over TCP with TLS (the module
    # is pointed at it with HSMSIM_SOCKET=tls:host:port and a CA file). Empty = Unix socket only.
    tls_listen: str = ""
    tls_cert: str = ""  # PEM server certificate (chain) for tls_listen
    tls_key: str = ""  # its PEM private key
    token_label: str = "hsm1"
    # UG:limits: 1,024 PKCS#11 sessions per application.
    max_sessions: int = 1024
    # Largest frame either side accepts (requests carrying data are bounded by it).
    max_frame: int = 64 * 1024 * 1024
    # UG:configure-sdk-5 --enable-validate-key-at-init (default on): *Init checks the key with a
    # round trip to the HSM.
    validate_key_at_init: bool = True
    # FIDELITY: CloudHSM checks the key on every *Init; we remember a successful check per login
    # and key for this many seconds (0 = check every time), which halves round trips for
    # Init+op loops. Destroying the key or logging out forgets it.
    validate_key_cache_seconds: float = 1.0
    # UG:ki-pkcs11-sdk item 11: C_OpenSession without CKF_RW_SESSION -> CKR_FUNCTION_FAILED.
    quirk_ro_session_fails: bool = True
    # UG:ki-pkcs11-sdk item 10: wrong call sequences (Init/Update then C_Encrypt, a second
    # C_FindObjectsInit) return success with wrong results instead of CKR_OPERATION_ACTIVE.
    quirk_wrong_sequence_ok: bool = True
    # UG:ki-pkcs11-sdk item 6: CKA_MODULUS_BITS/CKA_PUBLIC_EXPONENT in the RSA private template make
    # a private key whose usage attributes are all false (instead of CKR_TEMPLATE_INCONSISTENT).
    quirk_private_template_usage_false: bool = True
    # UG:pkcs11-apis: C_SetAttributeValue (keys), C_CopyObject and C_GetObjectSize are not in the
    # SDK 5 API list -> CKR_FUNCTION_NOT_SUPPORTED.
    quirk_unsupported_api: bool = True
    # UG:pkcs11-mechanisms footnote 2: in-HSM data limits (HMAC, AES-CBC, AES-GCM, DES3-CBC).
    quirk_data_limits: bool = True
    # UG:pkcs11-mechanisms footnote 1: the HSM generates AES-GCM IVs; the application passes a
    # zeroed 12-byte buffer and a non-zero IV is rejected.
    quirk_gcm_hsm_iv: bool = True
    # UG:pkcs11-mechanisms footnote 5: FIPS-mode clusters (after 2023) refuse 3DES and
    # CKM_RSA_PKCS encrypt/wrap. Off by default (a non-FIPS cluster).
    fips_mode: bool = False
    # FIDELITY: CloudHSM (SDK 3, libp11 issue #242) reported token flags 0x404 without
    # CKF_USER_PIN_INITIALIZED, which makes libp11/OpenSSL refuse to log in. We set the flag by
    # default so pkcs11-tool and the OpenSSL engine work; false reproduces the 0x404 flags.
    user_pin_initialized_flag: bool = True
    # One daemon.log line per PKCS#11 call (function, session, mechanism, lengths, return value
    # and reason; never data or PINs), for debugging client code: HSMSIM_GATEWAY_TRACE_CALLS=1.
    trace_calls: bool = False
