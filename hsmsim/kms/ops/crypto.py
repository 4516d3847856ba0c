"""Encryption operations: Encrypt, Decrypt, ReEncrypt, GenerateDataKey(WithoutPlaintext),
GenerateDataKeyPair(WithoutPlaintext), GenerateRandom. Symmetric ciphertext is our versioned
blob (`hsmsim.kms.blob`) with the encryption context bound as AAD; RSA keys encrypt with OAEP
and produce bare RSA ciphertext, as KMS does."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from hsmsim.kms import blob, errors as e, material, model
from hsmsim.kms.keystores import CONNECTED
from hsmsim.kms.material import BadCiphertext, ClusterFailure
from hsmsim.kms.model import KeyRecord
from hsmsim.kms.inputs import (DecryptRequest, EncryptRequest, GenerateDataKeyPairRequest,
                               GenerateDataKeyPairWithoutPlaintextRequest, GenerateDataKeyRequest,
                               GenerateDataKeyWithoutPlaintextRequest, GenerateRandomRequest,
                               ReEncryptRequest)
from hsmsim.kms.ops.common import Call, Handler, Response, dry_run
from hsmsim.kms.ops.keys import cluster_error, resolve_creating
from hsmsim.kms.runtime import Kms

_OAEP_HASH = {"RSAES_OAEP_SHA_1": "sha1", "RSAES_OAEP_SHA_256": "sha256"}
_OAEP_MAX = {("RSA_2048", "sha1"): 214, ("RSA_2048", "sha256"): 190,
             ("RSA_3072", "sha1"): 342, ("RSA_3072", "sha256"): 318,
             ("RSA_4096", "sha1"): 470, ("RSA_4096", "sha256"): 446}
_PAIR_SPECS = {"RSA_2048": 2048, "RSA_3072": 3072, "RSA_4096": 4096}
_PAIR_CURVES: dict[str, Any] = {"ECC_NIST_P256": ec.SECP256R1, "ECC_NIST_P384": ec.SECP384R1,
                                "ECC_NIST_P521": ec.SECP521R1, "ECC_SECG_P256K1": ec.SECP256K1}


def _ctx(context: dict[str, str] | None) -> dict[str, str]:
    return dict(context or {})


async def _fleet_key(kms: Kms, key: KeyRecord, material_id: str) -> material.LiveKey:
    live = kms.fleet.cached(material_id)
    if live is not None:
        return live
    rec = kms.store.material(material_id)
    if rec is None or rec.key_id != key.key_id:
        raise e.InvalidCiphertext("")
    try:
        return await kms.fleet.live(key.key_spec, rec)
    except ClusterFailure:
        raise e.DependencyTimeout("KMS could not reach its key material store.") from None


async def seal(kms: Kms, key: KeyRecord, plaintext: bytes, context: dict[str, str]) -> tuple[bytes, str | None]:
    """Symmetric ciphertext blob of `plaintext` under `key` (usable, ENCRYPT_DECRYPT), and the
    KeyMaterialId to report (None for custom-key-store keys)."""
    aad_ctx = blob.encode_context(context)
    if key.origin == model.AWS_CLOUDHSM:
        assert key.custom_key_store_id and key.backing_handle is not None
        login = kms.keystores.login(key.custom_key_store_id)
        if login is None:
            raise e.InvalidState(f"{key.arn} is unavailable.")
        hdr = blob.header(blob.ENGINE_CLUSTER, key.key_id, material.cluster_material(key.arn, key.backing_handle))
        try:
            iv, body = await kms.cluster_keys.encrypt(login, key.backing_handle, plaintext, hdr + aad_ctx)
        except ClusterFailure as exc:
            raise cluster_error(key, exc) from None
        return blob.pack(hdr, iv, body), None
    assert key.current_material is not None
    live = await _fleet_key(kms, key, key.current_material)
    hdr = blob.header(blob.ENGINE_FLEET, key.key_id, bytes.fromhex(key.current_material))
    iv = os.urandom(blob.IV_LEN)
    return blob.pack(hdr, iv, live.encrypt(iv, plaintext, hdr + aad_ctx)), key.current_material


async def unseal(kms: Kms, call: Call, data: bytes, context: dict[str, str], key_ref: str | None,
                 action: str, grant_op: str) -> tuple[KeyRecord, bytes, str | None]:
    """(key, plaintext, KeyMaterialId) of a symmetric blob; checks key id, state and access."""
    try:
        parsed, hdr = blob.unpack(data)
    except ValueError:
        raise e.InvalidCiphertext("") from None
    key = kms.store.keys.get(parsed.key_id)
    if key_ref is not None:
        wanted = kms.resolve(key_ref)
        if key is None or wanted.key_id != key.key_id:
            call.touch(wanted)
            raise e.IncorrectKey("The key ID in the request does not identify a CMK that can "
                                 "perform this operation.")
    if key is None:
        raise e.InvalidCiphertext("")
    call.touch(key)
    kms.authorize(call.caller, key, action, context, grant_op=grant_op)
    kms.require_usable(key)
    if key.key_spec != model.SYMMETRIC:
        raise e.InvalidCiphertext("")
    aad = hdr + blob.encode_context(context)
    if parsed.engine == blob.ENGINE_CLUSTER:
        if key.origin != model.AWS_CLOUDHSM or key.backing_handle is None or \
                parsed.material != material.cluster_material(key.arn, key.backing_handle):
            raise e.InvalidCiphertext("")
        assert key.custom_key_store_id
        login = kms.keystores.login(key.custom_key_store_id)
        if login is None:
            raise e.InvalidState(f"{key.arn} is unavailable.")
        try:
            plain = await kms.cluster_keys.decrypt(login, key.backing_handle, parsed.iv, parsed.body, aad)
        except BadCiphertext:
            raise e.InvalidCiphertext("") from None
        except ClusterFailure as exc:
            raise cluster_error(key, exc) from None
        return key, plain, None
    if key.origin not in (model.AWS_KMS, model.EXTERNAL):
        raise e.InvalidCiphertext("")
    live = await _fleet_key(kms, key, parsed.material_id)
    try:
        return key, live.decrypt(parsed.iv, parsed.body, aad), parsed.material_id
    except BadCiphertext:
        raise e.InvalidCiphertext("") from None


def _symmetric_algorithm(key: KeyRecord, alg: str | None) -> None:
    if alg not in (None, "SYMMETRIC_DEFAULT"):
        raise e.InvalidKeyUsage(f"Algorithm {alg} is incompatible with key spec {key.key_spec}.")


async def _encrypt_with(kms: Kms, call: Call, key: KeyRecord, plaintext: bytes, context: dict[str, str],
                        alg: str | None, action: str, grant_op: str,
                        grant_tokens: list[str] | None = None) -> tuple[bytes, str, str | None]:
    call.touch(key)
    kms.authorize(call.caller, key, action, context, grant_op=grant_op)
    kms.require_usable(key)
    kms.require_usage(key, "ENCRYPT_DECRYPT", action)
    if key.key_spec == model.SYMMETRIC:
        _symmetric_algorithm(key, alg)
        ct, mid = await seal(kms, key, plaintext, context)
        return ct, "SYMMETRIC_DEFAULT", mid
    if alg not in _OAEP_HASH:
        raise e.InvalidKeyUsage(f"Algorithm {alg or 'SYMMETRIC_DEFAULT'} is incompatible with key spec {key.key_spec}.")
    if context:
        raise e.InvalidKeyUsage("EncryptionContext is not supported with asymmetric KMS keys.")
    hash_name = _OAEP_HASH[alg]
    limit = _OAEP_MAX[(key.key_spec, hash_name)]
    if len(plaintext) > limit:
        raise e.Invalid(f"Algorithm {alg} and key spec {key.key_spec} cannot encrypt data larger than {limit} bytes.")
    assert key.current_material
    rec = kms.store.material(key.current_material)
    assert rec is not None
    return material.rsa_encrypt(rec.public, hash_name, plaintext), alg, None


async def encrypt(kms: Kms, call: Call, req: EncryptRequest) -> Response:
    key = await resolve_creating(kms, call, req.key_id)
    ct, alg, _ = await _encrypt_with(kms, call, key, req.plaintext, _ctx(req.encryption_context),
                                     req.encryption_algorithm, "Encrypt", "Encrypt")
    dry_run(req.dry_run)
    return {"CiphertextBlob": ct, "KeyId": key.arn, "EncryptionAlgorithm": alg}


async def _rsa_decrypt(kms: Kms, call: Call, key: KeyRecord, data: bytes, alg: str | None,
                       action: str, grant_op: str) -> bytes:
    call.touch(key)
    kms.authorize(call.caller, key, action, grant_op=grant_op)
    kms.require_usable(key)
    kms.require_usage(key, "ENCRYPT_DECRYPT", action)
    if alg not in _OAEP_HASH:
        raise e.InvalidKeyUsage(f"Algorithm {alg or 'SYMMETRIC_DEFAULT'} is incompatible with key spec {key.key_spec}.")
    assert key.current_material
    live = await _fleet_key(kms, key, key.current_material)
    try:
        return live.rsa_decrypt(_OAEP_HASH[alg], data)
    except BadCiphertext:
        raise e.InvalidCiphertext("") from None


async def _decrypt_any(kms: Kms, call: Call, data: bytes, context: dict[str, str], key_ref: str | None,
                       alg: str | None, action: str, grant_op: str) -> tuple[KeyRecord, bytes, str, str | None]:
    if key_ref is not None:
        target = kms.resolve(key_ref)
        if target.key_spec in model.RSA_SPECS:
            return target, await _rsa_decrypt(kms, call, target, data, alg, action, grant_op), str(alg), None
    key, plain, mid = await unseal(kms, call, data, context, key_ref, action, grant_op)
    _symmetric_algorithm(key, alg)
    return key, plain, "SYMMETRIC_DEFAULT", mid


def _require_ciphertext(req: DecryptRequest | ReEncryptRequest) -> bytes:
    """The request's CiphertextBlob, optional in the model only for DryRun with IGNORE_CIPHERTEXT."""
    if req.ciphertext_blob is None:
        if req.dry_run and "IGNORE_CIPHERTEXT" in (req.dry_run_modifiers or ()):
            dry_run(req.dry_run)
        raise e.Invalid("1 validation error detected: Value null at 'ciphertextBlob' failed to "
                        "satisfy constraint: Member must not be null")
    return req.ciphertext_blob


