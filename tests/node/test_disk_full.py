"""A full disk is not a damaged HSM: creations answer CKR_DEVICE_MEMORY (not
CKR_FUNCTION_FAILED or CKR_GENERAL_ERROR), the audit log stays complete and gap-free, a node
that cannot start for want of space says so (exit status files.EXIT_NO_SPACE), and once space
is back everything works and nothing acknowledged is lost. The disk is a real, small tmpfs
(root only: skipped with the reason otherwise)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from diskfill import fill, small_tmpfs
from hsmsim import files
from hsmsim.pkcs11.constants import RV, Attribute as A, Mechanism as M, ObjectClass
from hsmsim.pkcs11.errors import Pkcs11Error
from hsmsim.pkcs11.params import GcmParams, MechanismSpec as Spec

from .conftest import _bootstrap
from .nodeproc import NodeProc, run, write_secret

AES_GEN = Spec(M.AES_KEY_GEN)
EC_GEN = Spec(M.EC_KEY_PAIR_GEN)
P256 = bytes.fromhex("06082a8648ce3d030107")


@pytest.fixture
def small_disk() -> Iterator[Path]:
    with small_tmpfs(48) as disk:
        yield disk


def audit_seqs(node: NodeProc) -> list[int]:
    """Every line of audit.jsonl must be a complete record; their sequence numbers."""
    raw = (node.dir / "audit.jsonl").read_bytes()
    assert raw.endswith(b"\n")
    return [json.loads(line)["seq"] for line in raw.splitlines()]


def test_full_disk_is_device_memory_and_recovers(small_disk: Path) -> None:
    node = NodeProc(small_disk, "hsm-fffffffffff", "us-east-1f",
                    write_secret(small_disk / "secrets" / "cluster.secret"), "new").start()
    try:
        run(_bootstrap, node)

        async def before() -> None:
            c, lid = await node.login("alice")
            try:
                for h in (100, 101):
                    await c.generate_key(lid, AES_GEN, {A.VALUE_LEN: 32, A.TOKEN: True,
                                                        A.LABEL: f"k{h}", A.ENCRYPT: True},
                                         handle=h)
                filler = fill(small_disk)
                failures: list[int] = []
                for h in range(200, 210):
                    try:
                        await c.generate_key(lid, AES_GEN, {A.VALUE_LEN: 32, A.TOKEN: True,
                                                            A.LABEL: f"k{h}"}, handle=h)
                    except Pkcs11Error as exc:
                        failures.append(int(exc.rv))
                for h in range(300, 304, 2):
                    try:
                        await c.generate_key_pair(
                            lid, EC_GEN, {A.EC_PARAMS: P256, A.TOKEN: True, A.VERIFY: True},
                            {A.TOKEN: True, A.SIGN: True}, public_handle=h, private_handle=h + 1)
                    except Pkcs11Error as exc:
                        failures.append(int(exc.rv))
                # Every creation failed, each with CKR_DEVICE_MEMORY (before:
                # CKR_FUNCTION_FAILED / CKR_GENERAL_ERROR, the answers of a broken HSM).
                assert failures == [int(RV.DEVICE_MEMORY)] * 12
                found = await c.find_objects(lid, {A.CLASS: ObjectClass.SECRET_KEY})
                assert sorted(found) == [100, 101]
                # Using existing keys still works on a full disk.
                enc = await c.encrypt(lid, 100, Spec(M.AES_GCM, GcmParams(b"", b"")), b"x")
                assert enc.data
                filler.unlink()
                # Space is back: creation works again at once.
                await c.generate_key(lid, AES_GEN, {A.VALUE_LEN: 32, A.TOKEN: True,
                                                    A.LABEL: "k102"}, handle=102)
                fill(small_disk)
            finally:
                await c.close()

        run(before)
        seqs = audit_seqs(node)
        assert seqs == list(range(len(seqs)))

        # Killed while the disk is full: it either starts (reading needs no space) or exits
        # with the no-space status, never with a crash that looks like damage.
        node.kill()
        node.init = None
        try:
            node.start()
        except RuntimeError:
            pass
        if node.proc is None:
            assert node_exit_status(node) == files.EXIT_NO_SPACE
        else:
            node.kill()

        (small_disk / "filler").unlink()
        node.start()

        async def after() -> tuple[list[int], dict[str, int]]:
            c, lid = await node.login("alice")
            try:
                await c.generate_key(lid, AES_GEN, {A.VALUE_LEN: 32, A.TOKEN: True,
                                                    A.LABEL: "k103"}, handle=103)
                found = await c.find_objects(lid, {A.CLASS: ObjectClass.SECRET_KEY})
                return sorted(found), (await (await node.client()).status()).recovery
            finally:
                await c.close()

        found, recovery = run(after)
        assert found == [100, 101, 102, 103]
        assert recovery["lost"] == 0
        seqs = audit_seqs(node)
        assert seqs == list(range(len(seqs)))
        tokens = node.dir / "tokens"
        assert not [p for p in tokens.rglob("*.object") if p.stat().st_size == 0]
    finally:
        node.kill()


def node_exit_status(node: NodeProc) -> int:
    """Start the node once more in the foreground and return its exit status."""
    import sys
    args = [sys.executable, "-m", "hsmsim", "node", "serve", "--state", str(node.state),
            "--hsm-id", node.hsm_id, "--az", node.az, "--listen", node.address,
            "--cluster-secret-file", str(node.secret_file)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HSMSIM_")}
    return subprocess.run(args, env=env, capture_output=True, timeout=120).returncode


def test_torn_audit_tail_is_repaired_at_open(tmp_path: Path) -> None:
    """A record torn by a crash mid-write (or NUL blocks after a power cut) is cut off at open;
    the next record continues the sequence without a gap, and every line stays readable."""
    from hsmsim.node.audit import AuditLog

    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, "hsm-aaaaaaaaaaa")
    for i in range(3):
        log.record("login", username=f"u{i}")
    log.close()
    good = path.read_bytes()
    for tail in (b'{"seq":3,"time_us":1,"hsm_', b"\0" * 4096, b'{"seq":3}garbage\n'):
        path.write_bytes(good + tail)
        log = AuditLog(path, "hsm-aaaaaaaaaaa")
        assert log.next_seq == 3
        assert log.record("logout", username="u0") == 3
        log.close()
        lines = path.read_bytes().splitlines()
        assert [json.loads(x)["seq"] for x in lines] == [0, 1, 2, 3]
        path.write_bytes(good)
