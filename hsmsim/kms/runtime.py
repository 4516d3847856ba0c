"""The KMS's running state shared by the operation handlers: configuration, store, clock,
material backends, custom key stores, and the lookups and checks every operation needs
(resolving a KeyId, the key-state matrix, key usage, access control)."""

from __future__ import annotations

import hmac
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any
from pathlib import Path

from hsmsim.cluster.api import ClusterClient
from hsmsim.kms import errors as e
from hsmsim.kms import model, policy
from hsmsim.kms.clock import Clock, stored_offset
from hsmsim.kms.config import KmsConfig
from hsmsim.kms.keystores import ClusterDirectory, KeyStores
from hsmsim.kms.material import ClusterKeys, Fleet
from hsmsim.kms.model import KeyRecord
from hsmsim.kms.policy import Caller
from hsmsim.kms.store import Store

KEY_ID_RE = re.compile(r"^(?:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|mrk-[0-9a-f]{32})$")
DAY = 86400.0


class Kms:
    """The KMS of one Region. The Regions of one endpoint share the database (each sees its own
    keys, aliases, grants and custom key stores), the clock, the key-material fleet and the
    cluster; `in_region` gives another Region's KMS."""

    def __init__(self, cluster: ClusterClient, config: KmsConfig, state_dir: Path, store: Store,
                 region: str | None = None, home: Kms | None = None,
                 clusters: ClusterDirectory | None = None) -> None:
        self.cluster = cluster
        self.config = config
        self.state_dir = state_dir
        self._region = region or config.region
        self.store = store.view(self._region)
        self.principals = config.principal_table()
        if home is None:
            self.home: Kms = self
            self.clock = Clock(stored_offset(store.get_meta("clock_offset")))
            self.fleet = Fleet(cluster, state_dir)
            self.cluster_keys = ClusterKeys(cluster)
            # the clusters custom key stores may name (the daemon adds the CloudHSMv2 plane's)
            self.clusters = clusters or ClusterDirectory(cluster)
            self._regions: dict[str, Kms] = {self._region: self}
            start = store.get_meta("tracking_start")
            if start is None:
                start = repr(self.clock.now())
                store.set_meta("tracking_start", start)
            self.tracking_start = float(start)
        else:
            self.home = home
            self.clock = home.clock
            self.fleet = home.fleet
            self.cluster_keys = home.cluster_keys
            self.clusters = home.clusters
            self._regions = home._regions
            self.tracking_start = home.tracking_start
        # FIDELITY: the first cluster (`hsmsim up`'s) lives in the default Region ([kms] region);
        # in any other Region its cluster id is CloudHsmClusterNotFoundException, as a cluster
        # of another Region is on AWS. A cluster CreateCluster made is in the Region it was
        # created in.
        self.keystores = KeyStores(cluster, self.store, self.fleet, cluster_here=self._region == config.region,
                                   clusters=self.clusters, keys=self.cluster_keys, region=self._region)
        self.last_usage: dict[str, dict[str, Any]] = self.store.last_usage()
        self._usage_dirty: dict[str, dict[str, Any]] = {}

    def in_region(self, region: str) -> Kms:
        """The KMS of `region` (one of the configured Regions) on this endpoint."""
        found = self._regions.get(region)
        if found is None:
            found = Kms(self.cluster, self.config, self.state_dir, self.store, region, self.home)
            self._regions[region] = found
        return found

    def regional(self) -> list[Kms]:
        """The Regions' KMSs in use so far (every Region with stored keys or stores included
        once `open_stored_regions` ran)."""
        return list(self._regions.values())

    def open_stored_regions(self) -> None:
        for region in self.store.regions():
            if region in self.config.allowed_regions:
                self.in_region(region)

    def used(self, key_id: str, op: str, when: float, event_id: str, request_id: str) -> None:
        """Remembers a key's last successful cryptographic operation (GetKeyLastUsage)."""
        row = {"Operation": op, "Timestamp": when, "CloudTrailEventId": event_id, "KmsRequestId": request_id}
        self.last_usage[key_id] = row
        self._usage_dirty[key_id] = row

    def flush_usage(self) -> None:
        # FIDELITY: usage tracking is saved by the periodic sweep, so a kill -9 may lose the
        # last few seconds of it (keys, aliases, grants and material are committed per call).
        if self._usage_dirty:
            rows, self._usage_dirty = self._usage_dirty, {}
            self.store.put_last_usage(rows)

    # -- identifiers ------------------------------------------------------------------------
    @property
    def region(self) -> str:
        return self._region

    @property
    def account(self) -> str:
        return self.config.account_id

    def key_arn(self, key_id: str) -> str:
        return f"arn:aws:kms:{self.region}:{self.account}:key/{key_id}"

    def alias_arn(self, name: str) -> str:
        return f"arn:aws:kms:{self.region}:{self.account}:{name}"

    @staticmethod
    def new_key_id(multi_region: bool = False) -> str:
        return f"mrk-{uuid.uuid4().hex}" if multi_region else str(uuid.uuid4())

    def _split_arn(self, ref: str) -> tuple[str, str]:
        parts = ref.split(":", 5)
        if len(parts) != 6 or parts[1] not in ("aws", "aws-cn", "aws-us-gov") or parts[2] != "kms":
            raise e.InvalidArn(f"Invalid arn {ref}")
        if parts[3] != self.region or parts[4] != self.account:
            # A Region's KMS knows only its own keys and aliases: another Region's ARN (a
            # multi-Region key's other Regions included) names nothing here.
            # FIDELITY: one account; other accounts' ARNs name nothing either (no cross-account use).
            if "/" not in parts[5]:
                raise e.NotFound(f"Invalid arn {ref}")
            raise e.NotFound(f"Alias {ref} is not found." if parts[5].startswith("alias/") else
                             f"Key '{ref}' does not exist")
        kind, _, name = parts[5].partition("/")
        if kind not in ("key", "alias") or not name:
            raise e.InvalidArn(f"Invalid arn {ref}")
        return kind, name

    def resolve(self, ref: str, *, aliases: bool = True) -> KeyRecord:
        """The key a KeyId parameter names: key id, key ARN, and (when `aliases`) alias name or
        alias ARN."""
        kind, name = ("key", ref)
        if ref.startswith("arn:"):
            kind, name = self._split_arn(ref)
            if kind == "alias":
                name = "alias/" + name
        elif ref.startswith("alias/"):
            kind = "alias"
        if kind == "alias":
            if not aliases:
                raise e.NotFound(f"Invalid keyId {ref}")
            alias = self.store.aliases.get(name)
            if alias is None:
                raise e.NotFound(f"Alias {self.alias_arn(name)} is not found.")
            key = self.store.keys.get(alias.key_id)
            if key is None:
                raise e.NotFound(f"Alias {self.alias_arn(name)} is not found.")
            return key
        if not KEY_ID_RE.match(name):
            raise e.NotFound(f"Invalid keyId '{ref}'")
        key = self.store.keys.get(name)
        if key is None:
            raise e.NotFound(f"Key '{self.key_arn(name)}' does not exist")
        return key

    # -- key state --------------------------------------------------------------------------
    def state_of(self, key: KeyRecord) -> str:
        """The KeyState shown to clients: Unavailable while the key's store is not connected
        (PendingDeletion is kept)."""
        if key.custom_key_store_id and key.state not in model.PENDING_STATES:
            if not self.keystores.connected(key.custom_key_store_id):
                return model.UNAVAILABLE
        return key.state

    def require_usable(self, key: KeyRecord) -> None:
        """Key-state matrix for cryptographic operations."""
        state = self.state_of(key)
        if state == model.ENABLED:
            return
        if state == model.DISABLED:
            raise e.Disabled(f"{key.arn} is disabled.")
        if state == model.PENDING_DELETION:
            raise e.InvalidState(f"{key.arn} is pending deletion.")
        if state == model.PENDING_REPLICA_DELETION:
            raise e.InvalidState(f"{key.arn} is pending replica deletion.")
        if state == model.PENDING_IMPORT:
            raise e.InvalidState(f"{key.arn} is pending import.")
        raise e.InvalidState(f"{key.arn} is unavailable.")

    def require_not_pending_deletion(self, key: KeyRecord) -> None:
        if key.state == model.PENDING_DELETION:
            raise e.InvalidState(f"{key.arn} is pending deletion.")
        if key.state == model.PENDING_REPLICA_DELETION:
            raise e.InvalidState(f"{key.arn} is pending replica deletion.")

    # -- multi-Region keys ----------------------------------------------------------------------
    def is_replica(self, key: KeyRecord) -> bool:
        return key.multi_region and key.primary_region not in (None, self.region)

    def primary_of(self, key: KeyRecord) -> KeyRecord:
        """The primary key of a multi-Region key (the key itself when it is the primary)."""
        if not self.is_replica(key):
            return key
        assert key.primary_region is not None
        return self.store.key_in(key.primary_region, key.key_id) or key

    def key_arn_in(self, region: str, key_id: str) -> str:
        return f"arn:aws:kms:{region}:{self.account}:key/{key_id}"

    @staticmethod
    def require_usage(key: KeyRecord, usage: str, op: str) -> None:
        if key.key_usage != usage:
            raise e.InvalidKeyUsage(f"{key.arn} key usage is {key.key_usage} which is not valid for {op}.")

    # -- access -----------------------------------------------------------------------------
    def caller_for(self, access_key: str | None) -> Caller:
        if access_key and access_key in self.principals:
            arn = self.principals[access_key][0]
            parts = arn.split(":")
            account = parts[4] if len(parts) > 4 and parts[4].isdigit() else self.account
            return Caller(arn, account, access_key)
        return Caller(self.config.root_arn, self.account, access_key or "")

    def authorize(self, caller: Caller, key: KeyRecord, action: str,
                  context: Mapping[str, str] | None = None,
                  grant_tokens: Sequence[str] | None = None, grant_op: str | None = None) -> None:
        """Key policy and grants (when enforcement is on); AccessDenied otherwise."""
        if not self.config.enforce_policies:
            return
        ctx = context or {}
        verdict = policy.evaluate(key.policy, caller, action, ctx)
        if verdict == "Deny":
            self._deny(caller, key, action, "with an explicit deny in a resource-based policy")
        if verdict == "Allow":
            return
        # FIDELITY: grants are consistent immediately (AWS: eventually, GrantTokens for now).
        op = grant_op or action
        for grant in self.store.grants(key.key_id):
            if policy.grant_allows(grant, caller, op, ctx):
                return
        self._deny(caller, key, action, "because no resource-based policy allows the "
                   f"kms:{action} action")

    def check_grant_tokens(self, tokens: Sequence[str]) -> None:
        """InvalidGrantToken unless every token names a grant of this KMS."""
        for token in tokens:
            parts = token.split(":")
            grant = self.store.grant(parts[1]) if len(parts) == 3 and parts[0] == "hsmsim-grant" else None
            if grant is None or not hmac.compare_digest(grant.token, token):
                raise e.InvalidGrantToken("The grant token is not valid.")

    @staticmethod
    def _deny(caller: Caller, key: KeyRecord, action: str, why: str) -> None:
        raise e.AccessDenied(f"User: {caller.arn} is not authorized to perform: kms:{action} "
                             f"on resource: {key.arn} {why}")
