"""The KMS's records as frozen values: keys, key material, aliases, grants and custom key
stores. They hold metadata only: key material exists in memory solely inside the material
backends, and on disk only sealed."""

from __future__ import annotations

from dataclasses import dataclass

SYMMETRIC = "SYMMETRIC_DEFAULT"
RSA_SPECS = ("RSA_2048", "RSA_3072", "RSA_4096")
EC_SPECS = ("ECC_NIST_P256", "ECC_NIST_P384", "ECC_NIST_P521", "ECC_SECG_P256K1")
HMAC_SPECS = ("HMAC_224", "HMAC_256", "HMAC_384", "HMAC_512")
SUPPORTED_SPECS = (SYMMETRIC, *RSA_SPECS, *EC_SPECS, *HMAC_SPECS)

# Persistent key states; `Unavailable` is derived from the custom key store's connection.
ENABLED, DISABLED, PENDING_DELETION, PENDING_IMPORT = "Enabled", "Disabled", "PendingDeletion", "PendingImport"
# A multi-Region primary key scheduled for deletion while it still has replicas.
PENDING_REPLICA_DELETION = "PendingReplicaDeletion"
PENDING_STATES = (PENDING_DELETION, PENDING_REPLICA_DELETION)
UNAVAILABLE = "Unavailable"

AWS_KMS, AWS_CLOUDHSM, EXTERNAL = "AWS_KMS", "AWS_CLOUDHSM", "EXTERNAL"


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    arn: str
    created: float
    key_spec: str
    key_usage: str
    origin: str
    state: str
    policy: str
    description: str = ""
    deletion_date: float | None = None
    pending_window: int | None = None
    custom_key_store_id: str | None = None
    cluster_id: str | None = None
    backing_handle: int | None = None  # the cluster token key of an AWS_CLOUDHSM key
    tags: tuple[tuple[str, str], ...] = ()
    current_material: str | None = None
    rotation_enabled: bool = False
    rotation_period: int | None = None
    next_rotation: float | None = None
    on_demand_rotations: int = 0
    on_demand_started: float | None = None
    multi_region: bool = False
    # Multi-Region keys: every Region's record of the key (same key id, shared material) names
    # the primary's Region; the record in that Region is the primary, the others replicas.
    primary_region: str | None = None
    key_manager: str = "CUSTOMER"  # AWS for the aws/<service> keys KMS creates on first use
    valid_to: float | None = None  # imported material that expires
    expiration_model: str | None = None  # EXTERNAL keys: KEY_MATERIAL_(DOES_NOT_)EXPIRE(S)


@dataclass(frozen=True)
class MaterialRecord:
    """One backing key (an AWS "HBK"): `sealed` is the material AES-GCM-encrypted in the cluster
    under the KMS domain key, `public` the SubjectPublicKeyInfo DER of asymmetric keys."""

    material_id: str  # 64 hex chars
    key_id: str
    seq: int
    created: float
    sealed: bytes
    public: bytes = b""
    rotation_type: str | None = None  # AUTOMATIC | ON_DEMAND for rotated material


@dataclass(frozen=True)
class AliasRecord:
    name: str
    key_id: str
    created: float
    updated: float


@dataclass(frozen=True)
class GrantRecord:
    grant_id: str
    key_id: str
    token: str
    grantee: str
    operations: tuple[str, ...]
    issuing_account: str
    created: float
    name: str | None = None
    retiring: str | None = None
    ec_subset: tuple[tuple[str, str], ...] | None = None
    ec_equals: tuple[tuple[str, str], ...] | None = None


@dataclass(frozen=True)
class StoreRecord:
    """A custom key store of type AWS_CLOUDHSM. `password` is the kmsuser password KMS holds
    (as AWS KMS does, it must keep it to log in), stored sealed under the KMS domain key in the
    cluster ("sealed:<base64>"), never logged or returned."""

    store_id: str
    name: str
    cluster_id: str
    trust_anchor: str
    password: str
    created: float
    state: str = "DISCONNECTED"
    error_code: str | None = None
    pending_password: str | None = None
