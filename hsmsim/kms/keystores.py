"""Custom key stores of type AWS_CLOUDHSM backed by the hsmsim cluster: the checks that
CreateCustomKeyStore / UpdateCustomKeyStore make against the real cluster, and the connection
state machine (DISCONNECTED -> CONNECTING -> CONNECTED | FAILED, DISCONNECTING -> DISCONNECTED)
driven by actually logging in as `kmsuser`, rotating its password, and staying logged in while
connected."""

from __future__ import annotations

import asyncio
import base64
import secrets
import string
from collections.abc import Awaitable, Callable
from dataclasses import replace

from cryptography import x509

from hsmsim.cluster.api import ClusterClient, ClusterInfo, Login
from hsmsim.kms import errors as e
from hsmsim.kms.material import ClusterFailure, ClusterKeys, Fleet
from hsmsim.kms.model import StoreRecord
from hsmsim.kms.store import Store
from hsmsim.pkcs11.constants import RV, UserType
from hsmsim.pkcs11.errors import Pkcs11Error

KMS_USER = "kmsuser"
RESUME_PATIENCE = 300.0  # seconds a restarted store waits for its hosted cluster to be back
CONNECTED, CONNECTING, DISCONNECTED, DISCONNECTING, FAILED = (
    "CONNECTED", "CONNECTING", "DISCONNECTED", "DISCONNECTING", "FAILED")


def active_hsms(info: ClusterInfo) -> list[str]:
    return [h.az for h in info.hsms if h.state == "ACTIVE"]


def same_certificate(a_pem: str | bytes, b_pem: str | bytes) -> bool:
    """Whether two PEM certificates are the same certificate (DER compare)."""
    try:
        a = x509.load_pem_x509_certificate(a_pem.encode() if isinstance(a_pem, str) else a_pem)
        b = x509.load_pem_x509_certificate(b_pem.encode() if isinstance(b_pem, str) else b_pem)
    except ValueError:
        return False
    return a == b


# (cluster id, Region) -> the cluster (its client and the control plane's view of it) or None
ClusterLookup = Callable[[str, str], Awaitable[tuple[ClusterClient, ClusterInfo] | None]]


class ClusterDirectory:
    """The clusters custom key stores may name: the daemon's own cluster (`first`, in the KMS's
    default Region), and those `lookup` finds: the daemon sets it, once the CloudHSMv2 plane
    serves, to the plane's view of the clusters CreateCluster made (id, state, HSMs and their
    states, trust anchor = the certificate given to InitializeCluster), with the cluster each
    is served by. `serving(cluster_id)` gives the client currently serving a cluster other than
    the first (None once it stopped or was deleted). One per KMS endpoint, shared by its
    Regions."""

    def __init__(self, first: ClusterClient) -> None:
        self.first = first
        self.lookup: ClusterLookup | None = None
        self.serving: Callable[[str], ClusterClient | None] | None = None
        # (cluster id, Region) -> whether the cluster exists (not deleted), served or not
        self.exists: Callable[[str, str], bool] | None = None
        # (a, b) -> whether two clusters share a backup history (UpdateCustomKeyStore)
        self.related: Callable[[str, str], bool] | None = None

    async def find(self, cluster_id: str, region: str,
                   first_here: bool) -> tuple[ClusterClient, ClusterInfo] | None:
        """The cluster `cluster_id` of `region`, or None. Errors reaching the first cluster
        propagate (Pkcs11Error) unless another cluster answers to the id."""
        if self.lookup is not None:
            found = await self.lookup(cluster_id, region)
            if found is not None:
                return found
        if not first_here:
            return None
        info = await self.first.info()
        return (self.first, info) if info.cluster_id == cluster_id else None

    def gone(self, cluster_id: str, client: ClusterClient) -> bool:
        """Whether `client`, a cluster other than the first that KMS logged in to as
        `cluster_id`, no longer serves it (stopped, deleted, or served anew since)."""
        return client is not self.first and self.serving is not None and self.serving(cluster_id) is not client


def _new_password() -> str:
    # CloudHSM kmsuser passwords: 7-32 alphanumeric characters.
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(32))