async def decrypt(kms: Kms, call: Call, req: DecryptRequest) -> Response:
    blob = _require_ciphertext(req)
    if req.recipient is not None:
        raise e.Unsupported("Recipient (Nitro Enclaves attestation) is not supported by hsmsim.")
    key, plain, alg, mid = await _decrypt_any(kms, call, blob, _ctx(req.encryption_context), req.key_id,
                                              req.encryption_algorithm, "Decrypt", "Decrypt")
    dry_run(req.dry_run)
    return {"KeyId": key.arn, "Plaintext": plain, "EncryptionAlgorithm": alg, "KeyMaterialId": mid}


async def re_encrypt(kms: Kms, call: Call, req: ReEncryptRequest) -> Response:
    blob = _require_ciphertext(req)
    src, plain, src_alg, src_mid = await _decrypt_any(
        kms, call, blob, _ctx(req.source_encryption_context), req.source_key_id,
        req.source_encryption_algorithm, "ReEncryptFrom", "ReEncryptFrom")
    dest = await resolve_creating(kms, call, req.destination_key_id)
    ct, dst_alg, dst_mid = await _encrypt_with(
        kms, call, dest, plain, _ctx(req.destination_encryption_context),
        req.destination_encryption_algorithm, "ReEncryptTo", "ReEncryptTo")
    dry_run(req.dry_run)
    return {"CiphertextBlob": ct, "SourceKeyId": src.arn, "KeyId": dest.arn,
            "SourceEncryptionAlgorithm": src_alg, "DestinationEncryptionAlgorithm": dst_alg,
            "SourceKeyMaterialId": src_mid, "DestinationKeyMaterialId": dst_mid}


