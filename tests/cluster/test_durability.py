"""The durability invariant: a token key whose creation was acknowledged is never lost while
at most one node fails — under repeated kill -9 of random nodes, and across a kill -9 of the
daemon itself under load."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hsmsim.cluster.state import StateDir, prepare_new_cluster
from hsmsim.pkcs11.constants import Mechanism
from hsmsim.pkcs11.errors import Pkcs11Error
from hsmsim.pkcs11.params import GcmParams, MechanismSpec

from .conftest import AES_GEN, Harness, aes_template

GCM = MechanismSpec(int(Mechanism.AES_GCM), GcmParams(iv=b"", aad=b"", tag_bits=128))


def _assert_everywhere(h: Harness, acked: list[int]) -> None:
    invs = h.inventories()
    assert set(invs) == set(h.hsm_ids), f"not every HSM answered: {sorted(invs)}"
    missing = {hid: [k for k in acked if k not in inv] for hid, inv in invs.items()}
    assert all(not m for m in missing.values()), f"acknowledged keys lost: {missing}"
    for k in acked:
        fps = {inv[k] for inv in invs.values()}
        assert len(fps) == 1, f"key {k} differs between HSMs"


def churn(h: Harness, seconds: float, every: float = 2.0) -> tuple[list[int], int, float]:
    """4 client threads create and use token keys while a random node is kill -9'ed every
    `every` seconds (supervision restarts it). Returns (acknowledged handles, kills, seconds
    from the last restart to convergence)."""
    acked: list[int] = []
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            login = h.login()
            while not stop.is_set():
                try:
                    k = h.call(h.cluster.generate_key(login, AES_GEN, aes_template(), 1))
                except Pkcs11Error:
                    continue  # not acknowledged: allowed to be lost
                with lock:
                    acked.append(k)
                try:
                    h.call(h.cluster.encrypt(login, k, GCM, b"use it"))
                except Pkcs11Error:
                    pass
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    rng = random.Random(4)
    kills = 0
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            time.sleep(every)
            live = [m for m in h.cluster.members.values() if m.pid is not None]
            if live:
                victim = rng.choice(live)
                os.kill(victim.pid, signal.SIGKILL)  # type: ignore[arg-type]
                kills += 1
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors
    # wait for the last restart, then time convergence from there
    deadline = time.monotonic() + 30
    while not all(m.usable for m in h.cluster.members.values()):
        assert time.monotonic() < deadline, "a killed node did not come back: " + repr(
            {m.hsm_id: (m.condition(), m.last_error, m.restarts, m.replacements)
             for m in h.cluster.members.values()})
        time.sleep(0.02)
    converge = h.wait_converged(30)
    return acked, kills, converge


def test_no_acknowledged_key_is_lost_under_node_kills(fresh3: Harness) -> None:
    acked, kills, converge = churn(fresh3, 30.0)
    assert kills >= 10
    assert len(acked) > 20, "the load made too little progress to mean anything"
    _assert_everywhere(fresh3, acked)
    # Convergence itself is awaited (wait_converged fails on its timeout); how long it took is
    # reported, never asserted: a wall-clock bound flakes on a loaded 2-core machine.
    print(f"converged {converge:.1f}s after the last restart")


@pytest.mark.soak
def test_soak_node_kills_for_three_minutes(fresh3: Harness) -> None:
    acked, kills, converge = churn(fresh3, 180.0)
    assert kills >= 60
    _assert_everywhere(fresh3, acked)
    assert converge <= 5.0


def test_daemon_kill_minus_nine_under_load(tmp_path: Path) -> None:
    state = tmp_path / "state"
    prepare_new_cluster(StateDir(state), ["us-east-1a", "us-east-1b", "us-east-1c"], 1,
                        "admin-password-1", "cu-password-1")
    _kill_loaded_daemon_and_check(tmp_path, state, rounds=1)


@pytest.mark.soak
def test_soak_daemon_killed_five_times(tmp_path: Path) -> None:
    state = tmp_path / "state"
    prepare_new_cluster(StateDir(state), ["us-east-1a", "us-east-1b", "us-east-1c"], 1,
                        "admin-password-1", "cu-password-1")
    _kill_loaded_daemon_and_check(tmp_path, state, rounds=5)


def _kill_loaded_daemon_and_check(tmp_path: Path, state: Path, rounds: int) -> None:
    acked_file = tmp_path / "acked"
    for _ in range(rounds - 1):
        _load_and_kill(tmp_path, state, acked_file)
    _load_and_kill_final(tmp_path, state, acked_file)


def _load_and_kill(tmp_path: Path, state: Path, acked_file: Path) -> None:
    start = len(acked_file.read_text().split()) if acked_file.exists() else 0
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2]) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("load_daemon.py")),
                             str(state), str(acked_file)], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "load.log", "ab"))
    try:
        deadline = time.monotonic() + 120
        while True:
            lines = acked_file.read_text().split() if acked_file.exists() else []
            if len(lines) > start + 40:
                break
            assert proc.poll() is None, (tmp_path / "load.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the loaded daemon made no progress"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()


def _load_and_kill_final(tmp_path: Path, state: Path, acked_file: Path) -> None:
    _load_and_kill(tmp_path, state, acked_file)
    acked = [int(x) for x in acked_file.read_text().split() if x.isdigit()]
    h = Harness(state, new=False)  # reopens the cluster; the nodes survived the daemon
    try:
        h.wait_converged(30)
        _assert_everywhere(h, acked)
        # the restarted daemon never hands out a handle the dead one used
        login = h.login()
        k = h.call(h.cluster.generate_key(login, AES_GEN, aes_template(), 1))
        assert k > max(acked)
    finally:
        h.close()
