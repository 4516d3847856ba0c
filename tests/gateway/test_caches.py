"""The gateway's caches are bounded least-recently-used tables: at the bound the oldest entry
goes, never the whole table (which would send every login's next *Init back to the HSM)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from hsmsim.cluster.api import Login
from hsmsim.gateway import caches
from hsmsim.gateway.caches import KeyChecks, MechanismCache
from hsmsim.gateway.config import GatewayConfig
from hsmsim.gateway.params import DecodedMechanism
from hsmsim.gateway.state import Application, OpKind
from hsmsim.pkcs11.constants import Attribute as A, KeyType, Mechanism as M, UserType
from hsmsim.pkcs11.mechanisms import MECHANISMS
from hsmsim.pkcs11.params import MechanismSpec
from hsmsim.pkcs11.values import AttributeResult


class _Cluster:
    """The one cluster call KeyChecks makes: every key is an AES key that allows the use."""

    def __init__(self) -> None:
        self.calls = 0

    async def get_attributes(self, login: Login, handle: int,
                             attrs: Sequence[int]) -> list[AttributeResult]:
        self.calls += 1
        return [AttributeResult(A.KEY_TYPE, KeyType.AES), AttributeResult(attrs[1], True)]


def test_key_checks_forget_the_least_recently_used_at_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(caches, "_MAX_CHECKS", 3)
    cluster = _Cluster()
    checks = KeyChecks(cluster, GatewayConfig(validate_key_cache_seconds=3600.0))  # type: ignore[arg-type]
    app = Application(b"t" * 16, 1)
    app.login = Login(7, UserType.USER, "cu")
    info = MECHANISMS[M.AES_GCM]

    async def run() -> None:
        for key in (1, 2, 3):
            await checks.check(app, key, OpKind.ENCRYPT, info)
        assert checks.validated(app, 1, OpKind.ENCRYPT, info)  # key 1 is now the most recent
        await checks.check(app, 4, OpKind.ENCRYPT, info)  # over the bound: key 2 goes
    asyncio.run(run())
    assert [checks.validated(app, k, OpKind.ENCRYPT, info) for k in (1, 2, 3, 4)] == [
        True, False, True, True]
    assert len(checks) == 3
    assert cluster.calls == 4


def test_mechanism_cache_forgets_the_least_recently_used_at_the_bound(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(caches, "_MAX_MECHANISMS", 3)
    cache = MechanismCache()
    info = MECHANISMS[M.AES_ECB]
    mech = DecodedMechanism(MechanismSpec(M.AES_ECB))
    for raw in (b"a", b"b", b"c"):
        cache.put(OpKind.ENCRYPT, raw, mech, info)
    assert cache.get(OpKind.ENCRYPT, b"a") is not None
    cache.put(OpKind.ENCRYPT, b"d", mech, info)
    assert [cache.get(OpKind.ENCRYPT, r) is not None for r in (b"a", b"b", b"c", b"d")] == [
        True, False, True, True]
    assert len(cache) == 3