async def _data_key_bytes(kms: Kms, key: KeyRecord, n: int) -> bytes:
    if key.origin == model.AWS_CLOUDHSM and key.custom_key_store_id:
        login = kms.keystores.login(key.custom_key_store_id)
        if login is None:
            raise e.InvalidState(f"{key.arn} is unavailable.")
        try:
            return await kms.cluster_keys.random(login, n)
        except ClusterFailure as exc:
            raise cluster_error(key, exc) from None
    return os.urandom(n)


async def _generate_data_key(kms: Kms, call: Call,
                             req: GenerateDataKeyRequest | GenerateDataKeyWithoutPlaintextRequest,
                             op: str) -> tuple[KeyRecord, bytes, bytes, str | None]:
    key = await resolve_creating(kms, call, req.key_id)
    spec, n = req.key_spec, req.number_of_bytes
    if (spec is None) == (n is None):
        raise e.Invalid("Please specify either number of bytes or key spec.")
    length = int(n) if n is not None else {"AES_128": 16, "AES_256": 32}[str(spec)]
    call.touch(key)
    kms.authorize(call.caller, key, op, _ctx(req.encryption_context), grant_op=op)
    kms.require_usable(key)
    kms.require_usage(key, "ENCRYPT_DECRYPT", op)
    if key.key_spec != model.SYMMETRIC:
        raise e.InvalidKeyUsage(f"{key.arn} key usage is ENCRYPT_DECRYPT which is not valid for {op}.")
    plain = await _data_key_bytes(kms, key, length)
    ct, mid = await seal(kms, key, plain, _ctx(req.encryption_context))
    dry_run(req.dry_run)
    return key, plain, ct, mid


async def generate_data_key(kms: Kms, call: Call, req: GenerateDataKeyRequest) -> Response:
    if req.recipient is not None:
        raise e.Unsupported("Recipient (Nitro Enclaves attestation) is not supported by hsmsim.")
    key, plain, ct, mid = await _generate_data_key(kms, call, req, "GenerateDataKey")
    return {"CiphertextBlob": ct, "Plaintext": plain, "KeyId": key.arn, "KeyMaterialId": mid}


