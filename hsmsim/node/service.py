"""The node service: the operation families (users, objects, crypto, keys, masking) over one
shared NodeContext, plus the connection-level parts (cluster proof, status, disconnect).
Wire-independent except for the typed `Fields` accessor; every operation raises Pkcs11Error
on failure and changes nothing when it does."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from hsmsim.node.audit import AuditLog
from hsmsim.node.context import Conn, NodeContext
from hsmsim.node.keystore import Keystore
from hsmsim.node.ops_crypto import CryptoOps
from hsmsim.node.ops_keys import KeyOps
from hsmsim.node.ops_masking import MaskingOps
from hsmsim.node.ops_objects import ObjectOps
from hsmsim.node.ops_users import UserOps
from hsmsim.node.protocol import AUTH_CONTEXT
from hsmsim.node.users import UserStore
from hsmsim.pkcs11.constants import RV
from hsmsim.pkcs11.errors import Pkcs11Error


class NodeService:
    def __init__(self, hsm_id: str, az: str, keystore: Keystore, users: UserStore,
                 audit: AuditLog, *, max_users: int, secret: bytes) -> None:
        self.ctx = NodeContext(hsm_id, az, keystore, users, audit, max_users=max_users)
        self.hsm_id = hsm_id
        self.az = az
        self.audit = audit
        self._secret = secret
        self.users = UserOps(self.ctx)
        self.objects = ObjectOps(self.ctx)
        self.crypto = CryptoOps(self.ctx)
        self.keys = KeyOps(self.ctx)
        self.masking = MaskingOps(self.ctx)
        self.connections = 0
        self.recovery: dict[str, int] = {}

    def check_proof(self, conn: Conn, proof: bytes) -> None:
        expected = hmac.new(self._secret, AUTH_CONTEXT + conn.nonce + self.hsm_id.encode(),
                            hashlib.sha256).digest()
        if not hmac.compare_digest(expected, proof):
            raise Pkcs11Error(RV.PIN_INCORRECT, "cluster authentication failed")
        conn.cluster = True

    async def disconnect(self, conn: Conn) -> None:
        """A closed connection ends its logins, and with them their session objects."""
        ids = set(conn.logins)
        for lid in ids:
            self.ctx.logins.pop(lid, None)
        conn.logins.clear()
        doomed = [r.handle for r in self.ctx.ks.catalog.records.values()
                  if r.session and r.login_id in ids]
        if doomed:
            await self.ctx.destroy_records(doomed)

    def status(self, faults: dict[str, Any]) -> dict[str, Any]:
        c = self.ctx.ks.catalog
        session = sum(1 for r in c.records.values() if r.session)
        return {"hsm_id": self.hsm_id, "az": self.az,
                "has_masking_key": self.ctx.ks.masking is not None,
                "users": len(self.ctx.users.users), "token_objects": len(c.records) - session,
                "session_objects": session, "asymmetric_objects": c.asymmetric,
                "connections": self.connections, "audit_seq": self.audit.next_seq,
                "faults": faults, "recovery": self.recovery}
