"""The gateway's two caches, each bounded and each with its own rule for forgetting:
validate-key-at-init results per login, key and operation kind (`KeyChecks`: a time to live,
forgotten on destroy, logout and session close), and the decoded mechanisms of *Init requests
(`MechanismCache`: the same bytes always decode and check the same way). At its bound each
forgets its least recently used entry, never the whole table."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

from hsmsim.cluster.api import ClusterClient
from hsmsim.gateway.config import GatewayConfig
from hsmsim.gateway.params import DecodedMechanism
from hsmsim.gateway.policy import check_key_type
from hsmsim.gateway.reply import err
from hsmsim.gateway.state import Application, OpKind
from hsmsim.pkcs11.constants import RV, Attribute as A
from hsmsim.pkcs11.errors import Pkcs11Error
from hsmsim.pkcs11.mechanisms import MechanismInfo

_USAGE = {OpKind.ENCRYPT: A.ENCRYPT, OpKind.DECRYPT: A.DECRYPT, OpKind.SIGN: A.SIGN,
          OpKind.VERIFY: A.VERIFY}
_MAX_CHECKS = 100_000
_MAX_MECHANISMS = 1024


class KeyChecks:
    """UG:configure-sdk-5 validate-key-at-init: *Init checks the key with a round trip to the
    HSM. FIDELITY (GatewayConfig.validate_key_cache_seconds): a success is remembered per
    login, key and kind for that long."""

    def __init__(self, cluster: ClusterClient, config: GatewayConfig, limit: int | None = None) -> None:
        self.cluster = cluster
        self.config = config
        self.limit = _MAX_CHECKS if limit is None else limit  # at most this many results, the least recently used forgotten first
        self._results: OrderedDict[tuple[int, int, OpKind], tuple[float, Any]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._results)

    def validated(self, app: Application, key: int, kind: OpKind, info: MechanismInfo) -> bool:
        """True when the check needs no round trip (off, or a cached success); the cached key
        type is checked here."""
        if not self.config.validate_key_at_init:
            return True
        login = app.require_login()
        k = (login.login_id, key, kind)
        hit = self._results.get(k)
        if hit is None or hit[0] <= time.monotonic():
            return False
        self._results.move_to_end(k)
        check_key_type(hit[1], info)
        return True

    async def check(self, app: Application, key: int, kind: OpKind, info: MechanismInfo) -> None:
        """One round trip to check the key (callers first try `validated`)."""
        login = app.require_login()
        now = time.monotonic()
        try:
            res = await self.cluster.get_attributes(login, key, [A.KEY_TYPE, _USAGE[kind]])
        except Pkcs11Error as exc:
            if exc.rv in (RV.OBJECT_HANDLE_INVALID, RV.KEY_HANDLE_INVALID):
                raise err(RV.KEY_HANDLE_INVALID, "no such key") from None
            raise
        key_type, usage = res[0].value, res[1].value
        if usage is False:
            raise err(RV.KEY_FUNCTION_NOT_PERMITTED, f"the key does not allow {kind.value}")
        if self.config.validate_key_cache_seconds > 0:
            k = (login.login_id, key, kind)
            self._results[k] = (now + self.config.validate_key_cache_seconds, key_type)
            self._results.move_to_end(k)
            while len(self._results) > self.limit:
                self._results.popitem(last=False)
        check_key_type(key_type, info)

    def forget(self, *, handle: int | None = None, login_id: int | None = None) -> None:
        for k in [k for k in self._results if k[1] == handle or k[0] == login_id]:
            del self._results[k]


class MechanismCache:
    """*Init mechanism bytes (per kind) that decoded and passed the checks, with their result:
    at most `limit`, the least recently used forgotten first."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = _MAX_MECHANISMS if limit is None else limit
        self._known: OrderedDict[tuple[OpKind, bytes], tuple[DecodedMechanism, MechanismInfo]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._known)

    def get(self, kind: OpKind, raw: bytes) -> tuple[DecodedMechanism, MechanismInfo] | None:
        hit = self._known.get((kind, raw))
        if hit is not None:
            self._known.move_to_end((kind, raw))
        return hit

    def put(self, kind: OpKind, raw: bytes, mech: DecodedMechanism, info: MechanismInfo) -> None:
        self._known[(kind, raw)] = (mech, info)
        self._known.move_to_end((kind, raw))
        while len(self._known) > self.limit:
            self._known.popitem(last=False)
