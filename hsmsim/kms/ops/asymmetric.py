"""Asymmetric and HMAC operations: Sign, Verify, GetPublicKey, GenerateMac, VerifyMac."""

from __future__ import annotations

import hmac
from typing import Any

from hsmsim.kms import errors as e, material, model
from hsmsim.kms.material import BadSignature
from hsmsim.kms.model import KeyRecord
from hsmsim.kms.inputs import (GenerateMacRequest, GetPublicKeyRequest, SignRequest, VerifyMacRequest,
                               VerifyRequest)
from hsmsim.kms.ops.common import (Call, Handler, Response, dry_run, encryption_algorithms,
                                   mac_algorithms, signing_algorithms)
from hsmsim.kms.ops.crypto import _fleet_key
from hsmsim.kms.runtime import Kms

_HASH_LEN = {"sha256": 32, "sha384": 48, "sha512": 64}


def _hash_of(alg: str) -> str:
    return "sha" + alg.rsplit("_", 1)[1]


def _signing_key(kms: Kms, call: Call, req: SignRequest | VerifyRequest, action: str) -> tuple[KeyRecord, str, bytes]:
    key = kms.resolve(req.key_id)
    call.touch(key)
    kms.authorize(call.caller, key, action, grant_op=action)
    kms.require_usable(key)
    kms.require_usage(key, "SIGN_VERIFY", action)
    alg = req.signing_algorithm
    if alg not in (signing_algorithms(key) or []):
        raise e.InvalidKeyUsage(f"Algorithm {alg} is incompatible with key spec {key.key_spec}.")
    hash_name = _hash_of(alg)
    message = req.message
    msg_type = req.message_type or "RAW"
    if msg_type == "DIGEST":
        if len(message) != _HASH_LEN[hash_name]:
            raise e.Invalid(f"Digest is invalid length for algorithm {alg}.")
        digest = message
    elif msg_type == "RAW":
        digest = material.digest(hash_name, message)
    else:
        raise e.Invalid(f"MessageType {msg_type} is not valid for algorithm {alg}.")
    return key, hash_name, digest


async def sign(kms: Kms, call: Call, req: SignRequest) -> Response:
    key, hash_name, digest = _signing_key(kms, call, req, "Sign")
    assert key.current_material
    live = await _fleet_key(kms, key, key.current_material)
    signature = live.sign(req.signing_algorithm, digest, hash_name)
    dry_run(req.dry_run)
    return {"KeyId": key.arn, "Signature": signature, "SigningAlgorithm": req.signing_algorithm}


async def verify(kms: Kms, call: Call, req: VerifyRequest) -> Response:
    key, hash_name, digest = _signing_key(kms, call, req, "Verify")
    assert key.current_material
    rec = kms.store.material(key.current_material)
    assert rec is not None
    try:
        material.verify_signature(key.key_spec, rec.public, req.signing_algorithm, digest, hash_name,
                                  req.signature)
    except BadSignature:
        raise e.InvalidSignature("") from None
    dry_run(req.dry_run)
    return {"KeyId": key.arn, "SignatureValid": True, "SigningAlgorithm": req.signing_algorithm}


async def get_public_key(kms: Kms, call: Call, req: GetPublicKeyRequest) -> Response:
    key = kms.resolve(req.key_id)
    call.touch(key)
    kms.authorize(call.caller, key, "GetPublicKey", grant_op="GetPublicKey")
    if key.key_spec not in model.RSA_SPECS + model.EC_SPECS:
        raise e.Unsupported(f"{key.arn} key spec is {key.key_spec} which is not valid for this operation.")
    kms.require_usable(key)
    assert key.current_material
    rec = kms.store.material(key.current_material)
    assert rec is not None
    return {"KeyId": key.arn, "PublicKey": rec.public, "CustomerMasterKeySpec": key.key_spec,
            "KeySpec": key.key_spec, "KeyUsage": key.key_usage,
            "EncryptionAlgorithms": encryption_algorithms(key), "SigningAlgorithms": signing_algorithms(key)}


async def _mac(kms: Kms, call: Call, req: GenerateMacRequest | VerifyMacRequest,
               action: str) -> tuple[KeyRecord, bytes]:
    key = kms.resolve(req.key_id)
    call.touch(key)
    kms.authorize(call.caller, key, action, grant_op=action)
    kms.require_usable(key)
    kms.require_usage(key, "GENERATE_VERIFY_MAC", action)
    alg = req.mac_algorithm
    if alg not in (mac_algorithms(key) or []):
        raise e.InvalidKeyUsage(f"Algorithm {alg} is incompatible with key spec {key.key_spec}.")
    assert key.current_material
    live = await _fleet_key(kms, key, key.current_material)
    return key, live.mac(_hash_of(alg), req.message)


async def generate_mac(kms: Kms, call: Call, req: GenerateMacRequest) -> Response:
    key, mac = await _mac(kms, call, req, "GenerateMac")
    dry_run(req.dry_run)
    return {"Mac": mac, "MacAlgorithm": req.mac_algorithm, "KeyId": key.arn}


async def verify_mac(kms: Kms, call: Call, req: VerifyMacRequest) -> Response:
    key, mac = await _mac(kms, call, req, "VerifyMac")
    if not hmac.compare_digest(mac, req.mac):
        raise e.InvalidMac("")
    dry_run(req.dry_run)
    return {"KeyId": key.arn, "MacValid": True, "MacAlgorithm": req.mac_algorithm}


HANDLERS: dict[str, Handler[Any]] = {
    "Sign": Handler(SignRequest, sign),
    "Verify": Handler(VerifyRequest, verify),
    "GetPublicKey": Handler(GetPublicKeyRequest, get_public_key),
    "GenerateMac": Handler(GenerateMacRequest, generate_mac),
    "VerifyMac": Handler(VerifyMacRequest, verify_mac),
}
