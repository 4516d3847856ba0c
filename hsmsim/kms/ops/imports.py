"""Imported key material (Origin EXTERNAL, symmetric keys): GetParametersForImport,
ImportKeyMaterial, DeleteImportedKeyMaterial. The wrapping key pair and import token live in
the daemon's memory for 24 hours; imported material is sealed in the cluster like any other.

FIDELITY: import tokens do not survive a daemon restart (InvalidImportTokenException after
one); SM2 wrapping and importing new material into a key that has material (multi-material
rotation) are not supported."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from dataclasses import dataclass, replace
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap_with_padding

from hsmsim.kms import errors as e, model
from hsmsim.kms.material import ClusterFailure
from hsmsim.kms.model import KeyRecord, MaterialRecord
from hsmsim.kms.inputs import (DeleteImportedKeyMaterialRequest, GetParametersForImportRequest,
                               ImportKeyMaterialRequest)
from hsmsim.kms.ops.common import Call, Handler, Response
from hsmsim.kms.runtime import DAY, Kms

TOKEN_LIFETIME = DAY
_BITS = {"RSA_2048": 2048, "RSA_3072": 3072, "RSA_4096": 4096}


@dataclass(frozen=True)
class _Params:
    key_id: str
    algorithm: str
    private: rsa.RSAPrivateKey
    valid_to: float


_TOKENS: dict[str, _Params] = {}


def _external(kms: Kms, call: Call, key_ref: str) -> KeyRecord:
    key = kms.resolve(key_ref, aliases=False)
    call.touch(key)
    if key.origin != model.EXTERNAL:
        raise e.Unsupported(f"{key.arn} origin is {key.origin} which is not valid for this operation.")
    kms.require_not_pending_deletion(key)
    return key


def _unwrap(params: _Params, blob: bytes) -> bytes:
    priv = params.private
    alg = params.algorithm
    try:
        if alg == "RSAES_PKCS1_V1_5":
            return priv.decrypt(blob, padding.PKCS1v15())
        sha: hashes.HashAlgorithm = hashes.SHA1() if alg.endswith("SHA_1") else hashes.SHA256()
        oaep = padding.OAEP(padding.MGF1(sha), sha, None)
        if alg.startswith("RSAES_OAEP"):
            return priv.decrypt(blob, oaep)
        n = priv.key_size // 8
        aes_key = priv.decrypt(blob[:n], oaep)
        return aes_key_unwrap_with_padding(aes_key, blob[n:])
    except (ValueError, InvalidUnwrap):
        raise e.InvalidCiphertext("") from None


async def get_parameters_for_import(kms: Kms, call: Call, req: GetParametersForImportRequest) -> Response:
    key = _external(kms, call, req.key_id)
    kms.authorize(call.caller, key, "GetParametersForImport")
    spec, alg = req.wrapping_key_spec, req.wrapping_algorithm
    if spec not in _BITS or alg == "SM2PKE":
        raise e.Unsupported(f"Wrapping key spec {spec} with {alg} is not supported by hsmsim.")
    if alg == "RSAES_PKCS1_V1_5" and spec != "RSA_2048":
        raise e.Unsupported("RSAES_PKCS1_V1_5 is supported only with RSA_2048 wrapping keys.")
    priv = await asyncio.get_running_loop().run_in_executor(
        None, lambda: rsa.generate_private_key(65537, _BITS[spec]))
    token = secrets.token_bytes(48)
    valid_to = kms.clock.now() + TOKEN_LIFETIME
    for tid in [t for t, p in _TOKENS.items() if p.valid_to < kms.clock.now()]:
        del _TOKENS[tid]
    _TOKENS[token.hex()] = _Params(key.key_id, alg, priv, valid_to)
    public = priv.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    return {"KeyId": key.arn, "ImportToken": token, "PublicKey": public, "ParametersValidTo": valid_to}


async def import_key_material(kms: Kms, call: Call, req: ImportKeyMaterialRequest) -> Response:
    key = _external(kms, call, req.key_id)
    kms.authorize(call.caller, key, "ImportKeyMaterial")
    params = _TOKENS.get(req.import_token.hex())
    if params is None or params.key_id != key.key_id:
        raise e.InvalidImportToken("The import token is not valid for this KMS key.")
    if params.valid_to < kms.clock.now():
        raise e.ExpiredImportToken("The import token has expired.")
    valid_to = req.valid_to
    model_ = req.expiration_model or (
        "KEY_MATERIAL_EXPIRES" if valid_to is not None else "KEY_MATERIAL_DOES_NOT_EXPIRE")
    if model_ == "KEY_MATERIAL_EXPIRES" and valid_to is None:
        raise e.Invalid("A ValidTo date is required when ExpirationModel is KEY_MATERIAL_EXPIRES.")
    if model_ == "KEY_MATERIAL_DOES_NOT_EXPIRE" and valid_to is not None:
        raise e.Invalid("ValidTo must not be set when ExpirationModel is KEY_MATERIAL_DOES_NOT_EXPIRE.")
    if valid_to is not None and valid_to <= kms.clock.now():
        raise e.Invalid("ValidTo must be in the future.")
    secret = _unwrap(params, req.encrypted_key_material)
    if len(secret) != 32:
        raise e.IncorrectKeyMaterial("Symmetric key material must be 256 bits.")
    material_id = hashlib.sha256(b"hsmsim-kms-import-v1:" + key.key_id.encode() + secret).hexdigest()
    if key.current_material is not None and key.current_material != material_id:
        raise e.IncorrectKeyMaterial(f"The key material does not match the key material previously "
                                     f"imported into {key.arn}.")
    # A multi-Region key's Regions share one material (KMS Developer Guide, "Importing key
    # material into multi-Region keys"): a replica takes only the primary's.
    for region, other in kms.store.key_regions(key.key_id).items():
        if region != kms.region and other.current_material not in (None, material_id):
            raise e.IncorrectKeyMaterial(f"The key material does not match the key material of the "
                                         f"related multi-Region key {other.arn}.")
    try:
        sealed = await kms.fleet.seal(key.key_id, material_id, secret)
    except ClusterFailure:
        raise e.DependencyTimeout("KMS could not reach its key material store.") from None
    del _TOKENS[req.import_token.hex()]
    key = kms.store.keys[key.key_id]
    state = model.ENABLED if key.state == model.PENDING_IMPORT else key.state
    with kms.store.transaction():
        kms.store.put_material(MaterialRecord(material_id, key.key_id, 0, kms.clock.now(), sealed))
        kms.store.put_key(replace(key, current_material=material_id, state=state, valid_to=valid_to,
                                  expiration_model=model_))
    return {"KeyId": key.arn, "KeyMaterialId": material_id}


async def delete_imported_key_material(kms: Kms, call: Call, req: DeleteImportedKeyMaterialRequest) -> Response:
    key = _external(kms, call, req.key_id)
    kms.authorize(call.caller, key, "DeleteImportedKeyMaterial")
    mid = key.current_material
    remove_material(kms, key)
    return {"KeyId": key.arn, "KeyMaterialId": mid}


def remove_material(kms: Kms, key: KeyRecord) -> None:
    """Imported material deleted (by request or on expiry): the key waits for an import."""
    shared = len(kms.store.key_regions(key.key_id)) > 1  # a multi-Region key's other Regions keep it
    if key.current_material and not shared:
        kms.fleet.forget([key.current_material])
    with kms.store.transaction():
        if not shared:
            kms.store.delete_materials(key.key_id)
        kms.store.put_key(replace(key, current_material=None, valid_to=None, expiration_model=None,
                                  state=model.PENDING_IMPORT if key.state not in model.PENDING_STATES else key.state))


HANDLERS: dict[str, Handler[Any]] = {
    "GetParametersForImport": Handler(GetParametersForImportRequest, get_parameters_for_import),
    "ImportKeyMaterial": Handler(ImportKeyMaterialRequest, import_key_material),
    "DeleteImportedKeyMaterial": Handler(DeleteImportedKeyMaterialRequest, delete_imported_key_material),
}
