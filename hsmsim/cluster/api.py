"""The contract between the cluster and its clients (the PKCS#11 gateway, the KMS and the
control API): what a logged-in application may ask of the cluster, and the values it gets back.

The cluster routes each call to a healthy node that holds the object, syncs token objects to
the other nodes (acknowledging creation per the key availability check), retries throttled or
lost calls, and raises `hsmsim.pkcs11.errors.Pkcs11Error` with CloudHSM's return values.
Handles are cluster-wide: the same number on every node."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from hsmsim.pkcs11.attributes import Template
from hsmsim.pkcs11.constants import UserType
from hsmsim.pkcs11.params import MechanismSpec
from hsmsim.pkcs11.values import AttributeResult as AttributeResult  # re-exported: part of the contract
from hsmsim.pkcs11.values import EncryptResult as EncryptResult


@dataclass(frozen=True)
class Login:
    """An authenticated application: one C_Login shared by all its sessions."""

    login_id: int
    user_type: UserType
    username: str


@dataclass(frozen=True)
class UserInfo:
    username: str
    role: str  # "admin" (CO), "crypto-user" (CU), "appliance-user" / "kmsuser" roles per CloudHSM CLI
    locked: bool
    failed_logins: int


@dataclass(frozen=True)
class HsmInfo:
    hsm_id: str
    az: str
    state: str  # CloudHSMv2 HsmState: CREATE_IN_PROGRESS | ACTIVE | DEGRADED | DELETE_IN_PROGRESS | DELETED
    keys: int
    sync_lag: int
    last_error: str | None


@dataclass(frozen=True)
class ClusterInfo:
    cluster_id: str
    state: str  # CloudHSMv2 ClusterState, e.g. ACTIVE, DEGRADED
    hsms: tuple[HsmInfo, ...]
    ca_cert_pem: bytes  # the cluster's trust anchor (issuing CA certificate)


@dataclass(frozen=True)
class DirectRoute:
    """One HSM an application may call directly for a key (docs/direct-protocol.md): its
    direct listener, the ticket bound to the application's login there, the key that MACs
    operation descriptors for that ticket (never given to the application), and how long the
    module waits for an answer before handing the call to the daemon."""

    address: str
    ticket: bytes
    key: bytes
    timeout_s: float


class DirectRouting(Protocol):
    """Implemented by the daemon's cluster (not by every ClusterClient): the HSMs holding a key
    that the application may call directly, in the order the cluster would balance them."""

    async def direct_route(self, login: Login, handle: int) -> list[DirectRoute]: ...
    def direct_route_cached(self, login: Login, handle: int) -> list[DirectRoute] | None:
        """direct_route() without waiting, or None when it would have to wait (a ticket)."""
        ...


class ClusterClient(Protocol):
    """What the gateway and the KMS call. `session` is the owning PKCS#11 session (or any
    client-chosen number) for session objects (CKA_TOKEN false), which live on one node and die
    with `close_session(session)` or with their node."""

    async def info(self) -> ClusterInfo: ...

    # -- login (one per application; CloudHSM logs in to every HSM) ------------------------------
    async def login(self, user_type: UserType, username: str, password: str) -> Login: ...
    async def logout(self, login: Login) -> None: ...

    # -- objects ---------------------------------------------------------------------------------
    async def generate_key(self, login: Login, mech: MechanismSpec, template: Template,
                           session: int) -> int: ...
    async def generate_key_pair(self, login: Login, mech: MechanismSpec, public: Template,
                                private: Template, session: int) -> tuple[int, int]: ...
    async def create_object(self, login: Login, template: Template, session: int) -> int: ...
    async def copy_object(self, login: Login, handle: int, template: Template, session: int) -> int: ...
    async def destroy_object(self, login: Login, handle: int) -> None: ...
    async def get_attributes(self, login: Login, handle: int,
                             attrs: Sequence[int]) -> list[AttributeResult]: ...
    async def set_attributes(self, login: Login, handle: int, template: Template) -> None: ...
    async def find_objects(self, login: Login, template: Template,
                           session: int, as_user: str | None = None) -> list[int]: ...
    async def close_session(self, login: Login | None, session: int) -> None: ...

    # -- crypto (single-part: the gateway buffers multi-part input and hashes locally) ------------
    async def encrypt(self, login: Login, handle: int, mech: MechanismSpec, data: bytes) -> EncryptResult: ...
    async def decrypt(self, login: Login, handle: int, mech: MechanismSpec, data: bytes) -> bytes: ...
    async def sign(self, login: Login, handle: int, mech: MechanismSpec, data: bytes) -> bytes: ...
    async def verify(self, login: Login, handle: int, mech: MechanismSpec, data: bytes,
                     signature: bytes) -> None: ...  # CKR_SIGNATURE_INVALID on mismatch
    async def wrap_key(self, login: Login, wrapping: int, mech: MechanismSpec, key: int) -> bytes: ...
    async def unwrap_key(self, login: Login, unwrapping: int, mech: MechanismSpec, wrapped: bytes,
                         template: Template, session: int) -> int: ...
    async def derive_key(self, login: Login, base: int, mech: MechanismSpec, template: Template,
                         session: int) -> int: ...
    async def generate_random(self, login: Login | None, length: int) -> bytes: ...

    # -- users and sharing (CloudHSM CLI verbs; CO for user management) ---------------------------
    async def create_user(self, login: Login, username: str, role: str, password: str) -> None: ...
    async def delete_user(self, login: Login, username: str) -> None: ...
    async def change_password(self, login: Login, username: str, password: str) -> None: ...
    async def unlock_user(self, login: Login, username: str) -> None: ...
    async def list_users(self, login: Login) -> list[UserInfo]: ...
    async def share_key(self, login: Login, handle: int, username: str) -> None: ...
    async def unshare_key(self, login: Login, handle: int, username: str) -> None: ...


class Service(Protocol):
    """What `start_gateway` and `start_kms` return to the daemon: a running service that the
    daemon stops with `await service.close()` on shutdown (close must be idempotent)."""

    async def close(self) -> None: ...
