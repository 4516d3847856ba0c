"""Frozen values the node protocol returns (NodeClient results). The node sits below the
cluster layer, so these are its own types; the cluster maps them onto hsmsim.cluster.api."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


ROLE_CO = "admin"  # CloudHSM CLI role name of a crypto officer (PKCS#11 CKU_SO)
ROLE_CU = "crypto-user"  # CloudHSM CLI role name of a crypto user (PKCS#11 CKU_USER)
ROLES = (ROLE_CO, ROLE_CU)


@dataclass(frozen=True)
class LoginInfo:
    login_id: int
    user_type: int  # UserType value
    username: str


@dataclass(frozen=True)
class NodeUser:
    username: str
    role: str  # ROLE_CO | ROLE_CU
    locked: bool
    failed_logins: int
    version: int = 0  # the credential's version (UserRecord.cred_version)


@dataclass(frozen=True)
class Hello:
    version: int
    hsm_id: str
    az: str
    server: str
    max_frame: int
    nonce: bytes  # per-connection challenge for auth_cluster


@dataclass(frozen=True)
class NodeStatus:
    hsm_id: str
    az: str
    has_masking_key: bool
    users: int
    token_objects: int
    session_objects: int
    asymmetric_objects: int
    connections: int
    audit_seq: int  # sequence number the next audit record will get
    faults: dict[str, Any]
    recovery: dict[str, int]  # what start-up reconciliation found (committed, lost, ...)


@dataclass(frozen=True)
class InventoryEntry:
    """A token object on this node: its handle and a fingerprint of its attributes, owner,
    sharing and material version (equal fingerprints = identical objects)."""

    handle: int
    fingerprint: bytes


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    time_us: int
    event: str
    fields: dict[str, Any]
