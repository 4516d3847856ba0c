"""Fault injection (latency, throttling, pause) and the per-node audit log (gap-free
sequence, management events only, no secrets)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from hsmsim.node.client import NodeThrottled
from hsmsim.pkcs11.constants import RV, Attribute as A, Mechanism as M
from hsmsim.pkcs11.errors import error_class
from hsmsim.pkcs11.params import GcmParams, MechanismSpec as Spec

from .nodeproc import PASSWORDS, NodeProc, run


def test_latency_throttle_pause(node_a: NodeProc) -> None:
    async def body() -> None:
        ctl = await node_a.client()
        c, lid = await node_a.login("alice")
        try:
            assert await ctl.set_fault(latency_ms=150) == {"latency_ms": 150.0,
                                                           "throttle_rps": 0.0, "paused": False}
            t0 = time.monotonic()
            await c.generate_random(8)
            assert time.monotonic() - t0 >= 0.15  # the added latency is applied (lower bound)
            await ctl.set_fault(latency_ms=0, throttle_rps=5)
            results = await asyncio.gather(*(c.generate_random(8) for _ in range(40)),
                                           return_exceptions=True)
            throttled = [r for r in results if isinstance(r, NodeThrottled)]
            ok = [r for r in results if isinstance(r, bytes)]
            assert throttled and ok and len(throttled) + len(ok) == 40
            assert all(e.rv == RV.FUNCTION_FAILED and e.throttled for e in throttled)
            assert isinstance(throttled[0], error_class(RV.FUNCTION_FAILED))
            await ctl.set_fault(throttle_rps=0)
            await c.generate_random(8)
            # Pause: requests wait (not lost) until resumed through set_fault.
            await ctl.set_fault(paused=True)
            pending = asyncio.ensure_future(c.generate_random(8))
            await asyncio.sleep(0.3)
            assert not pending.done()
            assert (await ctl.set_fault(paused=False))["paused"] is False
            assert len(await asyncio.wait_for(pending, 5)) == 8
            with pytest.raises(error_class(RV.ARGUMENTS_BAD)):
                await ctl.set_fault(latency_ms=-1)  # type: ignore[arg-type]
        finally:
            await ctl.set_fault(latency_ms=0, throttle_rps=0, paused=False)
            await c.close()
            await ctl.close()
    run(body)


def test_audit_log(node_a: NodeProc, handles) -> None:
    async def body() -> None:
        ctl = await node_a.client()
        start = (await ctl.status()).audit_seq
        c, lid = await node_a.login("bob")
        h = await c.generate_key(lid, Spec(M.AES_KEY_GEN), {A.VALUE_LEN: 32, A.TOKEN: True,
                                                            A.ENCRYPT: True}, handle=handles())
        for _ in range(5):  # crypto is not audited
            await c.encrypt(lid, h, Spec(M.AES_GCM, GcmParams(b"", b"")), b"not audited")
        await c.share_key(lid, h, "alice")
        await c.destroy_object(lid, h)
        await c.logout(lid)
        new = await ctl.audit_read(start)
        assert [r.event for r in new][-5:] == ["login", "key_generate", "key_share", "key_delete",
                                               "logout"]
        assert new[-4].fields["handle"] == h and new[-3].fields["username"] == "alice"
        every = await ctl.audit_read(0, 10000)
        assert [r.seq for r in every] == list(range(len(every)))  # gap-free from 0
        assert every[0].event == "init_token"
        assert (await ctl.audit_read(start + 1, 2))[0].seq == start + 1
        text = (node_a.dir / "audit.jsonl").read_text()
        for line in text.splitlines():
            rec = json.loads(line)
            assert rec["hsm_id"] == node_a.hsm_id
        for secret in list(PASSWORDS.values()) + ["not audited"]:
            assert secret not in text
        assert oct((node_a.dir / "audit.jsonl").stat().st_mode & 0o777) == "0o600"
        await ctl.close()
        await c.close()
    run(body)


def test_state_files_private(node_a: NodeProc) -> None:
    assert node_a.sock.stat().st_mode & 0o777 == 0o600
    assert node_a.dir.stat().st_mode & 0o777 == 0o700
    assert (node_a.dir / "softhsm2.conf").stat().st_mode & 0o777 == 0o600
    assert (node_a.dir / "index.sqlite").stat().st_mode & 0o777 == 0o600
    index = (node_a.dir / "index.sqlite").read_bytes()
    for pw in PASSWORDS.values():
        assert pw.encode() not in index


def test_paused_node_times_out_handshake(node_a: NodeProc) -> None:
    from hsmsim.node.client import NodeClient, NodeUnavailable

    async def body() -> None:
        ctl = await node_a.client()
        try:
            await ctl.set_fault(paused=True)
            with pytest.raises(NodeUnavailable):
                await NodeClient.connect(node_a.address, cluster_secret=node_a.secret,
                                         timeout=0.5)
        finally:
            await ctl.set_fault(paused=False)
            await ctl.close()
        c = await node_a.client()
        await c.ping()
        await c.close()
    run(body)