async def generate_data_key_without_plaintext(kms: Kms, call: Call,
                                              req: GenerateDataKeyWithoutPlaintextRequest) -> Response:
    key, _, ct, mid = await _generate_data_key(kms, call, req, "GenerateDataKeyWithoutPlaintext")
    return {"CiphertextBlob": ct, "KeyId": key.arn, "KeyMaterialId": mid}


def _new_pair(spec: str) -> tuple[bytes, bytes]:
    priv: Any
    if spec in _PAIR_SPECS:
        priv = rsa.generate_private_key(65537, _PAIR_SPECS[spec])
    else:
        priv = ec.generate_private_key(_PAIR_CURVES[spec]())
    return (priv.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption()),
            priv.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo))


async def _generate_pair(kms: Kms, call: Call,
                         req: GenerateDataKeyPairRequest | GenerateDataKeyPairWithoutPlaintextRequest,
                         op: str) -> Response:
    key = await resolve_creating(kms, call, req.key_id)
    spec = req.key_pair_spec
    call.touch(key)
    kms.authorize(call.caller, key, op, _ctx(req.encryption_context), grant_op=op)
    if key.origin == model.AWS_CLOUDHSM:
        raise e.Unsupported(f"{key.arn} origin is AWS_CLOUDHSM which is not valid for this operation.")
    kms.require_usable(key)
    kms.require_usage(key, "ENCRYPT_DECRYPT", op)
    if key.key_spec != model.SYMMETRIC:
        raise e.InvalidKeyUsage(f"{key.arn} key usage is ENCRYPT_DECRYPT which is not valid for {op}.")
    if spec not in _PAIR_SPECS and spec not in _PAIR_CURVES:
        raise e.Unsupported(f"KeyPairSpec {spec} is not supported in this Region.")
    private, public = await asyncio.get_running_loop().run_in_executor(None, _new_pair, spec)
    ct, mid = await seal(kms, key, private, _ctx(req.encryption_context))
    dry_run(req.dry_run)
    out: Response = {"PrivateKeyCiphertextBlob": ct, "PublicKey": public, "KeyId": key.arn,
                     "KeyPairSpec": spec, "KeyMaterialId": mid}
    if op == "GenerateDataKeyPair":
        out["PrivateKeyPlaintext"] = private
    return out


async def generate_data_key_pair(kms: Kms, call: Call, req: GenerateDataKeyPairRequest) -> Response:
    if req.recipient is not None:
        raise e.Unsupported("Recipient (Nitro Enclaves attestation) is not supported by hsmsim.")
    return await _generate_pair(kms, call, req, "GenerateDataKeyPair")


async def generate_data_key_pair_without_plaintext(kms: Kms, call: Call,
                                                   req: GenerateDataKeyPairWithoutPlaintextRequest) -> Response:
    return await _generate_pair(kms, call, req, "GenerateDataKeyPairWithoutPlaintext")


async def generate_random(kms: Kms, call: Call, req: GenerateRandomRequest) -> Response:
    n = req.number_of_bytes
    if n is None:
        raise e.Invalid("NumberOfBytes is required.")
    if req.recipient is not None:
        raise e.Unsupported("Recipient (Nitro Enclaves attestation) is not supported by hsmsim.")
    store_id = req.custom_key_store_id
    if store_id is None:
        return {"Plaintext": os.urandom(n)}
    store = kms.store.stores.get(store_id)
    if store is None:
        raise e.StoreNotFound(f"Custom key store {store_id} was not found.")
    login = kms.keystores.login(store_id)
    if store.state != CONNECTED or login is None:
        raise e.StoreInvalidState(f"Custom key store {store_id} is not connected.")
    call.additional = {"customKeyStoreId": store_id, "clusterId": store.cluster_id}
    try:
        return {"Plaintext": await kms.cluster_keys.random(login, n)}
    except ClusterFailure:
        raise e.InvalidState("KMS cannot communicate with your CloudHSM cluster.") from None


HANDLERS: dict[str, Handler[Any]] = {
    "Encrypt": Handler(EncryptRequest, encrypt),
    "Decrypt": Handler(DecryptRequest, decrypt),
    "ReEncrypt": Handler(ReEncryptRequest, re_encrypt),
    "GenerateDataKey": Handler(GenerateDataKeyRequest, generate_data_key),
    "GenerateDataKeyWithoutPlaintext": Handler(GenerateDataKeyWithoutPlaintextRequest,
                                               generate_data_key_without_plaintext),
    "GenerateDataKeyPair": Handler(GenerateDataKeyPairRequest, generate_data_key_pair),
    "GenerateDataKeyPairWithoutPlaintext": Handler(GenerateDataKeyPairWithoutPlaintextRequest,
                                                   generate_data_key_pair_without_plaintext),
    "GenerateRandom": Handler(GenerateRandomRequest, generate_random),
}
