"""Fixtures: real node processes with real SoftHSM2 tokens, shared per session where they
are expensive (node A: a new cluster's first HSM with users; node B: cloned from A)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hsmsim.pkcs11.constants import UserType
from .nodeproc import PASSWORDS, NodeProc, run, write_secret


def _softhsm_or_skip() -> None:
    try:
        from hsmsim.resources import softhsm_library
        softhsm_library()
    except FileNotFoundError as exc:
        pytest.skip(f"SoftHSM2 is not installed: {exc}")


@pytest.fixture(scope="session")
def node_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _softhsm_or_skip()
    state = tmp_path_factory.mktemp("nodes")
    write_secret(state / "secrets" / "cluster.secret")
    return state


async def _bootstrap(node: NodeProc) -> None:
    c = await node.client()
    try:
        await c.initialize_users(PASSWORDS["admin"], PASSWORDS["crypto_user"])
        li = await c.login(UserType.SO, "admin", PASSWORDS["admin"])
        for name in ("alice", "bob", "carol"):
            await c.create_user(li.login_id, name, "crypto-user", PASSWORDS[name])
        await c.create_user(li.login_id, "admin2", "admin", PASSWORDS["admin2"])
    finally:
        await c.close()


async def _clone(src: NodeProc, dst: NodeProc) -> None:
    a, b = await src.client(), await dst.client()
    try:
        pub = await b.clone_offer()
        await b.clone_accept(await a.clone_export(pub))
        await b.import_users(await a.export_users())
    finally:
        await a.close()
        await b.close()


@pytest.fixture(scope="session")
def node_a(node_state: Path) -> Iterator[NodeProc]:
    node = NodeProc(node_state, "hsm-aaaaaaaaaaa", "us-east-1a",
                    node_state / "secrets" / "cluster.secret", "new").start()
    try:
        run(_bootstrap, node)
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="session")
def node_b(node_state: Path, node_a: NodeProc) -> Iterator[NodeProc]:
    node = NodeProc(node_state, "hsm-bbbbbbbbbbb", "us-east-1b",
                    node_state / "secrets" / "cluster.secret", "clone").start()
    try:
        run(_clone, node_a, node)
        yield node
    finally:
        node.stop()


class Handles:
    """Unique cluster handles for one test session."""

    def __init__(self) -> None:
        self.next = 1000

    def __call__(self) -> int:
        self.next += 1
        return self.next


@pytest.fixture(scope="session")
def handles() -> Handles:
    return Handles()
