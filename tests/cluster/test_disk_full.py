"""A full disk is not a damaged HSM (issue 17.7): a node killed while the cluster's disk is
full is not set aside and replaced (before: its healthy directory went to
nodes/.replaced-*, and a dead copy was left on the full disk), key generation answers
CKR_DEVICE_MEMORY, and once there is space the HSM comes back with every key. The disk is a
real, small tmpfs (root only: skipped with the reason otherwise)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from diskfill import fill, small_tmpfs
from hsmsim.pkcs11.constants import RV
from hsmsim.pkcs11.errors import Pkcs11Error

from .conftest import AES_GEN, Harness, aes_template


@pytest.fixture
def small_disk() -> Iterator[Path]:
    with small_tmpfs(96) as disk:
        yield disk


def wait_for(cond, what: str, timeout: float = 180.0) -> None:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_node_killed_on_full_disk_is_not_replaced(small_disk: Path) -> None:
    h = Harness(small_disk / "state")
    try:
        login = h.login()
        kept = [h.call(h.cluster.generate_key(login, AES_GEN, aes_template(label=f"k{i}"), 0))
                for i in range(3)]
        h.wait_converged(60)
        filler = fill(small_disk)
        with pytest.raises(Pkcs11Error) as err:
            h.call(h.cluster.generate_key(login, AES_GEN, aes_template(label="full"), 0))
        assert err.value.rv == RV.DEVICE_MEMORY
        victim = h.hsm_ids[1]
        m = h.cluster.members[victim]
        old_pid = m.pid
        h.crash(victim)
        # The supervisor tries to restart it: it either starts (a node needs no space to
        # read its keys) or is left waiting for space; either way never set aside.
        nodes = small_disk / "state" / "nodes"

        def settled() -> bool:
            aside = [p for p in nodes.iterdir() if p.name.startswith(".replaced-")]
            restarted = m.usable and m.pid not in (None, old_pid)
            return bool(aside) or m.replacements > 0 or restarted or \
                "no space" in (m.last_error or "")
        wait_for(settled, "the supervisor to deal with the killed node")
        assert not [p.name for p in nodes.iterdir() if p.name.startswith(".replaced-")]
        assert m.replacements == 0
        assert m.start_failures == 0, m.last_error
        h.wait_converged(120)
        # A node whose start needs space it cannot get (here: softhsm2.conf must be written
        # again) exits with the no-space status and is left waiting, not replaced.
        h.crash(victim)
        (m.dir / "softhsm2.conf").unlink()

        def waiting() -> bool:
            aside = [p for p in nodes.iterdir() if p.name.startswith(".replaced-")]
            return bool(aside) or m.replacements > 0 or "no space" in (m.last_error or "")
        wait_for(waiting, "the supervisor to give up starting the node for want of space")
        assert not [p.name for p in nodes.iterdir() if p.name.startswith(".replaced-")]
        assert m.replacements == 0 and m.start_failures == 0
        assert victim in h.sup.space_retry_at
        os.unlink(filler)
        h.wait_converged(180)
        assert m.usable
        assert not [p.name for p in nodes.iterdir() if p.name.startswith(".replaced-")]
        assert m.replacements == 0
        invs = h.inventories()
        for hid in h.hsm_ids:
            assert set(kept) <= set(invs[hid]), hid
        k = h.call(h.cluster.generate_key(login, AES_GEN, aes_template(label="after"), 0))
        assert k > 0
    finally:
        h.close()
