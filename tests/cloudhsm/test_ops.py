"""Ring 1 of the CloudHSMv2 endpoint: the request pipeline (`server.handle`) called in-process
on a plane over a daemon run in this process (real node processes), with the plane's clock
injected: a deleted backup is gone exactly 7 days later, the retention policy spares the
newest backup and those that never expire."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from hsmsim.cloudhsm.plane import Plane
from hsmsim.cloudhsm.server import handle
from hsmsim.cluster.backup import create_backup
from hsmsim.daemon.main import Daemon, DaemonOptions
from hsmsim.testing.cluster import start_cluster

T = TypeVar("T")
AUTH = "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261207/us-east-1/cloudhsm/aws4_request, SignedHeaders=host, Signature=00"
DAY = 86400.0


class Loop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Plane, Loop]]:
    try:
        from hsmsim.resources import softhsm_library
        softhsm_library()
    except FileNotFoundError as exc:
        pytest.skip(f"hsmsim cluster unavailable: {exc}")
    state = tmp_path_factory.mktemp("cloudhsm-ops") / "state"
    start_cluster(state, azs=2, env={**os.environ, "HSMSIM_CLOUDHSM_PORT": "0"}).down()
    loop = Loop()
    d = Daemon(DaemonOptions(state_dir=state, services=False), os.environ)
    loop.run(d.start())
    p = Plane(d)
    yield p, loop
    loop.run(d.close())
    loop.stop()


def call(plane: tuple[Plane, Loop], op: str, params: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    p, loop = plane
    status, body, _ = loop.run(handle(p, "POST", "/", {
        "X-Amz-Target": f"BaldrApiService.{op}", "Content-Type": "application/x-amz-json-1.1",
        "Authorization": AUTH}, json.dumps(params).encode()))
    return status, json.loads(body)


def backups(plane: tuple[Plane, Loop]) -> dict[str, str]:
    status, body = call(plane, "DescribeBackups", {})
    assert status == 200
    return {b["BackupId"]: b["BackupState"] for b in body["Backups"]}


def test_pending_deletion_ends_after_seven_days(plane: tuple[Plane, Loop]) -> None:
    p, loop = plane
    assert p.daemon.cluster is not None
    made = loop.run(create_backup(p.daemon.cluster, p.daemon.state, reason="test", progress=None))
    bid = made["backup_id"]
    now = p.clock()
    p.clock = lambda: now
    status, body = call(plane, "DeleteBackup", {"BackupId": bid})
    assert status == 200 and body["Backup"]["BackupState"] == "PENDING_DELETION"
    assert body["Backup"]["DeleteTimestamp"] == pytest.approx(now + 7 * DAY, abs=1e-3)
    p.clock = lambda: now + 7 * DAY - 1
    assert backups(plane)[bid] == "PENDING_DELETION"
    p.clock = lambda: now + 7 * DAY
    assert bid not in backups(plane)
    assert not (p.daemon.state.backups / f"{bid}.bak").exists()
    status, body = call(plane, "RestoreBackup", {"BackupId": bid})
    assert status == 400 and body["__type"] == "CloudHsmResourceNotFoundException"
    p.clock = lambda: now


def test_retention_spares_never_expires_and_the_newest(plane: tuple[Plane, Loop]) -> None:
    p, loop = plane
    assert p.daemon.cluster is not None
    cid = p.daemon.cluster.spec.cluster_id
    ids = [loop.run(create_backup(p.daemon.cluster, p.daemon.state, reason="test", progress=None))["backup_id"]
           for _ in range(3)]
    status, _ = call(plane, "ModifyBackupAttributes", {"BackupId": ids[0], "NeverExpires": True})
    assert status == 200
    status, body = call(plane, "ModifyCluster", {"ClusterId": cid,
                                                 "BackupRetentionPolicy": {"Type": "DAYS", "Value": "7"}})
    assert status == 200 and body["Cluster"]["BackupRetentionPolicy"]["Value"] == "7"
    now = p.clock()
    p.clock = lambda: now + 6 * DAY
    assert set(ids) <= set(backups(plane))
    p.clock = lambda: now + 8 * DAY
    left = backups(plane)
    assert ids[0] in left and ids[2] in left and ids[1] not in left
    p.clock = lambda: now


def test_an_unreadable_record_is_kept_aside(plane: tuple[Plane, Loop]) -> None:
    p, _ = plane
    p.file.write_bytes(b"{not json")
    fresh = Plane(p.daemon)
    aside = list(p.file.parent.glob("plane.json.unreadable-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == b"{not json"
    assert list(fresh.data["clusters"]) == [p.primary_id]
    assert json.loads(p.file.read_bytes())["clusters"][p.primary_id]["primary"] is True
    p.save()


def test_a_created_hsm_is_active_only_once_it_holds_every_key(plane: tuple[Plane, Loop]) -> None:
    """CloudHSM clones a new HSM from the cluster's backup: when DescribeClusters first shows it
    ACTIVE it holds every key of the cluster. Here: at the first DescribeClusters (polled on the
    daemon's own loop, so no step of CreateHsm is missed) showing the new HSM ACTIVE, its node's
    inventory has every token key and `key list` coverage (the directory's holders) counts it."""
    from hsmsim.pkcs11.constants import Attribute, Mechanism, UserType
    from hsmsim.pkcs11.params import MechanismSpec
    p, loop = plane
    c = p.daemon.cluster
    assert c is not None
    cid = c.spec.cluster_id
    cu = p.daemon.state.read_secret(p.daemon.state.cu_password)
    template: dict[int, Any] = {int(Attribute.TOKEN): True, int(Attribute.VALUE_LEN): 32, int(Attribute.LABEL): "on-new",
                int(Attribute.ENCRYPT): True, int(Attribute.SENSITIVE): True, int(Attribute.EXTRACTABLE): False}

    async def op(name: str, params: dict[str, Any]) -> dict[str, Any]:
        status, body, _ = await handle(p, "POST", "/", {
            "X-Amz-Target": f"BaldrApiService.{name}", "Content-Type": "application/x-amz-json-1.1",
            "Authorization": AUTH}, json.dumps(params).encode())
        assert status == 200, body
        return dict(json.loads(body))

    async def scenario() -> tuple[str, set[int], set[int], dict[int, int]]:
        login = await c.login(UserType.USER, "crypto_user", cu)
        keys = {await c.generate_key(login, MechanismSpec(int(Mechanism.AES_KEY_GEN)), template, 1)
                for _ in range(3)}
        while any(c.sync_lag(m) for m in c.members.values()):
            await asyncio.sleep(0.05)
        hsm_id = str((await op("CreateHsm", {"ClusterId": cid, "AvailabilityZone": "us-east-1a"}))["Hsm"]["HsmId"])
        states = []
        while True:
            cluster = (await op("DescribeClusters", {"Filters": {"clusterIds": [cid]}}))["Clusters"][0]
            state = next((h["State"] for h in cluster["Hsms"] if h["HsmId"] == hsm_id), None)
            states.append(state)
            if state == "ACTIVE":
                break
            assert state == "CREATE_IN_PROGRESS", states
            await asyncio.sleep(0.005)
        m = c.members[hsm_id]
        assert m.client is not None
        on_node = {e.handle for e in await m.client.inventory()}
        holders = {k: len(c.directory.holders(k)) for k in keys}
        return hsm_id, keys, on_node, holders

    hsm_id, keys, on_node, holders = loop.run(scenario(), timeout=240)
    try:
        assert keys <= on_node
        assert holders == {k: len(c.members) for k in keys}  # `key list` coverage 3/3
    finally:
        status, _ = call(plane, "DeleteHsm", {"ClusterId": cid, "HsmId": hsm_id})
        assert status == 200

        async def gone() -> None:
            while hsm_id in c.members:
                await asyncio.sleep(0.05)
        loop.run(gone(), timeout=120)
