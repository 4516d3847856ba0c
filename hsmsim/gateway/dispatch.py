"""The gateway's one opcode -> handler table. Every opcode of the protocol (hsmsim.gateway.protocol
Op, checked against the C header) has an entry: a handler of its operation family, or
`not_supported`. A handler answers at once (a reply) or returns an awaitable when it needs the
cluster; the server sends the first and runs the second as the connection's one task."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from hsmsim.gateway import ops_crypto as crypto
from hsmsim.gateway import ops_keys as keys
from hsmsim.gateway import ops_objects as objects
from hsmsim.gateway import ops_session as session
from hsmsim.gateway import ops_token as token
from hsmsim.gateway.protocol import Op, Reader
from hsmsim.gateway.reply import Reply
from hsmsim.gateway.service import Gateway
from hsmsim.gateway.state import Application
from hsmsim.pkcs11.constants import RV

Handler = Callable[[Gateway, Application, Reader], "Reply | Awaitable[Reply]"]
_NOT_SUPPORTED: Reply = (int(RV.FUNCTION_NOT_SUPPORTED), b"")


def not_supported(gw: Gateway, app: Application, r: Reader) -> Reply:
    """The module answers these itself (C_Initialize, C_GetInfo, C_GetFunctionList), or CloudHSM
    does not offer them (UG:pkcs11-apis): CKR_FUNCTION_NOT_SUPPORTED."""
    return _NOT_SUPPORTED


HANDLERS: dict[Op, Handler] = {
    # HELLO (the handshake) is answered by the server before any handler runs.
    Op.Initialize: not_supported,
    Op.Finalize: token.finalize,
    Op.GetInfo: not_supported,
    Op.GetFunctionList: not_supported,
    # slot and token
    Op.GetSlotList: token.get_slot_list,
    Op.GetSlotInfo: token.get_slot_info,
    Op.GetTokenInfo: token.get_token_info,
    Op.GetMechanismList: token.get_mechanism_list,
    Op.GetMechanismInfo: token.get_mechanism_info,
    Op.InitToken: not_supported,
    Op.InitPIN: not_supported,
    Op.SetPIN: not_supported,
    # sessions and login
    Op.OpenSession: session.open_session,
    Op.CloseSession: session.close_session,
    Op.CloseAllSessions: session.close_all_sessions,
    Op.GetSessionInfo: session.get_session_info,
    Op.GetOperationState: not_supported,
    Op.SetOperationState: not_supported,
    Op.Login: session.login,
    Op.Logout: session.logout,
    # objects
    Op.CreateObject: objects.create_object,
    Op.CopyObject: objects.copy_object,
    Op.DestroyObject: objects.destroy_object,
    Op.GetObjectSize: objects.get_object_size,
    Op.GetAttributeValue: objects.get_attribute_value,
    Op.SetAttributeValue: objects.set_attribute_value,
    Op.FindObjectsInit: objects.find_objects_init,
    Op.FindObjects: objects.find_objects,
    Op.FindObjectsFinal: objects.find_objects_final,
    # crypto operations
    Op.EncryptInit: crypto.encrypt_init,
    Op.Encrypt: crypto.encrypt,
    Op.EncryptUpdate: crypto.encrypt_update,
    Op.EncryptFinal: crypto.encrypt_final,
    Op.DecryptInit: crypto.decrypt_init,
    Op.Decrypt: crypto.decrypt,
    Op.DecryptUpdate: crypto.decrypt_update,
    Op.DecryptFinal: crypto.decrypt_final,
    Op.DigestInit: crypto.digest_init,
    Op.Digest: crypto.digest,
    Op.DigestUpdate: crypto.digest_update,
    Op.DigestKey: not_supported,
    Op.DigestFinal: crypto.digest_final,
    Op.SignInit: crypto.sign_init,
    Op.Sign: crypto.sign,
    Op.SignUpdate: crypto.sign_update,
    Op.SignFinal: crypto.sign_final,
    Op.SignRecoverInit: not_supported,
    Op.SignRecover: not_supported,
    Op.VerifyInit: crypto.verify_init,
    Op.Verify: crypto.verify,
    Op.VerifyUpdate: crypto.verify_update,
    Op.VerifyFinal: crypto.verify_final,
    Op.VerifyRecoverInit: not_supported,
    Op.VerifyRecover: not_supported,
    Op.DigestEncryptUpdate: not_supported,
    Op.DecryptDigestUpdate: not_supported,
    Op.SignEncryptUpdate: not_supported,
    Op.DecryptVerifyUpdate: not_supported,
    # keys and wrapping
    Op.GenerateKey: keys.generate_key,
    Op.GenerateKeyPair: keys.generate_key_pair,
    Op.WrapKey: keys.wrap_key,
    Op.UnwrapKey: keys.unwrap_key,
    Op.DeriveKey: keys.derive_key,
    Op.SeedRandom: not_supported,
    Op.GenerateRandom: keys.generate_random,
    Op.GetFunctionStatus: not_supported,
    Op.CancelFunction: not_supported,
    Op.WaitForSlotEvent: not_supported,
}
_BY_CODE: dict[int, Handler] = {int(op): h for op, h in HANDLERS.items()}


def dispatch(gw: Gateway, app: Application, op: int, body: memoryview) -> Reply | Awaitable[Reply]:
    """The handler of opcode `op` on a request body (an unknown opcode: not supported). A
    Pkcs11Error raised here is the reply's return value (the server translates it)."""
    return _BY_CODE.get(op, not_supported)(gw, app, Reader(body))