class KeyStores:
    def __init__(self, cluster: ClusterClient, store: Store, fleet: Fleet, cluster_here: bool = True,
                 clusters: ClusterDirectory | None = None, keys: ClusterKeys | None = None,
                 region: str = "") -> None:
        self._cluster = cluster
        self._cluster_here = cluster_here
        self._clusters = clusters or ClusterDirectory(cluster)
        self._keys = keys
        self._region = region
        self._store = store
        self._fleet = fleet
        self._logins: dict[str, Login] = {}
        self._clients: dict[str, ClusterClient] = {}  # store id -> the cluster of its login
        self._tasks: dict[str, asyncio.Task[None]] = {}

    async def seal_password(self, store_id: str, password: str) -> str:
        """The form a kmsuser password is stored in: sealed under the KMS domain key."""
        try:
            sealed = await self._fleet.seal_secret(f"kmsuser-password:{store_id}", password.encode())
        except ClusterFailure:
            raise e.DependencyTimeout("KMS could not reach its key material store.") from None
        return "sealed:" + base64.b64encode(sealed).decode()

    async def _open_password(self, store_id: str, stored: str) -> str:
        if not stored.startswith("sealed:"):
            return stored
        raw = await self._fleet.unseal_secret(f"kmsuser-password:{store_id}", base64.b64decode(stored[7:]))
        return raw.decode()

    def connected(self, store_id: str) -> bool:
        self.check_served()
        s = self._store.stores.get(store_id)
        return s is not None and s.state == CONNECTED and store_id in self._logins

    def check_served(self) -> None:
        """Stores logged in to a cluster that is no longer served (a hosted cluster stopped or
        deleted) are DISCONNECTED, as KMS disconnects a store whose cluster it lost.
        FIDELITY: checked at the KMS's requests (AWS disconnects the store by itself)."""
        for store_id, client in list(self._clients.items()):
            s = self._store.stores.get(store_id)
            if s is not None and self._clusters.gone(s.cluster_id, client):
                login = self._logins.pop(store_id, None)
                self._clients.pop(store_id, None)
                if login is not None and self._keys is not None:
                    self._keys.unbind(login)
                if s.state in (CONNECTED, CONNECTING):
                    self._store.put_store(replace(s, state=DISCONNECTED, error_code=None))

    def login(self, store_id: str) -> Login | None:
        return self._logins.get(store_id) if self.connected(store_id) else None

    async def cluster_info(self, cluster_id: str) -> ClusterInfo:
        """The cluster a store names; CloudHsmClusterNotFound unless the daemon serves it in
        this Region (the first cluster, or one CreateCluster made here)."""
        try:
            found = await self._clusters.find(cluster_id, self._region, self._cluster_here)
        except Pkcs11Error:
            found = None
        if found is None:
            raise e.ClusterNotFound(f"Cluster {cluster_id} was not found.")
        return found[1]

    async def check_for_create(self, cluster_id: str, trust_anchor: str | None) -> ClusterInfo:
        info = await self.cluster_info(cluster_id)
        if info.state not in ("ACTIVE", "DEGRADED"):
            raise e.ClusterNotActive(f"Cluster {cluster_id} is not active.")
        if trust_anchor is not None and not same_certificate(trust_anchor, info.ca_cert_pem):
            raise e.IncorrectTrustAnchor(
                f"The trust anchor certificate does not match the issuing certificate of cluster {cluster_id}.")
        self.require_two_azs(info)
        return info

    def check_related(self, current: str, anchor: str, info: ClusterInfo) -> None:
        """UpdateCustomKeyStore: a store moves only to a cluster sharing its cluster's backup
        history (CloudHSM gives those the same cluster certificate). Without the plane (the
        first cluster alone) the trust anchors are compared."""
        related = self._clusters.related
        ok = (related(current, info.cluster_id) if related is not None
              else same_certificate(anchor, info.ca_cert_pem))
        if not ok:
            raise e.ClusterNotRelated(f"Cluster {info.cluster_id} is not related to the custom key "
                                      "store's cluster: it does not share its backup history.")

    @staticmethod
    def require_two_azs(info: ClusterInfo) -> None:
        azs = active_hsms(info)
        if len(azs) < 2 or len(set(azs)) < 2:
            raise e.ClusterInvalidConfiguration(
                f"The cluster {info.cluster_id} must contain at least two active HSMs, each in a "
                "different Availability Zone.")

    # -- connection state machine -------------------------------------------------------------
    # FIDELITY: connecting takes well under a second here (AWS: up to 20 minutes). USER_LOGGED_IN
    # needs the cluster to report kmsuser's other logins (`UserInfo.logged_in`), or to refuse
    # its login / password change with CKR_USER_(ANOTHER_)ALREADY_LOGGED_IN.
    def start_connect(self, store_id: str) -> None:
        s = self._store.stores[store_id]
        self._store.put_store(replace(s, state=CONNECTING, error_code=None))
        self._tasks[store_id] = asyncio.get_running_loop().create_task(self._connect(store_id))

    async def _fail(self, store_id: str, code: str) -> None:
        s = self._store.stores.get(store_id)
        if s is not None:
            self._store.put_store(replace(s, state=FAILED, error_code=code))

    async def _connect(self, store_id: str) -> None:
        s = self._store.stores[store_id]
        try:
            found = await self._clusters.find(s.cluster_id, self._region, self._cluster_here)
        except Exception:
            return await self._fail(store_id, "NETWORK_ERRORS")
        if found is None:
            # a cluster that exists but is not served has no HSM (its last was deleted) or
            # none running (`hsmsim down` of a hosted cluster)
            exists = self._clusters.exists
            if exists is not None and exists(s.cluster_id, self._region):
                return await self._fail(store_id, "INSUFFICIENT_CLOUDHSM_HSMS")
            return await self._fail(store_id, "CLUSTER_NOT_FOUND")
        cluster, info = found
        if not active_hsms(info):
            return await self._fail(store_id, "INSUFFICIENT_CLOUDHSM_HSMS")
        if await self._logged_in_elsewhere(cluster):
            return await self._fail(store_id, "USER_LOGGED_IN")
        login: Login | None = None
        try:
            candidates = [(await self._open_password(store_id, v), v)
                          for v in (s.password, s.pending_password) if v]
        except ClusterFailure:
            return await self._fail(store_id, "INTERNAL_ERROR")
        for password, stored in candidates:
            try:
                login = await cluster.login(UserType.USER, KMS_USER, password)
                if stored != s.password:
                    s = replace(s, password=stored)
                break
            except Pkcs11Error as exc:
                code = await self._login_failure(exc, cluster)
                if code != "INVALID_CREDENTIALS":
                    return await self._fail(store_id, code)
        if login is None:
            return await self._fail(store_id, "INVALID_CREDENTIALS")
        try:
            await self._rotate_password(store_id, s, login, cluster)
        except asyncio.CancelledError:  # disconnected meanwhile: do not leave kmsuser logged in
            asyncio.get_running_loop().create_task(self._safe_logout(login, cluster))
            raise

    async def _rotate_password(self, store_id: str, s: StoreRecord, login: Login,
                               cluster: ClusterClient) -> None:
        """Rotates the kmsuser password (remembering the new one before the cluster changes it)
        and marks the store CONNECTED."""
        new_password = _new_password()
        try:
            sealed_new = await self.seal_password(store_id, new_password)
        except e.KmsError:
            await self._safe_logout(login, cluster)
            return await self._fail(store_id, "INTERNAL_ERROR")
        self._store.put_store(replace(self._store.stores[store_id], password=s.password,
                                      pending_password=sealed_new))
        try:
            await cluster.change_password(login, KMS_USER, new_password)
        except Pkcs11Error as exc:
            await self._safe_logout(login, cluster)
            self._store.put_store(replace(self._store.stores[store_id], pending_password=None))
            return await self._fail(store_id, await self._login_failure(exc, cluster))
        current = self._store.stores.get(store_id)
        if current is None or current.state != CONNECTING:
            await self._safe_logout(login, cluster)
            return
        self._logins[store_id] = login
        self._clients[store_id] = cluster
        if cluster is not self._cluster and self._keys is not None:
            self._keys.bind(login, cluster)  # the store's keys' crypto goes to its cluster
        self._store.put_store(replace(current, password=sealed_new, pending_password=None,
                                      state=CONNECTED, error_code=None))

    async def _login_failure(self, exc: Pkcs11Error, cluster: ClusterClient) -> str:
        rv = exc.rv
        if rv == RV.PIN_LOCKED:
            return "USER_LOCKED_OUT"
        if rv in (RV.USER_ALREADY_LOGGED_IN, RV.USER_ANOTHER_ALREADY_LOGGED_IN):
            return "USER_LOGGED_IN"
        if rv in (RV.PIN_INCORRECT, RV.PIN_INVALID, RV.USER_PIN_NOT_INITIALIZED, RV.USER_TYPE_INVALID):
            # CloudHSM answers an unknown user like a wrong password; ask the user list.
            if await self._user_missing(cluster):
                return "USER_NOT_FOUND"
            return "INVALID_CREDENTIALS"
        if rv in (RV.DEVICE_ERROR, RV.DEVICE_REMOVED, RV.TOKEN_NOT_PRESENT):
            return "INSUFFICIENT_CLOUDHSM_HSMS"
        return "INTERNAL_ERROR"

    async def _logged_in_elsewhere(self, cluster: ClusterClient) -> bool:
        """Whether kmsuser has a login in the cluster already. Uses `UserInfo.logged_in` (a count)
        when the cluster reports it; a cluster that does not is taken to say no.
        FIDELITY: the user list is read with the KMS fleet's login, which exists in the first
        cluster only: in another cluster these checks say no (USER_LOGGED_IN and USER_NOT_FOUND
        are then not told apart from the login's own failure, INVALID_CREDENTIALS)."""
        if cluster is not self._cluster:
            return False
        try:
            login = await self._fleet.any_login()
            users = await self._cluster.list_users(login)
        except Exception:
            return False
        return any(u.username == KMS_USER and int(getattr(u, "logged_in", 0) or 0) > 0 for u in users)

    async def _user_missing(self, cluster: ClusterClient) -> bool:
        if cluster is not self._cluster:
            return False
        try:
            login = await self._fleet.any_login()
            users = await self._cluster.list_users(login)
        except Exception:
            return False
        for u in users:
            if u.username == KMS_USER:
                return False
        return True

    async def _safe_logout(self, login: Login, cluster: ClusterClient | None = None) -> None:
        if self._keys is not None:
            self._keys.unbind(login)
        try:
            await (cluster or self._cluster).logout(login)
        except Exception:
            pass

    async def disconnect(self, store_id: str) -> None:
        task = self._tasks.pop(store_id, None)
        if task is not None and not task.done():
            task.cancel()
        s = self._store.stores[store_id]
        self._store.put_store(replace(s, state=DISCONNECTING))
        login = self._logins.pop(store_id, None)
        client = self._clients.pop(store_id, None)
        if login is not None:
            await self._safe_logout(login, client)
        s = self._store.stores[store_id]
        self._store.put_store(replace(s, state=DISCONNECTED, error_code=None))

    def mark_lost(self, store_id: str) -> None:
        """The store's login stopped working (cluster gone): it is disconnected."""
        login = self._logins.pop(store_id, None)
        self._clients.pop(store_id, None)
        if login is not None and self._keys is not None:
            self._keys.unbind(login)

    async def resume(self) -> None:
        """After a restart: stores that were connected (or connecting) connect again; those on
        a cluster other than the first once it is served again (the plane restarts the clusters
        it hosts after the KMS started)."""
        first: str | None = None
        try:
            first = (await self._cluster.info()).cluster_id
        except Exception:
            pass
        for s in list(self._store.stores.values()):
            if s.state in (CONNECTED, CONNECTING):
                if first is not None and s.cluster_id != first:
                    self._store.put_store(replace(s, state=CONNECTING, error_code=None))
                    self._tasks[s.store_id] = asyncio.get_running_loop().create_task(
                        self._connect_when_served(s.store_id))
                    continue
                self.start_connect(s.store_id)
            elif s.state == DISCONNECTING:
                self._store.put_store(replace(s, state=DISCONNECTED))

    async def _connect_when_served(self, store_id: str, patience: float = RESUME_PATIENCE) -> None:
        """Connects a store on a cluster other than the first once that cluster is served with
        an ACTIVE HSM (the plane restarts it in the background), or after `patience` seconds
        (then the connection fails as the cluster's state says)."""
        s = self._store.stores[store_id]
        deadline = asyncio.get_running_loop().time() + patience
        while asyncio.get_running_loop().time() < deadline:
            try:
                found = await self._clusters.find(s.cluster_id, self._region, self._cluster_here)
            except Exception:
                found = None
            if found is not None and active_hsms(found[1]):
                break
            await asyncio.sleep(0.5)
        await self._connect(store_id)

    async def wait(self, store_id: str) -> None:
        task = self._tasks.get(store_id)
        if task is not None:
            await asyncio.shield(task)

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        for store_id, login in self._logins.items():
            await self._safe_logout(login, self._clients.get(store_id))
        self._logins.clear()
        self._clients.clear()
