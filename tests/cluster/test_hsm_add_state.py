"""An HSM being added (`hsmsim hsm add`, CreateHsm) is CREATE_IN_PROGRESS everywhere the
member's state is read (`hsmsim status`, the cluster's ClusterInfo that KMS custom key stores
count ACTIVE HSMs from) until it holds every key of the cluster; then ACTIVE (issue 18)."""

from __future__ import annotations

import asyncio
from typing import Any

from .conftest import AES_GEN, Harness, aes_template


def test_an_added_hsm_is_create_in_progress_until_it_holds_every_key(fresh3: Harness) -> None:
    h = fresh3
    login = h.login()
    keys = {h.call(h.cluster.generate_key(login, AES_GEN, aes_template(label=f"s{i}"), 1))
            for i in range(4)}
    h.wait_converged()
    from hsmsim.control.ops import handlers
    ops = handlers(h.daemon.control_context())
    c = h.cluster
    before = set(c.members)

    async def progress(done: int, total: int, label: str) -> None:
        pass

    async def scenario() -> tuple[str, list[tuple[str, str]], set[int]]:
        # polled on the daemon's own loop, so that no step of the addition is missed
        add = asyncio.get_running_loop().create_task(ops["hsm.add"]({"az": "us-east-1d"}, progress))
        seen: list[tuple[str, str]] = []  # (status --json state, ClusterInfo state)
        while True:
            new = set(c.members) - before
            if new:
                hsm_id = next(iter(new))
                status: dict[str, Any] = await ops["status"]({}, progress)
                st = next(x["state"] for x in status["hsms"] if x["hsm_id"] == hsm_id)
                info = next(x.state for x in (await c.info()).hsms if x.hsm_id == hsm_id)
                seen.append((st, info))
                if "ACTIVE" in (st, info):
                    m = c.members[hsm_id]
                    on_node = {e.handle for e in await m.connection().inventory()}
                    await add
                    return hsm_id, seen, on_node
            if add.done():
                add.result()
                raise AssertionError(f"hsm.add ended before its HSM was seen: {seen}")
            await asyncio.sleep(0.002)

    hsm_id, seen, on_node = h.call(scenario(), timeout=240)
    *creating, first_active = seen
    assert creating and all(s == ("CREATE_IN_PROGRESS", "CREATE_IN_PROGRESS") for s in creating), seen
    assert first_active == ("ACTIVE", "ACTIVE"), seen
    assert keys <= on_node  # at its first ACTIVE it holds every key
    assert hsm_id in {x.hsm_id for x in c.spec.hsms}
