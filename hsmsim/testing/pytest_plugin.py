"""The `hsmsim` pytest plugin (registered through the pytest11 entry point): fixtures that start
a throw-away cluster for users' tests.

    def test_sign(hsmsim_cluster):
        lib = hsmsim_cluster.pkcs11_lib()   # python-pkcs11, initialised against this cluster
        ...
        hsmsim_cluster.kill(hsmsim_cluster.hsm_ids[0])          # fault injection

Fixtures: `hsmsim_cluster` (per test, in tmp_path), `hsmsim_session_cluster` (one per test
session), `hsmsim_cluster_factory` (call it with azs=..., extra_args=... for other shapes).
Importing this module is cheap; nothing starts until a fixture is used."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from hsmsim.testing.cluster import HsmsimCluster


def _start(path: Path, **kw: Any) -> "HsmsimCluster":
    try:
        from hsmsim.resources import softhsm_library
        softhsm_library()
    except FileNotFoundError as exc:
        pytest.skip(f"hsmsim cluster unavailable: {exc}")
    from hsmsim.testing.cluster import ClusterStartError, start_cluster
    try:
        return start_cluster(path, **kw)
    except ClusterStartError as exc:
        pytest.fail(f"the hsmsim cluster did not start:\n{exc}", pytrace=False)
        raise  # unreachable


@pytest.fixture
def hsmsim_cluster_factory(tmp_path_factory: pytest.TempPathFactory
                           ) -> Iterator[Callable[..., "HsmsimCluster"]]:
    """Start clusters with other shapes: factory(azs=1, extra_args=["--disable-key-availability-check"])."""
    started: list["HsmsimCluster"] = []

    def factory(**kw: Any) -> "HsmsimCluster":
        c = _start(tmp_path_factory.mktemp("hsmsim") / "state", **kw)
        started.append(c)
        return c

    yield factory
    for c in started:
        c.down()


@pytest.fixture
def hsmsim_cluster(tmp_path: Path) -> Iterator["HsmsimCluster"]:
    """A fresh 3-HSM cluster (us-east-1a/b/c) for one test, stopped afterwards."""
    c = _start(tmp_path / "hsmsim")
    try:
        yield c
    finally:
        c.down()


@pytest.fixture(scope="session")
def hsmsim_session_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator["HsmsimCluster"]:
    """One 3-HSM cluster shared by the whole test session (cheaper; tests must not leave
    faults behind)."""
    c = _start(tmp_path_factory.mktemp("hsmsim-session") / "state")
    try:
        yield c
    finally:
        c.down()
