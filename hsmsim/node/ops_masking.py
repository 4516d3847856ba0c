"""Masking operations: masked export/import of objects (sync, backup, reconciliation),
the inventory used to diff nodes, and cloning the masking key into a new node."""

from __future__ import annotations

import hashlib
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa as pyca_rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from hsmsim.node import policy
from hsmsim.node.codec import Fields, template_from_wire, template_to_wire
from hsmsim.node.context import Ops
from hsmsim.node.index import ObjectRecord, encode_record
from hsmsim.node.keystore import value_len
from hsmsim.node.masking import OBJECT_KIND, clone_padding
from hsmsim.node.softhsm import raw_template
from hsmsim.pkcs11.attributes import Template
from hsmsim.pkcs11.constants import RV, ObjectClass
from hsmsim.pkcs11.errors import Pkcs11Error


class MaskingOps(Ops):
    async def export_masked(self, f: Fields) -> bytes:
        masking, _ = self.ks.require_masking()
        handle = f.handle()
        r = self.ks.get(handle)
        if r is None:
            raise Pkcs11Error(RV.OBJECT_HANDLE_INVALID, f"object {handle} does not exist")
        soft = self.ks.soft_handle(handle)
        material: bytes | None = None
        extra: Template = {}
        if r.cls in (ObjectClass.SECRET_KEY, ObjectClass.PRIVATE_KEY):
            material = await self.ks.in_hsm(self.ks.wrap_masked_sync, soft, value_len(r))
        else:
            extra = await self.public_material(r)
        blob = masking.seal(OBJECT_KIND, {
            "handle": r.handle, "attrs": template_to_wire(r.attrs), "owner": r.owner,
            "shared": sorted(r.shared), "session": r.session, "version": r.version,
            "material": material, "public": template_to_wire(extra)})
        self.audit.record("masked_extract", handle=handle)
        return blob

    async def import_masked(self, f: Fields) -> int:
        masking, _ = self.ks.require_masking()
        d = masking.open(OBJECT_KIND, f.bytes("blob"))
        replacing = f.bool("replace", False)
        try:
            attrs = template_from_wire(d["attrs"])
            public = template_from_wire(d["public"])
            rec = ObjectRecord(int(d["handle"]), attrs, str(d["owner"]),
                               frozenset(str(s) for s in d["shared"]), 0, 0, int(d["version"]))
            material = d["material"]
        except (KeyError, TypeError, ValueError, Pkcs11Error):
            raise Pkcs11Error(RV.WRAPPED_KEY_INVALID, "masked blob content is malformed") from None
        if not rec.token:
            # FIDELITY: session objects never leave their node.
            raise Pkcs11Error(RV.ARGUMENTS_BAD, "session objects cannot be imported")
        if rec.handle in self.ks.catalog and not replacing:
            raise Pkcs11Error(RV.TEMPLATE_INCONSISTENT, f"handle {rec.handle} is already in use")
        ks, hsm = self.ks, self.ks.hsm
        if rec.cls in (ObjectClass.SECRET_KEY, ObjectClass.PRIVATE_KEY):
            if not isinstance(material, bytes):
                raise Pkcs11Error(RV.WRAPPED_KEY_INVALID, "masked blob lacks key material")
            soft_t = policy.softhsm_template(rec.cls, rec.key_type, rec.handle, True)

            def make() -> list[int]:
                return [ks.unwrap_masked_sync(material, soft_t)]
        else:
            soft_t = policy.softhsm_template(rec.cls, rec.key_type, rec.handle, True, public)

            def make() -> list[int]:
                return [hsm.create_object(raw_template(soft_t.items()))]
        self.engine.drop(rec.handle)
        # A copy of a key another HSM holds: kept even if the daemon hangs up mid-copy.
        await self.ks.create([rec], make, replacing=replacing, copy=True)
        self.engine.drop(rec.handle)  # a context loaded while replacing is stale
        self.ctx.batchers.pop(rec.handle, None)
        self.audit.record("masked_insert", handle=rec.handle, owner=rec.owner)
        return rec.handle

    def inventory(self) -> list[list[Any]]:
        return [[r.handle, hashlib.sha256(encode_record(r)).digest()[:16]]
                for r in sorted(self.ks.catalog.records.values(), key=lambda r: r.handle)
                if r.token]

    async def clone_offer(self) -> bytes:
        if self.ks.masking is not None:
            raise Pkcs11Error(RV.ACTION_PROHIBITED, "this node already has a masking key")
        key = await self.ks.in_hsm(pyca_rsa.generate_private_key, 65537, 3072)
        self.ctx.clone_key = key
        return key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)

    def clone_export(self, f: Fields) -> bytes:
        masking, _ = self.ks.require_masking()
        blob = masking.export_to(f.bytes("public_key"))
        self.audit.record("masking_key_export")
        return blob

    async def clone_accept(self, f: Fields) -> None:
        blob = f.bytes("blob")
        if self.ctx.clone_key is None:
            raise Pkcs11Error(RV.OPERATION_NOT_INITIALIZED, "call clone_offer first")
        if self.ks.masking is not None:
            raise Pkcs11Error(RV.ACTION_PROHIBITED, "this node already has a masking key")
        try:
            key = self.ctx.clone_key.decrypt(blob, clone_padding())
        except ValueError:
            raise Pkcs11Error(RV.WRAPPED_KEY_INVALID, "clone blob does not decrypt") from None
        if len(key) != 32:
            raise Pkcs11Error(RV.WRAPPED_KEY_INVALID, "clone blob does not hold a masking key")
        await self.ks.in_store(self.ks.install_masking_key, key)
        self.ctx.clone_key = None
        self.audit.record("masking_key_clone")
