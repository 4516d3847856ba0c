"""The object index and the token stay consistent across kill -9: no acknowledged object is
lost, no unacknowledged object survives as a phantom, and the token holds exactly the indexed
objects (counted directly in SoftHSM2 after the node stops)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hsmsim.node.client import NodeUnavailable
from hsmsim.pkcs11.constants import Attribute as A, Mechanism as M, ObjectClass
from hsmsim.pkcs11.errors import Pkcs11Error
from hsmsim.pkcs11.params import GcmParams, MechanismSpec as Spec

from .conftest import _bootstrap
from .nodeproc import NodeProc, run, write_secret

COUNT_TOKEN_OBJECTS = """
import json, sys
from pathlib import Path
from hsmsim.node.process import token_pins
from hsmsim.node.softhsm import SoftHsm
from hsmsim.resources import softhsm_library
secret, hsm_id = Path(sys.argv[1]).read_bytes().strip(), sys.argv[2]
so, user = token_pins(secret, hsm_id)
hsm = SoftHsm.load(softhsm_library(), hsm_id, so, user)
labels = sorted((hsm.get_attribute(h, 3) or b"").decode() for h in hsm.find_objects([]))
print(json.dumps(labels))
"""


def token_labels(node: NodeProc) -> list[str]:
    env = dict(os.environ, SOFTHSM2_CONF=str(node.dir / "softhsm2.conf"))
    out = subprocess.run([sys.executable, "-c", COUNT_TOKEN_OBJECTS, str(node.secret_file),
                          node.hsm_id], env=env, capture_output=True, check=True, timeout=60)
    return list(json.loads(out.stdout))


@pytest.fixture
def crash_node(tmp_path: Path):
    node = NodeProc(tmp_path, "hsm-ddddddddddd", "us-east-1d",
                    write_secret(tmp_path / "secrets" / "cluster.secret"), "new").start()
    run(_bootstrap, node)
    try:
        yield node
    finally:
        node.kill()


def test_kill9_no_lost_no_phantom(crash_node: NodeProc) -> None:
    gen = Spec(M.AES_KEY_GEN)

    async def before_crash() -> tuple[set[int], set[int], bytes, bytes]:
        c, lid = await crash_node.login("alice")
        acked: set[int] = set()
        for h in range(1, 11):
            acked.add(await c.generate_key(lid, gen, {A.VALUE_LEN: 32, A.TOKEN: True,
                                                      A.LABEL: f"k{h}", A.ENCRYPT: True,
                                                      A.DECRYPT: True}, handle=h))
        enc = await c.encrypt(lid, 1, Spec(M.AES_GCM, GcmParams(b"", b"")), b"survives")
        # Many creations and deletions in flight, then kill -9 in the middle.
        async def create(h: int) -> int:
            return await c.generate_key(lid, gen, {A.VALUE_LEN: 16, A.TOKEN: True,
                                                   A.LABEL: f"k{h}"}, handle=h)
        tasks = [asyncio.ensure_future(create(h)) for h in range(100, 160)]
        tasks += [asyncio.ensure_future(c.destroy_object(lid, h)) for h in (9, 10)]
        await asyncio.sleep(0.15)
        crash_node.kill()  # SIGKILL
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for h, r in zip(range(100, 160), results):
            if isinstance(r, int):
                acked.add(h)
            else:
                assert isinstance(r, (NodeUnavailable, Pkcs11Error))
        destroyed = {h for h, r in zip((9, 10), results[60:]) if r is None}
        await c.close()
        # An unacknowledged deletion may or may not have happened: neither is required.
        return acked - {9, 10}, destroyed, enc.data, enc.iv or b""

    acked, destroyed, ct, iv = run(before_crash)
    assert len(acked) >= 8
    crash_node.start()

    async def after_restart() -> tuple[set[int], dict[str, int]]:
        c, lid = await crash_node.login("alice")
        found = set(await c.find_objects(lid, {A.CLASS: ObjectClass.SECRET_KEY}))
        # Every acknowledged object is there, with its attributes, and usable.
        for h in acked:
            (label,) = await c.get_attributes(lid, h, [A.LABEL])
            assert label.value == f"k{h}"
        assert await c.decrypt(lid, 1, Spec(M.AES_GCM, GcmParams(iv, b"")), ct) == b"survives"
        status = await (await crash_node.client()).status()
        await c.close()
        return found, status.recovery

    found, recovery = run(after_restart)
    assert acked <= found, "acknowledged objects were lost"
    assert found <= acked | set(range(100, 160)) | {9, 10}, "objects nobody created"
    assert not (found & destroyed), "acknowledged deletions came back"
    assert recovery["lost"] == 0
    crash_node.stop()
    labels = token_labels(crash_node)
    # Exactly the indexed objects plus the masking key: no phantom SoftHSM2 objects.
    assert sorted(labels) == sorted([f"hsmsim:{h}" for h in found] + ["hsmsim:masking-key"])
