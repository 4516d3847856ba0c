"""Concurrent login attempts for one user on one node (issue 17.2): check-lock, verify and
count are one step, so at most 5 failures are ever verified and, once locked, every attempt
gets CKR_PIN_LOCKED whatever its password."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator

import pytest

from hsmsim.pkcs11.constants import RV, UserType
from hsmsim.pkcs11.errors import Pkcs11Error

from .nodeproc import NodeProc, run

LOCKOUT_AFTER = 5


async def _burst(node: NodeProc, username: str, passwords: list[str]) -> list[str]:
    """All attempts pipelined at once on one connection, in list order; each one's answer."""
    c = await node.client(cluster=False)
    try:
        results = await asyncio.gather(*(c.login(UserType.USER, username, p) for p in passwords),
                                       return_exceptions=True)
    finally:
        await c.close()
    out = []
    for r in results:
        if isinstance(r, Pkcs11Error):
            out.append(RV(r.rv).name)
        elif isinstance(r, BaseException):
            raise r
        else:
            out.append("OK")
    return out


def _counts(node: NodeProc, username: str) -> list[dict[str, object]]:
    """The node's login audit records for `username`, in order."""
    async def read() -> list[dict[str, object]]:
        c = await node.client()
        try:
            recs = await c.audit_read(0, 10000)
        finally:
            await c.close()
        return [dict(r.fields, event=r.event) for r in recs
                if r.fields.get("username") == username and r.event in ("login", "login_failed")]
    return run(read)


@pytest.fixture(autouse=True)
def _remove_racers(node_a: NodeProc) -> Iterator[None]:
    """node_a is shared by the whole session: the users made here must not outlive the test
    (test_masking counts node_a's users)."""
    yield

    async def remove() -> None:
        admin, lo = await node_a.login("admin")
        for name in ("racer1", "racer2"):
            if name in {u.username for u in await admin.list_users(lo)}:
                await admin.delete_user(lo, name)
        await admin.close()
    run(remove)


def test_concurrent_wrong_passwords_lock_after_five(node_a: NodeProc) -> None:
    async def body() -> list[str]:
        admin, lo = await node_a.login("admin")
        await admin.create_user(lo, "racer1", "crypto-user", "racer1-right")
        answers = await _burst(node_a, "racer1", [f"wrong-{i:04d}" for i in range(12)])
        users = {u.username: u for u in await admin.list_users(lo)}
        assert users["racer1"].locked and users["racer1"].failed_logins == LOCKOUT_AFTER
        # Locked: the right password gets the same answer as a wrong one.
        late = await _burst(node_a, "racer1", ["racer1-right", "wrong-9999"])
        await admin.close()
        return answers + late

    answers = run(body)
    assert Counter(answers[:12]) == {"PIN_INCORRECT": LOCKOUT_AFTER,
                                     "PIN_LOCKED": 12 - LOCKOUT_AFTER}
    assert answers[12:] == ["PIN_LOCKED", "PIN_LOCKED"]
    verified = [r for r in _counts(node_a, "racer1") if "failed" in r]
    assert [r["failed"] for r in verified] == [1, 2, 3, 4, 5]  # none lost, none beyond 5


def test_right_password_in_a_burst_logs_in_before_the_lock(node_a: NodeProc) -> None:
    async def body() -> list[str]:
        admin, lo = await node_a.login("admin")
        await admin.create_user(lo, "racer2", "crypto-user", "racer2-right")
        answers = await _burst(node_a, "racer2",
                               ["racer2-right"] + [f"wrong-{i:04d}" for i in range(19)])
        users = {u.username: u for u in await admin.list_users(lo)}
        assert users["racer2"].locked
        await admin.close()
        return answers

    answers = run(body)
    # The first attempt is admitted before any failure is counted, so it logs in; the others
    # are wrong: at most 5 of them verified per run of failures, the rest PIN_LOCKED.
    assert answers[0] == "OK"
    assert set(answers[1:]) == {"PIN_INCORRECT", "PIN_LOCKED"}
    run_length = 0
    for r in _counts(node_a, "racer2"):
        if r["event"] == "login":
            run_length = 0
        elif "failed" in r:
            run_length += 1
            assert r["failed"] == run_length <= LOCKOUT_AFTER
    assert answers.count("PIN_INCORRECT") <= 2 * LOCKOUT_AFTER
