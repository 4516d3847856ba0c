"""One real cluster (`hsmsim up --detach`) shared by the CLI tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hsmsim.testing.cluster import HsmsimCluster, start_cluster


@pytest.fixture(scope="session")
def cli_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HsmsimCluster]:
    c = start_cluster(tmp_path_factory.mktemp("cli") / "state")
    try:
        yield c
    finally:
        c.down()
